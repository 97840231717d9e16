"""bench/stage2_gap.py: its caption sets split the world's captions as they say, and its
caption-weighted loss does not depend on how the captions are batched."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from kosmos_g.platform.data import world

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import stage2_gap  # noqa: E402


def _pairings(caption: str) -> list[tuple[str, str]]:
    """(object colour, background) of each object a world caption names."""
    objects, background = caption.removeprefix("a ").removesuffix(" background").split(" on a ")
    return [(phrase.split()[-2], background) for phrase in objects.split(" and ")]


def test_caption_sets_split_the_training_captions():
    sets = stage2_gap.caption_sets(per_set=40)
    training = {scene.caption for scene in world.scenes(0, world.TRAINING_SCENES, "train")}
    assert len(sets["seen, one object"]) == 8 * 4 * 6  # colour x shape x the 6 allowed backgrounds
    assert len(sets["held out, one object"]) == 8 * 4
    assert all(len(sets[name]) == 40 for name in ("seen, two objects", "unseen, two objects"))
    for name, captions in sets.items():
        assert len(set(captions)) == len(captions), name
        two = name.endswith("two objects")
        assert all((" and " in caption) == two for caption in captions), name
        assert all((caption in training) == name.startswith("seen") for caption in captions), name
        pairings = [pair for caption in captions for pair in _pairings(caption)]
        held_out = [colour for colour, background in pairings if world.held_out_background(colour) == background]
        assert len(held_out) == (len(captions) if name.startswith("held out") else 0), name


def test_stage2_losses_weigh_captions_not_batches(tiny_model):
    captions = ["a red circle on a blue background", "a green star on a white background",
                "a red circle and a yellow star on a blue background", "a black square on a red background",
                "a white triangle on a green background"]
    whole = stage2_gap.stage2_losses(tiny_model, captions, batch_size=len(captions))
    chunked = stage2_gap.stage2_losses(tiny_model, captions, batch_size=2)
    assert whole["mse"] > 0 and whole["rec"] > 0
    assert chunked["mse"] == pytest.approx(whole["mse"], rel=1e-5)
