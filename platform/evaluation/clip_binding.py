"""Does a CLIP bind each colour to the right thing, and tell the shapes apart? A zero-shot check
in the miniature world.

Each image is scored against its own caption and against the caption with the object's and the
background's colours swapped ("a red circle on a blue background" vs "a blue circle on a red
background"); the score is the fraction of images whose own caption wins (chance: 0.5). Three
image sets, 150 each by default, drawn from `seed` with no held-out pair:

- `scenes`: whole one-object scenes, what the mini CLIP was first trained on;
- `closeups`: the subject images of the held-out evaluation (entity crops, background kept);
- `closeups_white`: the same crops with the background removed to white (stage 3's entity images,
  as released); the swapped caption then reads "a white circle on a red background".

The shape check scores the same images against their own caption and the three captions that
name another shape ("a red star on a blue background", ...): the fraction whose own caption beats
all three (chance: 0.25). A CLIP trained contrastively can match most captions by their colours
alone, and then has no reason to read the shape word or see the outline: a vision tower at chance
here cannot pass a subject image's shape on to the MLLM.

Kosmos-G sees subject images through the CLIP vision tower, so a CLIP that cannot tell which
colour is the object's in a crop caps what any later stage can learn (docs/REPRODUCTION.md).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image

from kosmos_g.platform.data import imaging, world

# images, captions -> one similarity per (image, caption) pair
Similarity = Callable[[Sequence[Image.Image], Sequence[str]], Sequence[float]]
SETS = ("scenes", "closeups", "closeups_white")
WHITE = "white"


def _caption(colour: str, shape: str, background: str) -> str:
    return f"a {colour} {shape} on a {background} background"


def binding_cases(count: int = 150, seed: int = 11) -> dict[str, list[tuple[Image.Image, str, str]]]:
    """{set: [(image, own caption, colour-swapped caption)]}, deterministic from `seed`."""
    rng = np.random.default_rng(seed)
    cases: dict[str, list[tuple[Image.Image, str, str]]] = {name: [] for name in SETS}
    while min(len(found) for found in cases.values()) < count:
        scene = world.sample_scene(rng, "train", max_objects=1)
        obj, background = scene.objects[0], scene.background
        image = scene.render()
        crop, crop_white, _ = imaging.entity_crops(image, scene.mask(0), world.SIZE)
        own, swapped = _caption(obj.colour, obj.shape, background), _caption(background, obj.shape, obj.colour)
        cases["scenes"].append((image, own, swapped))
        cases["closeups"].append((crop, own, swapped))
        if obj.colour != WHITE:  # a white object on white has no colour to bind
            cases["closeups_white"].append((crop_white, _caption(obj.colour, obj.shape, WHITE),
                                            _caption(WHITE, obj.shape, obj.colour)))
    return {name: found[:count] for name, found in cases.items()}


def shape_swaps(caption: str) -> list[str]:
    """The caption once with each other shape: "a red circle on ..." -> "a red square on ...", ..."""
    words = caption.split()
    return [" ".join(words[:2] + [shape] + words[3:]) for shape in world.SHAPES if shape != words[2]]


def binding_accuracy(similarity: Similarity, count: int = 150, seed: int = 11) -> dict[str, float]:
    """{`binding_<set>`: fraction of images whose own caption beats the colour-swapped one,
    `shape_<set>`: fraction whose own caption beats each of the three shape-swapped ones}."""
    scores = {}
    for name, cases in binding_cases(count, seed).items():
        images = [image for image, _, _ in cases]
        own = np.asarray(similarity(images, [text for _, text, _ in cases]))
        swapped = np.asarray(similarity(images, [text for _, _, text in cases]))
        scores[f"binding_{name}"] = float((own > swapped).mean())
        other_shapes = [shape_swaps(text) for _, text, _ in cases]
        other = np.stack([np.asarray(similarity(images, [swaps[k] for swaps in other_shapes]))
                          for k in range(len(world.SHAPES) - 1)])
        scores[f"shape_{name}"] = float((own > other.max(axis=0)).mean())
    return scores


def clip_binding(clip_dir: str) -> dict[str, float]:
    """`binding_accuracy` of a transformers `CLIPModel` folder (cosine of projected embeddings)."""
    from kosmos_g.platform.evaluation.metrics import ClipScorer

    return binding_accuracy(ClipScorer(clip_dir).text_scores)
