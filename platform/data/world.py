"""The miniature world: scenes simple enough to train every stage from scratch on a CPU, and
scored exactly from pixels.

A scene is 64 x 64 RGB: a solid background of one palette colour and one or two objects, each a
shape (circle, square, triangle apex up, five-pointed star) in a palette colour other than the
background's, 20-36 px across, at a random position, never overlapping another object. Captions
read "a red circle on a blue background" or "a red circle and a yellow star on a blue
background". Held-out split: an object of colour index i never appears on background colour
index (i + 3) mod 8 in training data; evaluation puts subjects exactly there. Everything is
deterministic from a seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (240, 210, 40),
    "purple": (140, 60, 180), "orange": (245, 140, 30), "white": (245, 245, 245), "black": (25, 25, 25),
}
COLOURS = tuple(PALETTE)
SHAPES = ("circle", "square", "triangle", "star")
SIZE = 64
MIN_OBJECT, MAX_OBJECT = 20, 36
GAP = 4  # pixels kept free between objects (2 px still, once downsampled to 32)
TRAINING_SCENES = 10_000  # the training data the jobs write when it is missing (seed 0)


def held_out_background(colour: str) -> str:
    """The background an object of `colour` never appears on in training data."""
    return COLOURS[(COLOURS.index(colour) + 3) % len(COLOURS)]


@dataclass(frozen=True)
class WorldObject:
    colour: str
    shape: str
    box: tuple[int, int, int, int]  # left, top, right, bottom (exclusive)

    @property
    def phrase(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    background: str
    objects: tuple[WorldObject, ...]

    @property
    def caption(self) -> str:
        things = " and ".join(f"a {o.phrase}" for o in self.objects)
        return f"{things} on a {self.background} background"

    def render(self, size: int = SIZE) -> Image.Image:
        image = Image.new("RGB", (SIZE, SIZE), PALETTE[self.background])
        draw = ImageDraw.Draw(image)
        for obj in self.objects:
            draw_shape(draw, obj.shape, obj.box, PALETTE[obj.colour])
        return image if size == SIZE else image.resize((size, size), Image.BOX)

    def mask(self, index: int) -> np.ndarray:
        """Exact (SIZE, SIZE) bool mask of object `index` (the segmenter's ground truth)."""
        canvas = Image.new("L", (SIZE, SIZE), 0)
        obj = self.objects[index]
        draw_shape(ImageDraw.Draw(canvas), obj.shape, obj.box, 255)
        return np.asarray(canvas) > 0


def _star(box: tuple[int, int, int, int]) -> list[tuple[float, float]]:
    left, top, right, bottom = box
    radius = (right - left) / 2
    cx, cy = left + radius, top + radius * 1.05  # the star's centroid sits a little low in its box
    inner = radius * 0.382
    points = []
    for k in range(10):
        r = radius if k % 2 == 0 else inner
        angle = -math.pi / 2 + k * math.pi / 5
        points.append((cx + r * math.cos(angle), cy + r * math.sin(angle)))
    return points


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill) -> None:
    left, top, right, bottom = box
    if shape == "circle":
        draw.ellipse((left, top, right - 1, bottom - 1), fill=fill)
    elif shape == "square":
        draw.rectangle((left, top, right - 1, bottom - 1), fill=fill)
    elif shape == "triangle":
        draw.polygon([((left + right - 1) / 2, top), (left, bottom - 1), (right - 1, bottom - 1)], fill=fill)
    elif shape == "star":
        draw.polygon(_star(box), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; choose one of {SHAPES}")


def _place(rng: np.random.Generator, taken: list[tuple[int, int, int, int]]) -> tuple[int, int, int, int] | None:
    for _ in range(100):
        side = int(rng.integers(MIN_OBJECT, MAX_OBJECT + 1))
        left, top = int(rng.integers(0, SIZE - side + 1)), int(rng.integers(0, SIZE - side + 1))
        box = (left, top, left + side, top + side)
        if all(box[2] + GAP <= o[0] or o[2] + GAP <= box[0] or box[3] + GAP <= o[1] or o[3] + GAP <= box[1]
               for o in taken):
            return box
    return None


def sample_scene(rng: np.random.Generator, split: str = "train", max_objects: int = 2) -> Scene:
    """One random scene. `train` never pairs an object colour with its held-out background."""
    if split not in ("train", "any"):
        raise ValueError(f"split must be 'train' or 'any', got {split!r}")
    while True:
        background = COLOURS[int(rng.integers(len(COLOURS)))]
        allowed = [c for c in COLOURS if c != background and (split == "any" or held_out_background(c) != background)]
        objects: list[WorldObject] = []
        for _ in range(int(rng.integers(1, max_objects + 1))):
            box = _place(rng, [o.box for o in objects])
            if box is None:
                break
            objects.append(WorldObject(allowed[int(rng.integers(len(allowed)))], SHAPES[int(rng.integers(len(SHAPES)))], box))
        if objects:
            return Scene(background, tuple(objects))


def scenes(seed: int, count: int, split: str = "train") -> list[Scene]:
    rng = np.random.default_rng(seed)
    return [sample_scene(rng, split) for _ in range(count)]


# ------------------------------------------------------------------ shards

def caption_rows(scene_list: list[Scene], prefix: str = "world") -> list[dict]:
    """Caption-shard rows (PNG, so palette colours stay exact)."""
    from kosmos_g.platform.data import imaging

    return [{"key": f"{prefix}-{i:07d}", "caption": scene.caption, "image": imaging.encode_image(scene.render(), "PNG"),
             "width": SIZE, "height": SIZE} for i, scene in enumerate(scene_list)]


def compositional_rows(scene_list: list[Scene], prefix: str = "world", crop_size: int = SIZE) -> list[dict]:
    """Compositional-shard rows straight from the scenes' ground truth (each object phrase, "red
    circle", an entity with a crop with and one without background): what the construction
    pipeline's world preset must reproduce from pixels alone (tests compare the two)."""
    from kosmos_g.platform.data import imaging

    rows = []
    for i, scene in enumerate(scene_list):
        image, caption = scene.render(), scene.caption
        entities, position = [], 0
        for index, obj in enumerate(scene.objects):
            start = caption.index(obj.phrase, position)
            position = start + len(obj.phrase)
            mask = scene.mask(index)
            crop, crop_nobg, tight = imaging.entity_crops(image, mask, crop_size)
            entities.append({"text": obj.phrase, "start": start, "end": position, "box": list(tight),
                             "area": float(mask.mean()), "crop": imaging.encode_image(crop, "PNG"),
                             "crop_nobg": imaging.encode_image(crop_nobg, "PNG")})
        rows.append({"key": f"{prefix}-{i:07d}", "caption": caption, "image": imaging.encode_image(image, "PNG"),
                     "width": SIZE, "height": SIZE, "entities": entities})
    return rows


def clip_rows(scene_list: list[Scene], prefix: str = "world", scene_rows: list[dict] | None = None) -> list[dict]:
    """Caption-shard rows of the mini CLIP's image-text pairs: each scene, followed by a close-up
    of each of its objects (its entity crop, background kept, as a subject image shows it)
    captioned "a red circle on a blue background". Real CLIP saw close-ups as well as scenes; one
    trained on whole scenes alone cannot tell, in a crop, which colour is the object's
    (docs/REPRODUCTION.md). Close-ups follow their scene, so a block-order shuffle still mixes them.
    `scene_rows`: the scenes' `caption_rows` when already made."""
    from kosmos_g.platform.data import imaging

    rows = []
    for scene, row in zip(scene_list, scene_rows or caption_rows(scene_list, prefix)):
        rows.append(row)
        image = scene.render()
        for index, obj in enumerate(scene.objects):
            crop, _, _ = imaging.entity_crops(image, scene.mask(index), SIZE)
            rows.append({"key": f"{row['key']}-closeup-{index}",
                         "caption": f"a {obj.phrase} on a {scene.background} background",
                         "image": imaging.encode_image(crop, "PNG"), "width": SIZE, "height": SIZE})
    return rows


def image_name(index: int) -> str:
    return f"world-{index:07d}.png"


def write_world_images(prefix: str, scene_list: list[Scene]) -> None:
    """Each scene as a PNG under `prefix`: the input of `pipelines/construct.py --preset world`."""
    from concurrent.futures import ThreadPoolExecutor

    from kosmos_g.platform import storage
    from kosmos_g.platform.data import imaging

    def write(index: int) -> None:
        data = imaging.encode_image(scene_list[index].render(), "PNG")
        storage.write_bytes(storage.join(prefix, image_name(index)), data)

    with ThreadPoolExecutor(8) as pool:  # many small PUTs: overlap their round trips
        list(pool.map(write, range(len(scene_list))))


def write_world_shards(prefix: str, seed: int = 0, count: int = 10_000, rows_per_shard: int = 2_000) -> dict[str, str]:
    """Training data of the world (held-out pairs excluded) under `prefix`: caption shards, the
    scenes as images for the construction pipeline, which makes the compositional shards
    (`pipelines/construct.py --preset world`), and the mini CLIP's pairs (scenes and close-ups);
    returns {"captions": ..., "images": ..., "clip": ...}."""
    from kosmos_g.platform import storage

    storage.ensure_bucket(prefix)
    scene_list = scenes(seed, count, "train")
    prefixes = {part: storage.join(prefix, part) for part in ("captions", "images", "clip")}
    scene_rows = caption_rows(scene_list)
    _write_captions(prefixes["captions"], scene_rows, rows_per_shard)
    write_world_images(prefixes["images"], scene_list)
    _write_captions(prefixes["clip"], clip_rows(scene_list, scene_rows=scene_rows), rows_per_shard)
    return prefixes


def _write_captions(prefix: str, rows: list[dict], rows_per_shard: int) -> None:
    from kosmos_g.platform.data import shards

    shards.write_rows(prefix, "captions", rows, rows_per_shard=rows_per_shard,
                      producer="kosmos_g.platform.data.world", total=len(rows))


def ensure_world_shards(root: str, count: int = TRAINING_SCENES, seed: int = 0) -> bool:
    """Write the world's caption shards, images and CLIP pairs under `root` unless they are there
    (a part missing from an older world is added alone); True when something was written."""
    from kosmos_g.platform import storage
    from kosmos_g.platform.data import shards

    scenes_there = (storage.exists(storage.join(root, "captions", shards.MANIFEST))
                    and storage.exists(storage.join(root, "images", image_name(count - 1))))
    clip_there = storage.exists(storage.join(root, "clip", shards.MANIFEST))
    if scenes_there and clip_there:
        return False
    if scenes_there:
        print(f"[world] writing the mini CLIP's scenes and close-ups ({count} scenes) to {root}/clip", flush=True)
        _write_captions(storage.join(root, "clip"), clip_rows(scenes(seed, count, "train")), 2_000)
        return True
    print(f"[world] writing the miniature world's caption shards, images and CLIP pairs ({count} scenes) "
          f"to {root}", flush=True)
    write_world_shards(root, seed=seed, count=count)
    return True
