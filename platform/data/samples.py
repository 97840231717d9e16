"""A bundled sample set: the photographs that ship inside scikit-image (`skimage.data`),
with hand-written captions, as shards of all three sources.

- captions: every photograph with its caption;
- compositional: six photographs whose entities were annotated by hand (a box per
  entity, read off the picture; the mask is the ellipse inscribed in the box), so the
  entity crops are meaningful without any segmentation model;
- editing: real pixel edits (grayscale, mirror, colour shifts, blur, ...) of six
  photographs with the matching instruction and edited caption.

Everything is built in-process in well under a second and written with
`shards.write_rows`, so every test and the demo get real images without a download.
"""

from __future__ import annotations

import functools
from typing import Callable

import numpy as np
from PIL import Image, ImageFilter, ImageOps

from kosmos_g.platform.data import imaging, shards
from kosmos_g.platform import storage

# Longest side of the stored photographs: small enough to keep the sample set (and the
# tests that stream it) fast, large enough for 224 px CLIP crops and 256 px VAE crops.
MAX_SIDE = 512
CROP_SIZE = 256


def _loader(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        from skimage import data

        if name == "motorcycle":
            return data.stereo_motorcycle()[0]
        return getattr(data, name)()

    return load


# name -> caption. Only pictures that ship with scikit-image (no network fetch).
CAPTIONS: dict[str, str] = {
    "astronaut": "an astronaut in an orange spacesuit holding a helmet next to a flag and a space shuttle model",
    "chelsea": "a close-up of a tabby cat with green eyes",
    "coffee": "a cup of coffee on a red saucer with a spoon on a wooden table",
    "rocket": "a rocket on a launch pad at dusk beside a tall launch tower",
    "motorcycle": "a red motorcycle parked in a garage in front of shelves full of boxes",
    "camera": "a man in a dark coat filming with a camera on a tripod in a field",
    "coins": "rows of old silver coins on a dark background",
    "moon": "the cratered surface of the moon in black and white",
    "hubble_deep_field": "a deep space photograph full of distant galaxies",
    "immunohistochemistry": "a microscope image of tissue stained brown and blue",
    "retina": "a photograph of the retina of a human eye with red blood vessels",
    "page": "a scanned page of printed text about image segmentation",
    "clock": "a blurred photograph of a clock on a grey wall",
    "brick": "a close-up of a brick wall",
    "grass": "a close-up of a lawn of grass in black and white",
    "gravel": "a close-up of grey gravel",
    "colorwheel": "a colour wheel with a rainbow of hues",
}

# name -> [(entity text as it appears in the caption, box x0, y0, x1, y1 in original pixels)]
ENTITIES: dict[str, list[tuple[str, tuple[int, int, int, int]]]] = {
    "astronaut": [("astronaut", (30, 10, 360, 512)), ("helmet", (275, 345, 512, 512)),
                  ("flag", (0, 0, 100, 512)), ("space shuttle model", (350, 0, 475, 285))],
    "chelsea": [("tabby cat", (0, 0, 420, 300)), ("green eyes", (135, 80, 350, 170))],
    "coffee": [("cup of coffee", (170, 15, 420, 305)), ("red saucer", (75, 70, 480, 390)),
               ("spoon", (320, 65, 425, 325))],
    "rocket": [("rocket", (295, 125, 345, 410)), ("launch tower", (555, 0, 640, 427))],
    "motorcycle": [("red motorcycle", (90, 100, 690, 450)), ("shelves", (340, 0, 720, 300)),
                   ("boxes", (525, 20, 700, 280))],
    "camera": [("man", (0, 60, 330, 512)), ("camera", (255, 135, 330, 195)),
               ("tripod", (225, 190, 410, 512))],
}


def _warmer(image: Image.Image) -> Image.Image:
    array = np.asarray(image, dtype=np.float32) * np.array([1.2, 1.0, 0.75], dtype=np.float32)
    return Image.fromarray(np.clip(array, 0, 255).astype(np.uint8))


def _bluer(image: Image.Image) -> Image.Image:
    array = np.asarray(image, dtype=np.float32) * np.array([0.75, 0.95, 1.25], dtype=np.float32)
    return Image.fromarray(np.clip(array, 0, 255).astype(np.uint8))


def _darker(image: Image.Image) -> Image.Image:
    return Image.fromarray((np.asarray(image, dtype=np.float32) * 0.45).astype(np.uint8))


# edit name -> (instruction, suffix of the edited caption, pixel edit)
EDITS: dict[str, tuple[str, str, Callable[[Image.Image], Image.Image]]] = {
    "grayscale": ("make it black and white", "in black and white", lambda im: ImageOps.grayscale(im).convert("RGB")),
    "mirror": ("mirror the picture from left to right", "mirrored", ImageOps.mirror),
    "warmer": ("make the colours warmer", "in warm orange tones", _warmer),
    "bluer": ("give it a cold blue tint", "with a cold blue tint", _bluer),
    "invert": ("invert the colours", "as a colour negative", ImageOps.invert),
    "blur": ("make it blurry", "out of focus", lambda im: im.filter(ImageFilter.GaussianBlur(4))),
    "upside_down": ("turn it upside down", "upside down", lambda im: im.rotate(180)),
    "darker": ("make it much darker", "at night", _darker),
}
EDITED_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "motorcycle", "camera")


