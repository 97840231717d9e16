"""The HTTP API's request and response models, and the checks against the configured limits.

Pydantic checks types (a wrong type is a 422); `to_job` checks values against `Limits`
(a 400 that names the field and the allowed range). Images arrive as raw bytes here:
`inputs.py` has already decoded base64 or read the multipart upload.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from kosmos_g.serve.config import Defaults, Limits, ServeConfig
from kosmos_g.serve.messages import ADAPTER_NAME, SCHEDULER_NAMES, RequestError, canonical_scheduler


class TextSegment(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str


class ImageSegment(BaseModel):
    model_config = ConfigDict(extra="forbid")
    image: str = Field(description="base64 PNG/JPEG/WebP/GIF/BMP (a `data:image/...;base64,` prefix is fine)")


class GenerateRequest(BaseModel):
    """Body of `POST /v1/generate` (JSON). Multipart forms carry the same fields, with
    `images` and `control_image` as file uploads."""

    model_config = ConfigDict(extra="forbid")
    prompt: str | list[TextSegment | ImageSegment] = Field(
        description="text with one `<image>` (or `<i>`) placeholder per entry of `images`, "
        "or a list of {text} / {image} segments in order")
    images: list[str] = Field(default_factory=list, description="base64 images for the placeholders, in order")
    negative_prompt: str | None = Field(None, description="text for the unconditional branch")
    num_images: int | None = Field(None, description="images to sample for the prompt")
    steps: int | None = None
    guidance_scale: float | None = None
    scheduler: str | None = Field(None, description=f"one of {', '.join(SCHEDULER_NAMES)}")
    seed: int | None = Field(None, description="same seed, same image; omitted: a random one (returned)")
    height: int | None = Field(None, description="pixels; omitted: the model's native size")
    width: int | None = None
    control_image: str | None = Field(None, description="base64 ControlNet condition image")
    control_scale: float = 1.0
    lora: str | None = Field(None, description="name of a LoRA adapter under the server's LoRA prefix")
    response_format: Literal["json", "png"] | None = Field(
        None, description="json (default) or png (one image; also chosen by `Accept: image/png`)")


class GeneratedImage(BaseModel):
    png_base64: str


class GenerateResponse(BaseModel):
    images: list[GeneratedImage]
    seed: int
    width: int
    height: int
    model: str
    timings: dict[str, float] = Field(description="seconds per stage")
    batching: dict[str, int] = Field(description="batch sizes this request was part of, encoder cache use")


@dataclass
class Job:
    """A checked request: segments are text or raw image bytes, every parameter resolved."""

    segments: list
    negative_prompt: str | None
    num_images: int
    steps: int
    guidance_scale: float
    scheduler: str
    seed: int
    height: int | None
    width: int | None
    control_image: bytes | None
    control_scale: float
    adapter: str | None
    response_format: str


def _between(name: str, value, low, high, hint: str = "") -> None:
    if not low <= value <= high:
        raise RequestError(400, f"{name} must be between {low} and {high} (got {value}){hint}")


def _segments(request: GenerateRequest, images: list, limits: Limits) -> list:
    """Interleaved segments, `images` (every image of the request in order of appearance,
    already decoded from base64) put in place."""
    from kosmos_g.models.prompt import parse_prompt

    if isinstance(request.prompt, str):
        text_chars = len(request.prompt)
        try:
            segments = parse_prompt(request.prompt, images)
        except ValueError as error:  # placeholder count != image count
            raise RequestError(400, f"prompt: {error}") from None
    else:
        if request.images:
            raise RequestError(400, "images: with a segment-list prompt, put images inside the prompt as "
                                    "{\"image\": ...} segments, not in `images`")
        text_chars = sum(len(s.text) for s in request.prompt if isinstance(s, TextSegment))
        uploads = iter(images)
        segments = [s.text.strip() if isinstance(s, TextSegment) else next(uploads) for s in request.prompt]
        segments = [s for s in segments if s != ""]
    if text_chars > limits.max_prompt_chars:
        raise RequestError(400, f"prompt: {text_chars} characters, at most {limits.max_prompt_chars}; shorten it")
    if not segments:
        raise RequestError(400, "prompt is empty: give some text and/or images")
    return segments


def count_images(request: GenerateRequest) -> int:
    inline = 0 if isinstance(request.prompt, str) else sum(isinstance(s, ImageSegment) for s in request.prompt)
    return len(request.images) + inline


def check_image_count(count: int, limits: Limits) -> None:
    if count > limits.max_prompt_images:
        raise RequestError(400, f"too many images: {count} given, at most {limits.max_prompt_images} per prompt")


def _size(name: str, value: int | None, limits: Limits) -> int | None:
    if value is None:
        return None
    _between(name, value, limits.min_side, limits.max_side)
    if value % limits.size_multiple:
        raise RequestError(400, f"{name} must be a multiple of {limits.size_multiple} (got {value})")
    return value


def _scheduler(name: str | None, defaults: Defaults) -> str:
    resolved = canonical_scheduler(name or defaults.scheduler)
    if resolved is None:
        raise RequestError(400, f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULER_NAMES)}")
    return resolved


def _guidance(value: float | None, limits: Limits, defaults: Defaults) -> float:
    value = defaults.guidance_scale if value is None else value
    if not math.isfinite(value):
        raise RequestError(400, "guidance_scale must be a finite number")
    _between("guidance_scale", value, 0.0, limits.max_guidance_scale)
    return float(value)


def _adapter(name: str | None, config: ServeConfig) -> str | None:
    if not name:
        return None
    if not config.model.lora_prefix:
        raise RequestError(400, "lora: this server has no LoRA adapters configured; leave `lora` out")
    if not ADAPTER_NAME.match(name):
        raise RequestError(400, "lora: adapter names are 1-64 letters, digits, '.', '_' or '-' "
                                "(a name, not a path or URL)")
    return name


def to_job(request: GenerateRequest, images: list, control_image: bytes | None,
           config: ServeConfig, wants_png: bool) -> Job:
    """Check `request` against the configured limits; RequestError(400) names what to fix."""
    limits, defaults = config.limits, config.defaults
    segments = _segments(request, images, limits)
    negative = (request.negative_prompt or "").strip() or None
    if negative and len(negative) > limits.max_prompt_chars:
        raise RequestError(400, f"negative_prompt: at most {limits.max_prompt_chars} characters")
    num_images = defaults.num_images if request.num_images is None else request.num_images
    _between("num_images", num_images, 1, limits.max_num_images)
    steps = defaults.steps if request.steps is None else request.steps
    _between("steps", steps, limits.min_steps, limits.max_steps)
    seed = secrets.randbelow(limits.max_seed + 1) if request.seed is None else request.seed
    _between("seed", seed, 0, limits.max_seed)
    if not math.isfinite(request.control_scale):
        raise RequestError(400, "control_scale must be a finite number")
    _between("control_scale", request.control_scale, 0.0, 5.0)
    if control_image is not None and not config.model.controlnet_uri:
        raise RequestError(400, "control_image: this server has no ControlNet configured; leave it out")
    response_format = request.response_format or ("png" if wants_png else "json")
    if response_format == "png" and num_images != 1:
        raise RequestError(400, "image/png returns exactly one image: set num_images=1 or ask for JSON")
    return Job(
        segments=segments, negative_prompt=negative, num_images=num_images, steps=steps,
        guidance_scale=_guidance(request.guidance_scale, limits, defaults),
        scheduler=_scheduler(request.scheduler, defaults), seed=seed,
        height=_size("height", request.height, limits), width=_size("width", request.width, limits),
        control_image=control_image, control_scale=float(request.control_scale),
        adapter=_adapter(request.lora, config), response_format=response_format,
    )
