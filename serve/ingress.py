"""HTTP ingress (FastAPI on Ray Serve): checks requests, calls the encoder, then the denoiser.

Every problem with a request becomes a 4xx whose `detail` says what to fix; only a
failure of the service itself is a 5xx, and no request can take the service down.
Images arrive inline (JSON base64 or multipart uploads); no URL is ever fetched.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import logging
import os
import time
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from ray import serve

from kosmos_g.serve import inputs
from kosmos_g.serve.config import ServeConfig
from kosmos_g.serve.messages import SCHEDULER_NAMES, DenoiseRequest, EncodeRequest, RequestError
from kosmos_g.serve.schemas import (
    GenerateRequest,
    GenerateResponse,
    ImageSegment,
    Job,
    check_image_count,
    count_images,
    to_job,
)

log = logging.getLogger("ray.serve")
api = FastAPI(
    title="Kosmos-G",
    description="Images from interleaved text-and-image prompts (Kosmos-G on Stable Diffusion's U-Net).",
    version="1",
)
_MULTIPART_FIELDS = {
    "prompt": {"type": "string"},
    "images": {"type": "array", "items": {"type": "string", "format": "binary"}},
    "control_image": {"type": "string", "format": "binary"},
    **{name: {"type": "string"} for name in ("negative_prompt", "scheduler", "lora", "response_format")},
    **{name: {"type": "integer"} for name in ("num_images", "steps", "seed", "height", "width")},
    **{name: {"type": "number"} for name in ("guidance_scale", "control_scale")},
}
_GENERATE_DOC = {
    "requestBody": {"required": True, "content": {
        "application/json": {"schema": {"$ref": "#/components/schemas/GenerateRequest"}},
        "multipart/form-data": {"schema": {"type": "object", "required": ["prompt"], "properties": _MULTIPART_FIELDS}},
    }},
}
_ERRORS = {code: {"description": text} for code, text in [
    (400, "a parameter is out of range or inconsistent"), (401, "missing or wrong API key"),
    (404, "unknown LoRA adapter"), (413, "payload or image too large"), (415, "unsupported content type"),
    (422, "a field has the wrong type")]}


def _api_key(setting: str | None) -> str | None:
    """`http.api_key`: the key itself, or `env:NAME` to read it from the replica's environment
    (so that a Serve config YAML need not hold the secret)."""
    if setting and setting.startswith("env:"):
        value = os.environ.get(setting[4:])
        if not value:
            raise RuntimeError(f"http.api_key names ${setting[4:]}, which is not set in the ingress replica")
        return value
    return setting or None


def _denoise_request(job: Job, conditioning) -> DenoiseRequest:
    return DenoiseRequest(
        conditioning=conditioning, num_images=job.num_images, steps=job.steps,
        guidance_scale=job.guidance_scale, scheduler=job.scheduler, seed=job.seed, height=job.height,
        width=job.width, control_image=job.control_image, control_scale=job.control_scale, adapter=job.adapter)


def _describe(error: ValidationError) -> str:
    problems = []
    for item in error.errors()[:5]:
        where = ".".join(str(part) for part in item["loc"]) or "body"
        problems.append(f"{where}: {item['msg']}")
    return "; ".join(problems)


def _request_error(error: BaseException) -> RequestError | None:
    """The RequestError behind an exception, also when Ray wrapped one raised in a replica."""
    while error is not None:
        if isinstance(error, RequestError):
            return error
        error = getattr(error, "cause", None) or error.__cause__
    return None


def _detail_body(status: int, message: str) -> dict:
    return {"detail": message}


def _error_response(error: BaseException, body=_detail_body) -> JSONResponse:
    """Request problems become their 4xx; anything else a logged 5xx (never a traceback)."""
    problem = _request_error(error)
    if problem is not None:
        headers = {"WWW-Authenticate": "Bearer"} if problem.status == 401 else None
        return JSONResponse(body(problem.status, problem.message), status_code=problem.status, headers=headers)
    log.exception("request failed", exc_info=error)
    status = 503 if type(error).__name__ in ("ActorDiedError", "RayActorError", "ActorUnavailableError") else 500
    return JSONResponse(body(status, "internal error; the request was not completed, please retry"),
                        status_code=status)


async def _answer(work, body=_detail_body) -> Response | dict:
    """Run a handler; map request problems to 4xx and anything else to a logged 5xx."""
    try:
        return await work
    except Exception as error:
        return _error_response(error, body)


def _sse(event: str, data: dict) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


def _openapi() -> dict:
    """FastAPI's schema plus GenerateRequest, which the raw-body handler cannot declare itself."""
    if api.openapi_schema:
        return api.openapi_schema
    schema = get_openapi(title=api.title, version=api.version, description=api.description, routes=api.routes)
    request_schema = GenerateRequest.model_json_schema(ref_template="#/components/schemas/{model}")
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components.update(request_schema.pop("$defs", {}))
    components["GenerateRequest"] = request_schema
    api.openapi_schema = schema
    return schema


