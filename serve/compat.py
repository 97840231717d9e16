"""`POST /v1/images/generations`: the request and response shape of OpenAI-style image
services, mapped onto our own `/v1/generate`.

What maps: `prompt`, `n` -> num_images, `size` ("WxH") -> width/height, `response_format`
(only `b64_json`: this server never hosts files, so `url` is refused), `model` (must be
the served model's id or left out) and `user` (accepted, ignored). Kosmos-G's own fields
ride along as extensions: `images` (base64, one per `<image>` placeholder), `negative_prompt`,
`seed`, `steps`, `guidance_scale`, `scheduler`. What differs: `quality` and `style` do not
exist here (422), sizes are limited by the server's limits (see `GET /v1/models`), and the
response adds `seed` and `timings` beside `created` and `data`. Errors use the
`{"error": {"message", "type", "code"}}` envelope such clients parse.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from kosmos_g.serve.messages import RequestError
from kosmos_g.serve.schemas import GenerateResponse

_SIZE = re.compile(r"^\s*(\d{1,5})\s*[xX×]\s*(\d{1,5})\s*$")
_ERROR_TYPES = {401: "authentication_error", 404: "not_found_error", 413: "invalid_request_error",
                415: "invalid_request_error", 422: "invalid_request_error", 400: "invalid_request_error"}


class ImagesGenerationsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: str = Field(description="text; `<image>` placeholders take `images` in order")
    n: int = Field(1, description="number of images")
    size: str | None = Field(None, description='"WIDTHxHEIGHT", e.g. "512x512"; omitted: the native size')
    response_format: Literal["b64_json", "url"] = "b64_json"
    model: str | None = Field(None, description="the served model's id (GET /v1/models) or omitted")
    user: str | None = Field(None, description="accepted and ignored")
    # Kosmos-G extensions
    images: list[str] = Field(default_factory=list, description="base64 images for the <image> placeholders")
    negative_prompt: str | None = None
    seed: int | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    scheduler: str | None = None


def generate_fields(request: ImagesGenerationsRequest, served_model: str) -> dict:
    """The equivalent `/v1/generate` JSON fields, or RequestError(400) for what cannot map."""
    if request.response_format == "url":
        raise RequestError(400, "response_format: this server returns images inline only; "
                                "use \"b64_json\"")
    if request.model not in (None, "", served_model):
        raise RequestError(404, f"model {request.model!r} is not served here; this server serves "
                                f"{served_model!r} (GET /v1/models)")
    fields = {"prompt": request.prompt, "images": request.images, "num_images": request.n,
              "response_format": "json"}
    if request.size is not None:
        match = _SIZE.match(request.size)
        if not match:
            raise RequestError(400, f"size must look like \"512x512\" (WIDTHxHEIGHT), got {request.size!r}")
        fields["width"], fields["height"] = int(match.group(1)), int(match.group(2))
    for name in ("negative_prompt", "seed", "steps", "guidance_scale", "scheduler"):
        value = getattr(request, name)
        if value is not None:
            fields[name] = value
    return fields


def images_response(payload: GenerateResponse, created: int) -> dict:
    return {"created": created, "data": [{"b64_json": image.png_base64} for image in payload.images],
            "seed": payload.seed, "model": payload.model, "timings": payload.timings}


def error_body(status: int, message: str) -> dict:
    kind = _ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "code": status}}
