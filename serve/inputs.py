"""Untrusted input -> checked bytes: request bodies, base64, images.

Everything here fails with `RequestError` (a 4xx) naming the field and what to fix.
Images only ever come inline (base64 or multipart): a string that looks like a URL is
refused, never fetched.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import re
import warnings
from dataclasses import dataclass, field

from PIL import Image

from kosmos_g.serve.messages import ImageInput, RequestError

IMAGE_FORMATS = ["PNG", "JPEG", "WEBP", "GIF", "BMP"]
_DATA_URL = re.compile(r"^data:image/[a-z0-9.+-]+;base64,", re.IGNORECASE)
_URL = re.compile(r"^[a-z][a-z0-9+.-]*://", re.IGNORECASE)


@dataclass
class RawRequest:
    """A parsed body: the scalar fields plus image payloads (base64 strings or bytes)."""

    fields: dict
    images: list = field(default_factory=list)  # multipart uploads for `images`, in order
    control_image: bytes | None = None


async def read_body(stream, content_length: str | None, limit: int, drain_limit: int | None = None) -> bytes:
    """The whole body, refusing (413) anything over `limit` bytes, declared or streamed.

    Most clients (urllib, requests, many SDKs) send the whole body before they read the
    answer; a server that answers and closes early makes them see a connection reset instead
    of the 413. So an oversized body is read and discarded, up to `drain_limit` bytes (default
    4 x `limit`), before the 413 is raised; only beyond that is the connection given up."""
    too_large = RequestError(413, f"request body over the {limit} byte limit; send fewer or smaller images")
    drain_limit = max(limit, drain_limit if drain_limit is not None else 4 * limit)
    declared = None
    if content_length is not None:
        try:
            declared = int(content_length)
        except ValueError:
            raise RequestError(400, "invalid Content-Length header") from None
        if declared > drain_limit:
            raise too_large  # too big even to discard: answer now
    chunks, size = [], 0
    async for chunk in stream:
        size += len(chunk)
        if size > drain_limit:
            raise too_large
        if size <= limit and (declared is None or declared <= limit):
            chunks.append(chunk)
    if size > limit or (declared is not None and declared > limit):
        raise too_large
    return b"".join(chunks)


def parse_json(body: bytes) -> RawRequest:
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise RequestError(400, f"body is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise RequestError(400, "body must be a JSON object")
    return RawRequest(fields=data)


async def parse_form(form) -> RawRequest:
    """A starlette FormData: `images` / `control_image` may be files or base64 text."""
    fields: dict = {}
    images: list = []
    control = None
    for key, value in form.multi_items():
        is_file = hasattr(value, "read")
        if key == "images":
            images.append(await value.read() if is_file else value)
        elif key == "control_image":
            control = await value.read() if is_file else value
        elif is_file:
            raise RequestError(400, f"{key}: only `images` and `control_image` may be file uploads")
        elif key in fields:
            raise RequestError(400, f"{key}: given more than once")
        else:
            fields[key] = value
    if isinstance(control, str):
        fields["control_image"] = control
        control = None
    return RawRequest(fields=fields, images=images, control_image=control)


def decode_base64(value: str, where: str, max_bytes: int) -> bytes:
    text = value.strip()
    if _URL.match(text):
        raise RequestError(400, f"{where}: URLs are never fetched; send the image itself (base64 or multipart)")
    text = _DATA_URL.sub("", text)
    # base64 is 4/3 the size: refuse oversized payloads before decoding them.
    if len(text) > (max_bytes + 2) // 3 * 4 + 4:
        raise RequestError(413, f"{where}: image over the {max_bytes} byte limit; downscale or recompress it")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(400, f"{where}: not valid base64 (standard alphabet, padded)") from None


def open_image(data: bytes, max_pixels: int | None) -> Image.Image:
    """Decode an upload to RGB, checking the pixel count from the header before decoding."""
    with warnings.catch_warnings():
        # PIL's own bomb check only warns below 2x its limit; ours is explicit and lower.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
        except Image.DecompressionBombError:
            raise RequestError(413, f"image over the {max_pixels} pixel limit; downscale it") from None
        width, height = image.size
        if max_pixels is not None and width * height > max_pixels:
            raise RequestError(413, f"image is {width}x{height}: over the {max_pixels} pixel limit; downscale it")
        image.load()
    return image.convert("RGB")


def decode_image(data: bytes, max_pixels: int | None = None) -> Image.Image:
    """`open_image` for bytes the ingress already checked (inside replicas)."""
    return open_image(data, max_pixels)


def check_image(data: bytes, where: str, max_bytes: int, max_pixels: int) -> bytes:
    """`data` if it is a decodable image within the limits; else a RequestError for `where`."""
    if len(data) > max_bytes:
        raise RequestError(413, f"{where}: image over the {max_bytes} byte limit; downscale or recompress it")
    if not data:
        raise RequestError(400, f"{where}: empty image")
    try:
        open_image(data, max_pixels)
    except RequestError as error:
        raise RequestError(error.status, f"{where}: {error.message}") from None
    except Exception:  # PIL raises many types (UnidentifiedImageError, OSError, SyntaxError, ...)
        raise RequestError(400, f"{where}: not a decodable image ({', '.join(IMAGE_FORMATS)})") from None
    return data


def image_input(data: bytes) -> ImageInput:
    return ImageInput(digest=hashlib.sha256(data).hexdigest(), data=data)


def image_bytes(value, where: str, max_bytes: int, max_pixels: int) -> bytes:
    """An image payload (base64 text or uploaded bytes) checked and returned as bytes."""
    if isinstance(value, str):
        value = decode_base64(value, where, max_bytes)
    elif not isinstance(value, (bytes, bytearray)):
        raise RequestError(400, f"{where}: expected a base64 string")
    return check_image(bytes(value), where, max_bytes, max_pixels)
