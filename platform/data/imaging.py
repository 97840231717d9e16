"""Image bytes in and out of shards, and the two entity crops of the compositional data.

Shards hold encoded images (JPEG by default); everything here works on PIL images and
boolean masks so the sample builder, the importers and the construction pipeline cut
crops the same way.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


class ImageDecodeError(ValueError):
    """Bytes that are not a decodable image."""


def encode_image(image: Image.Image, fmt: str = "JPEG", quality: int = 95) -> bytes:
    buffer = io.BytesIO()
    image = image.convert("RGB")
    if fmt.upper() in ("JPEG", "JPG"):
        image.save(buffer, format="JPEG", quality=quality)
    else:
        image.save(buffer, format=fmt.upper())
    return buffer.getvalue()


def decode_image(data: bytes | None, min_side: int | None = None) -> Image.Image:
    """RGB image from encoded bytes; raises ImageDecodeError for anything unreadable.

    With `min_side`, JPEGs are decoded at the smallest power-of-two reduction whose
    short side is still >= min_side (libjpeg scales in the DCT domain): several times
    faster when a 1024 px photo only feeds a 224 px encoder."""
    if not data:
        raise ImageDecodeError("empty image bytes")
    try:
        image = Image.open(io.BytesIO(data))
        if min_side and image.format == "JPEG":
            width, height = image.size
            scale = min(width, height) / float(min_side)
            if scale >= 2:
                image.draft("RGB", (max(1, int(width / scale)), max(1, int(height / scale))))
        image.load()
        return image.convert("RGB")
    except Exception as error:  # PIL raises many types (OSError, SyntaxError, ValueError...)
        raise ImageDecodeError(f"cannot decode image: {error}") from error


def image_size(data: bytes) -> tuple[int, int]:
    """(width, height) after fully decoding `data` (so truncated files are caught)."""
    return decode_image(data).size


def limit_side(image: Image.Image, max_side: int) -> Image.Image:
    """Downscale so the long side is at most `max_side` (no upscaling)."""
    width, height = image.size
    if max(width, height) <= max_side:
        return image
    scale = max_side / max(width, height)
    return image.resize((max(1, round(width * scale)), max(1, round(height * scale))), Image.Resampling.BICUBIC)


def ellipse_mask(size: tuple[int, int], box: tuple[int, int, int, int]) -> np.ndarray:
    """Boolean (H, W) mask of the ellipse inscribed in `box` (x0, y0, x1, y1)."""
    width, height = size
    x0, y0, x1, y1 = box
    ys, xs = np.mgrid[0:height, 0:width]
    cx, cy = (x0 + x1) / 2.0, (y0 + y1) / 2.0
    rx, ry = max((x1 - x0) / 2.0, 1.0), max((y1 - y0) / 2.0, 1.0)
    return ((xs + 0.5 - cx) / rx) ** 2 + ((ys + 0.5 - cy) / ry) ** 2 <= 1.0


def mask_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """Tight bounding box (x0, y0, x1, y1), exclusive ends, of a boolean mask; None if empty."""
    rows, cols = np.any(mask, axis=1), np.any(mask, axis=0)
    if not rows.any():
        return None
    y0, y1 = np.argmax(rows), len(rows) - np.argmax(rows[::-1])
    x0, x1 = np.argmax(cols), len(cols) - np.argmax(cols[::-1])
    return int(x0), int(y0), int(x1), int(y1)


def _square_box(box: tuple[int, int, int, int], size: tuple[int, int], margin: float) -> tuple[int, int, int, int]:
    """A square around `box` (grown by `margin` of its side), shifted to stay inside the
    image where possible; it may still extend past the edges of a thin image."""
    width, height = size
    x0, y0, x1, y1 = box
    side = max(x1 - x0, y1 - y0)
    side = int(round(side * (1 + 2 * margin)))
    cx, cy = (x0 + x1) / 2.0, (y0 + y1) / 2.0
    left = int(round(cx - side / 2))
    top = int(round(cy - side / 2))
    left = min(max(left, 0), max(width - side, 0)) if side <= width else (width - side) // 2
    top = min(max(top, 0), max(height - side, 0)) if side <= height else (height - side) // 2
    return left, top, left + side, top + side


def entity_crops(image: Image.Image, mask: np.ndarray, crop_size: int, fill: int = 255,
                 margin: float = 0.05) -> tuple[Image.Image, Image.Image, tuple[int, int, int, int]] | None:
    """(crop with background, crop with the background replaced by `fill`, tight box)
    for one entity mask, both `crop_size` square; None for an empty mask.

    The square is centred on the mask's box so the entity is not distorted; regions past
    the image edge are filled with `fill` in both variants."""
    box = mask_box(mask)
    if box is None:
        return None
    region = _square_box(box, image.size, margin)
    rgb = np.asarray(image.convert("RGB"))
    keep = mask[..., None]
    nobg = np.where(keep, rgb, np.uint8(fill)).astype(np.uint8)
    crops = []
    for array in (rgb, nobg):
        crop = Image.new("RGB", (region[2] - region[0], region[3] - region[1]), (fill, fill, fill))
        crop.paste(Image.fromarray(array), (-region[0], -region[1]))
        crops.append(crop.resize((crop_size, crop_size), Image.Resampling.BICUBIC))
    return crops[0], crops[1], box


def removed_pixels(crop: Image.Image, crop_nobg: Image.Image, tolerance: int = 24) -> np.ndarray:
    """(h, w, 1) bool: where the background of `entity_crops`' second variant was removed, i.e.
    where the two variants differ by more than `tolerance` in some channel (which absorbs JPEG
    noise). Where they agree (the entity, padding past the image edge, a background already of
    the fill colour) nothing was removed."""
    with_bg, without_bg = np.asarray(crop.convert("RGB")), np.asarray(crop_nobg.convert("RGB"))
    if with_bg.shape != without_bg.shape:
        raise ValueError(f"crop variants differ in size: {with_bg.shape} vs {without_bg.shape}")
    difference = np.abs(with_bg.astype(np.int16) - without_bg.astype(np.int16))
    return (difference > tolerance).any(axis=-1, keepdims=True)


def refill_background(crop_nobg: Image.Image, removed: np.ndarray, colour: tuple[int, int, int]) -> Image.Image:
    """The background-removed crop with its `removed` pixels painted `colour`."""
    pixels = np.asarray(crop_nobg.convert("RGB"))
    return Image.fromarray(np.where(removed, np.asarray(colour, np.uint8), pixels).astype(np.uint8))