@functools.lru_cache(maxsize=None)
def photo(name: str) -> Image.Image:
    """The original photograph (RGB, full size) as shipped by scikit-image."""
    return Image.fromarray(_loader(name)()).convert("RGB")


def _stored(name: str) -> tuple[Image.Image, float]:
    """The photograph as stored in the samples (long side <= MAX_SIDE) and its scale."""
    original = photo(name)
    stored = imaging.limit_side(original, MAX_SIDE)
    return stored, stored.size[0] / original.size[0]


def caption_rows() -> list[dict]:
    rows = []
    for name, caption in CAPTIONS.items():
        image, _ = _stored(name)
        rows.append({"key": f"sample-{name}", "caption": caption, "image": imaging.encode_image(image),
                     "width": image.size[0], "height": image.size[1]})
    return rows


def compositional_rows() -> list[dict]:
    rows = []
    for name, entities in ENTITIES.items():
        image, scale = _stored(name)
        caption = CAPTIONS[name]
        records = []
        for text, box in entities:
            start = caption.index(text)
            scaled = tuple(int(round(v * scale)) for v in box)
            mask = imaging.ellipse_mask(image.size, scaled)
            crop, crop_nobg, tight = imaging.entity_crops(image, mask, CROP_SIZE)
            records.append({
                "text": text, "start": start, "end": start + len(text), "box": list(tight),
                "area": float(mask.mean()), "crop": imaging.encode_image(crop),
                "crop_nobg": imaging.encode_image(crop_nobg),
            })
        records.sort(key=lambda record: record["start"])
        rows.append({"key": f"sample-{name}", "caption": caption, "image": imaging.encode_image(image),
                     "width": image.size[0], "height": image.size[1], "entities": records})
    return rows


def editing_rows() -> list[dict]:
    rows = []
    edit_names = list(EDITS)
    for index, name in enumerate(EDITED_PHOTOS):
        image, _ = _stored(name)
        source = imaging.encode_image(image)
        for edit_name in (edit_names[(2 * index) % len(edit_names)], edit_names[(2 * index + 1) % len(edit_names)]):
            instruction, suffix, edit = EDITS[edit_name]
            rows.append({
                "key": f"sample-{name}-{edit_name}", "input_caption": CAPTIONS[name], "input_image": source,
                "instruction": instruction, "edited_image": imaging.encode_image(edit(image)),
                "edited_caption": f"{CAPTIONS[name]}, {suffix}",
            })
    return rows


def write_sample_shards(prefix: str) -> dict[str, str]:
    """Write captions, compositional and editing sample shards under `prefix`;
    returns {"captions": ..., "compositional": ..., "editing": ...} shard prefixes."""
    storage.ensure_bucket(prefix)
    builders = {"captions": caption_rows, "compositional": compositional_rows, "editing": editing_rows}
    prefixes = {}
    for source, build in builders.items():
        target = storage.join(prefix, source)
        shards.write_rows(target, source, build(), producer="kosmos_g.platform.data.samples")
        prefixes[source] = target
    return prefixes


def write_sample_images(prefix: str) -> list[str]:
    """The sample photographs as JPEG files `<prefix>/<name>.jpg`: the input of the
    construction pipeline's demo (`pipelines/construct.py --preset tiny`)."""
    storage.ensure_bucket(prefix)
    uris = []
    for name in CAPTIONS:
        image, _ = _stored(name)
        uri = storage.join(prefix, f"{name}.jpg")
        storage.write_bytes(uri, imaging.encode_image(image))
        uris.append(uri)
    return uris