api.openapi = _openapi


# Serve pickles a deployment class when it is decorated: every helper it uses
# must already exist, so the class comes last in this module.
@serve.deployment(name="Ingress")
@serve.ingress(api)
class Ingress:
    def __init__(self, encoder, denoiser, config: ServeConfig, model_label: str):
        self.encoder = encoder
        self.denoiser = denoiser
        self.config = config
        self.model_label = model_label
        self.api_key = _api_key(config.http.api_key)
        self.playground_html = (Path(__file__).parent / "playground.html").read_text(encoding="utf-8")
        # The prompt parser imports torch: pay for that now, not in the first request.
        import kosmos_g.models.prompt  # noqa: F401

    @api.get("/healthz", summary="liveness")
    async def healthz(self) -> dict:
        return {"status": "ok", "model": self.model_label}

    @api.get("/v1/models", summary="the served model, its limits and options")
    async def models(self, request: Request):
        return await _answer(self._models(request))

    @api.get("/v1/stats", summary="batch sizes and cache use (of the replicas that answer)")
    async def stats(self, request: Request):
        return await _answer(self._stats(request))

    @api.post("/v1/generate", summary="generate images", openapi_extra=_GENERATE_DOC,
              responses={200: {"model": GenerateResponse, "content": {"image/png": {}},
                               "description": "JSON, or the PNG itself for one image"}, **_ERRORS})
    async def generate(self, request: Request):
        return await _answer(self._generate(request))

    @api.post("/v1/generate/stream", summary="generate images, with progress as server-sent events",
              openapi_extra=_GENERATE_DOC,
              responses={200: {"content": {"text/event-stream": {}},
                               "description": "events `stage`, `step` ({step, steps}) and finally `result` "
                                              "(the /v1/generate JSON) or `error` ({status, detail})"},
                         **_ERRORS})
    async def generate_stream(self, request: Request):
        started = time.perf_counter()
        job = await _answer(self._checked_job(request))
        if isinstance(job, Response):  # the request itself was refused: a plain 4xx
            return job
        if job.response_format == "png":
            return JSONResponse({"detail": "response_format: the stream sends JSON events; leave it out"},
                                status_code=400)
        return StreamingResponse(self._events(job, started), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @api.post("/v1/images/generations", summary="OpenAI-style image generation (see serve/compat.py)",
              responses={200: {"description": "{created, data: [{b64_json}], seed, model, timings}"}})
    async def images_generations(self, request: Request):
        from kosmos_g.serve.compat import error_body

        return await _answer(self._openai_images(request), error_body)

    @api.get("/", summary="the web playground", response_class=HTMLResponse)
    async def playground(self) -> HTMLResponse:
        return HTMLResponse(self.playground_html)

    # ------------------------------------------------------------------ handlers
    async def _models(self, request: Request) -> dict:
        self._authorize(request)
        from kosmos_g.serve.adapters import list_adapters

        encoder, denoiser = await asyncio.gather(self.encoder.info.remote(), self.denoiser.info.remote())
        adapters = await asyncio.to_thread(list_adapters, self.config.model.lora_prefix)
        limits = self.config.limits
        return {"data": [{
            "id": self.model_label, "condition_shape": encoder["condition_shape"],
            "native_size": denoiser["native_size"], "controlnet": denoiser["controlnet"],
            "lora_adapters": adapters, "schedulers": list(SCHEDULER_NAMES),
            "defaults": vars(self.config.defaults), "limits": vars(limits),
            "runtime": {"encoder": encoder, "denoiser": denoiser},  # of the replicas that answered
        }]}

    async def _stats(self, request: Request) -> dict:
        self._authorize(request)
        encoder, denoiser = await asyncio.gather(self.encoder.get_stats.remote(), self.denoiser.get_stats.remote())
        return {"encoder": encoder, "denoiser": denoiser}

    async def _generate(self, request: Request) -> Response:
        started = time.perf_counter()
        job = await self._checked_job(request)
        payload, result = await self._run_job(job, started)
        if job.response_format == "png":
            return Response(result.images[0], media_type="image/png", headers={
                "X-Kosmos-Seed": str(job.seed), "X-Kosmos-Model": self.model_label,
                "X-Kosmos-Timings": json.dumps(payload.timings), "X-Kosmos-Batching": json.dumps(payload.batching),
                "Server-Timing": ", ".join(f"{k[:-2]};dur={v * 1000:.1f}" for k, v in payload.timings.items()),
            })
        return JSONResponse(payload.model_dump())

    async def _events(self, job: Job, started: float):
        """Server-sent events of one generation: stage, step (one per denoising step), then
        result (the /v1/generate JSON) or error ({status, detail})."""
        marks = {"started": started, "checked": time.perf_counter()}
        try:
            yield _sse("stage", {"stage": "encoding"})
            conditioning = await self.encoder.encode.remote(EncodeRequest(job.segments, job.negative_prompt))
            marks["encoded"] = time.perf_counter()
            yield _sse("stage", {"stage": "denoising", "steps": job.steps})
            result = None
            stream = self._denoiser_for(job).options(stream=True).generate_stream.remote(
                _denoise_request(job, conditioning))
            async for item in stream:
                if isinstance(item, dict):
                    yield _sse("step", item)
                else:
                    result = item
            marks["done"] = time.perf_counter()
            yield _sse("result", self._payload(job, conditioning, result, marks).model_dump())
        except Exception as error:
            response = _error_response(error)
            yield _sse("error", {"status": response.status_code, **json.loads(response.body)})

    async def _openai_images(self, request: Request) -> dict:
        from kosmos_g.serve import compat

        started = time.perf_counter()
        self._authorize(request)
        body = await self._read_body(request)
        try:
            openai_request = compat.ImagesGenerationsRequest.model_validate(inputs.parse_json(body).fields)
        except ValidationError as error:
            raise RequestError(422, _describe(error)) from None
        fields = compat.generate_fields(openai_request, self.model_label)
        job = await asyncio.to_thread(self._check, inputs.RawRequest(fields=fields), False)
        payload, _ = await self._run_job(job, started)
        return compat.images_response(payload, int(time.time()))

    # ------------------------------------------------------------------ helpers
    async def _checked_job(self, request: Request) -> Job:
        """Authorize, read (size-bounded), parse and check one generation request."""
        self._authorize(request)
        raw = await self._parse(request, await self._read_body(request))
        accept = request.headers.get("accept", "")
        wants_png = "image/png" in accept and "application/json" not in accept
        return await asyncio.to_thread(self._check, raw, wants_png)

    async def _read_body(self, request: Request) -> bytes:
        limits = self.config.limits
        return await inputs.read_body(request.stream(), request.headers.get("content-length"),
                                      limits.max_payload_bytes, limits.max_discard_bytes)

    async def _run_job(self, job: Job, started: float) -> tuple[GenerateResponse, object]:
        """Encode, then denoise: the response payload and the denoiser's result."""
        marks = {"started": started, "checked": time.perf_counter()}
        conditioning = await self.encoder.encode.remote(EncodeRequest(job.segments, job.negative_prompt))
        marks["encoded"] = time.perf_counter()
        result = await self._denoiser_for(job).generate.remote(_denoise_request(job, conditioning))
        marks["done"] = time.perf_counter()
        return self._payload(job, conditioning, result, marks), result

    def _denoiser_for(self, job: Job):
        return self.denoiser.options(multiplexed_model_id=job.adapter) if job.adapter else self.denoiser

    def _payload(self, job: Job, conditioning, result, marks: dict) -> GenerateResponse:
        timings = {
            "parse_s": marks["checked"] - marks["started"], "encode_s": marks["encoded"] - marks["checked"],
            "encoder_compute_s": conditioning.compute_s, "denoiser_queue_s": result.queue_s,
            "denoise_s": result.denoise_s, "vae_decode_s": result.decode_s,
            "denoiser_total_s": marks["done"] - marks["encoded"], "total_s": marks["done"] - marks["started"],
        }
        batching = {
            "encoder_batch_size": conditioning.batch_size, "denoiser_batch_size": result.batch_size,
            "shared_unet_requests": result.group_size, "cache_hits": conditioning.cache_hits,
            "cache_misses": conditioning.cache_misses,
        }
        return GenerateResponse(
            images=[{"png_base64": base64.b64encode(png).decode("ascii")} for png in result.images],
            seed=job.seed, width=result.width, height=result.height, model=self.model_label,
            timings={k: round(v, 4) for k, v in timings.items()}, batching=batching)

    def _authorize(self, request: Request) -> None:
        key = self.api_key
        if not key:
            return
        given = request.headers.get("x-api-key", "")
        authorization = request.headers.get("authorization", "")
        if not given and authorization.lower().startswith("bearer "):
            given = authorization[7:].strip()
        if not given or not hmac.compare_digest(given.encode(), key.encode()):
            raise RequestError(401, "missing or wrong API key: send it as `X-API-Key: <key>` "
                                    "or `Authorization: Bearer <key>`")

    async def _parse(self, request: Request, body: bytes) -> inputs.RawRequest:
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type in ("application/json", ""):
            return inputs.parse_json(body)
        if content_type not in ("multipart/form-data", "application/x-www-form-urlencoded"):
            raise RequestError(415, f"unsupported Content-Type {content_type!r}: send application/json "
                                    "or multipart/form-data")

        async def replay():  # the body was already read (and size-checked) above
            return {"type": "http.request", "body": body, "more_body": False}

        limits = self.config.limits
        try:
            form = await Request(request.scope, replay).form(
                max_files=limits.max_prompt_images + 1, max_fields=64, max_part_size=limits.max_payload_bytes)
        except Exception as error:  # starlette's MultiPartException and HTTPException
            raise RequestError(400, f"malformed form body: {getattr(error, 'detail', None) or error}") from None
        try:
            return await inputs.parse_form(form)
        finally:
            await form.close()

    def _check(self, raw: inputs.RawRequest, wants_png: bool) -> Job:
        """Types (pydantic), image count, every image, then the value limits."""
        try:
            request = GenerateRequest.model_validate(raw.fields)
        except ValidationError as error:
            raise RequestError(422, _describe(error)) from None
        limits = self.config.limits
        check_image_count(count_images(request) + len(raw.images), limits)
        if isinstance(request.prompt, str):
            sources = [(f"images[{i}]", v) for i, v in enumerate(raw.images or request.images)]
        else:
            sources = [(f"prompt[{i}].image", s.image) for i, s in enumerate(request.prompt)
                       if isinstance(s, ImageSegment)]
        images = [inputs.image_input(inputs.image_bytes(value, where, limits.max_image_bytes,
                                                        limits.max_image_pixels))
                  for where, value in sources]
        control = raw.control_image if raw.control_image is not None else request.control_image
        if control is not None:
            control = inputs.image_bytes(control, "control_image", limits.max_image_bytes, limits.max_image_pixels)
        return to_job(request, images, control, self.config, wants_png)
