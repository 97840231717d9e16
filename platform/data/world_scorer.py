"""Reads a miniature-world image back from its pixels: background colour, and each object's
colour and shape. Exact on rendered scenes at 64 and 32 px, and on scenes resized from 64 to
32 px as the decoder is trained on them (`models.images.vae_preprocess`; 0.998 of objects, from 0.905
before lines of resampling ringing were trimmed); meant for generated images too.

Every pixel is assigned its nearest palette colour; the background is the most common colour on
the border; objects are the connected regions of other colours (small specks ignored), a region
where objects touch split into one object per one-colour part (`_split_touching`);
an object's colour is its region's majority colour and its shape follows from how much of its
bounding box it fills (square ~1, circle ~0.79, star ~0.35) and, for a triangle (whose fill
meets a star's or a circle's once downsampled), from its rows: a base spanning the box below a
narrow apex; a circle is symmetric and a star stands on two points. Before that, an outermost row
or column that is nearly empty beside a nearly full one is trimmed off the box: resampling rings
a square's or a triangle's straight edge with a few stray pixels, which would stretch the box (and
read a square as a circle); no shape of the world has such a line.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage

from kosmos_g.platform.data.world import COLOURS, PALETTE

PALETTE_RGB = np.array([PALETTE[c] for c in COLOURS], dtype=np.float32)
SQUARE_FILL, CIRCLE_FILL = 0.92, 0.60  # fill ratios of the bounding box: squares, circles
TRIANGLE_BASE = 0.6  # share of the bottom rows a triangle's base covers (a star's feet: less)
# An outermost line of a region's box this empty, beside one this full, is resampling's ringing
# along a straight edge (`_trim_ringing`): a circle's outer rows hold ~40% beside ~60-70%, a star's
# points and feet are narrow beside narrow lines.
RINGING_LINE, FULL_LINE = 0.3, 0.75
# A one-colour part of a region counts as an object of its own when something of it is left after
# this many erosions: nothing of a band up to 4 px wide is (blending leaves such bands along edges:
# yellow on red reads orange), something of a 10 px object (the world's smallest at 32 px) is.
CORE_EROSIONS = 2


@dataclass(frozen=True)
class ReadObject:
    colour: str
    shape: str
    area: float  # fraction of the image


@dataclass(frozen=True)
class Reading:
    background: str
    objects: tuple[ReadObject, ...]


def palette_labels(image) -> np.ndarray:
    """(H, W) index of the nearest palette colour of every pixel."""
    rgb = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.float32)
    distances = ((rgb[:, :, None, :] - PALETTE_RGB[None, None]) ** 2).sum(-1)
    return distances.argmin(-1)


def _trim_ringing(region: np.ndarray) -> np.ndarray:
    """The region's box without outermost rows / columns of ringing (at most two a side)."""
    for _ in range(2):
        before = region.shape
        for axis in (0, 1):
            lines = region if axis == 0 else region.T
            if lines.shape[0] > 3 and lines[0].mean() <= RINGING_LINE and lines[1].mean() >= FULL_LINE:
                lines = lines[1:]
            if lines.shape[0] > 3 and lines[-1].mean() <= RINGING_LINE and lines[-2].mean() >= FULL_LINE:
                lines = lines[:-1]
            region = lines if axis == 0 else lines.T
        if region.shape == before:
            break
    return region


def shape_of(region: np.ndarray) -> str:
    """Shape of a (h, w) bool region cropped to its bounding box."""
    region = _trim_ringing(region)
    fill = region.mean()
    if fill >= SQUARE_FILL:
        return "square"
    rows = max(1, region.shape[0] // 6)
    top, bottom = region[:rows].mean(), region[-rows:].mean()
    if bottom >= TRIANGLE_BASE and bottom - top >= 0.3:  # a base below an apex
        return "triangle"
    return "circle" if fill >= CIRCLE_FILL else "star"


def _split_touching(regions: np.ndarray, labels: np.ndarray, min_pixels: float) -> np.ndarray:
    """Relabel `regions` so that a region holding two or more one-colour parts with a core of
    their own (objects of different colours drawn touching: the world keeps a gap between them,
    a generated image need not) becomes one region per part, every pixel of it going to the
    nearest part. Regions with one such part, every region of a rendered scene, stay whole."""
    out, next_label = regions.copy(), int(regions.max()) + 1
    for index, box in enumerate(ndimage.find_objects(regions), start=1):
        region = regions[box] == index
        parts = np.zeros(region.shape, np.int32)
        found = 0
        for colour in np.unique(labels[box][region]):
            pieces, n = ndimage.label(region & (labels[box] == colour))
            for piece in range(1, n + 1):
                mask = pieces == piece
                if mask.sum() >= min_pixels and ndimage.binary_erosion(mask, iterations=CORE_EROSIONS).any():
                    found += 1
                    parts[mask] = found
        if found < 2:
            continue
        # Each pixel of the region (blended edges included) to its nearest part.
        _, (rows, cols) = ndimage.distance_transform_edt(parts == 0, return_indices=True)
        nearest = parts[rows, cols]
        window = out[box]
        window[region] = np.where(nearest[region] == 1, index, nearest[region] + next_label - 2)
        next_label += found - 1
    return out


def read_regions(image, min_area: float = 0.015,
                 split_touching: bool = True) -> tuple[str, list[tuple[ReadObject, np.ndarray]]]:
    """(background colour, [(object, full-image bool mask)] left to right); `split_touching`
    False reads touching objects as one (the scorer before 2026-12-05)."""
    labels = palette_labels(image)
    height, width = labels.shape
    border = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
    background = int(np.bincount(border, minlength=len(COLOURS)).argmax())
    regions, _ = ndimage.label(labels != background)
    if split_touching:
        regions = _split_touching(regions, labels, min_area * height * width)
    objects = []
    for index, box in enumerate(ndimage.find_objects(regions), start=1):
        region = regions[box] == index
        area = region.sum() / (height * width)
        if area < min_area:
            continue
        # Edge pixels blend with the background once downsampled (yellow on red reads orange):
        # the colour comes from the region's interior when it has one.
        interior = ndimage.binary_erosion(region)
        core = interior if interior.any() else region
        colour = int(np.bincount(labels[box][core], minlength=len(COLOURS)).argmax())
        objects.append((box[1].start, ReadObject(COLOURS[colour], shape_of(region), float(area)), regions == index))
    objects.sort(key=lambda item: item[0])  # left to right
    return COLOURS[background], [(obj, mask) for _, obj, mask in objects]


def read_scene(image, min_area: float = 0.015, split_touching: bool = True) -> Reading:
    background, objects = read_regions(image, min_area, split_touching)
    return Reading(background, tuple(obj for obj, _ in objects))
