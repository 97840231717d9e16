"""The miniature world: deterministic scenes, the held-out split, an exact pixel scorer, shards."""

from __future__ import annotations

import numpy as np
import pytest

from kosmos_g.platform.data import shards, world
from kosmos_g.platform.data.world_scorer import read_scene


def test_scenes_are_deterministic_and_follow_the_rules():
    a, b = world.scenes(7, 300), world.scenes(7, 300)
    assert a == b and a != world.scenes(8, 300)
    counts = {1: 0, 2: 0}
    for scene in a:
        counts[len(scene.objects)] += 1
        for obj in scene.objects:
            left, top, right, bottom = obj.box
            assert world.MIN_OBJECT <= right - left <= world.MAX_OBJECT and right - left == bottom - top
            assert 0 <= left and right <= world.SIZE and 0 <= top and bottom <= world.SIZE
            assert obj.colour != scene.background
            assert world.held_out_background(obj.colour) != scene.background  # held out of training
        if len(scene.objects) == 2:
            overlap = scene.mask(0) & scene.mask(1)
            assert not overlap.any()
    assert counts[1] > 50 and counts[2] > 50


def test_captions_read_as_specified():
    scene = world.Scene("blue", (world.WorldObject("red", "circle", (0, 0, 20, 20)),
                                 world.WorldObject("yellow", "star", (30, 30, 56, 56))))
    assert scene.caption == "a red circle and a yellow star on a blue background"
    assert world.Scene("blue", scene.objects[:1]).caption == "a red circle on a blue background"
    assert world.held_out_background("red") == "yellow"  # index 0 -> 3


def test_the_any_split_contains_held_out_pairs():
    held = [s for s in world.scenes(1, 400, "any")
            if any(world.held_out_background(o.colour) == s.background for o in s.objects)]
    assert held


@pytest.mark.parametrize("size", [64, 32])
def test_scorer_is_exact_on_rendered_scenes(size):
    for scene in world.scenes(3, 400, "any"):
        reading = read_scene(scene.render(size))
        assert reading.background == scene.background, scene
        assert sorted((o.colour, o.shape) for o in reading.objects) == sorted(
            (o.colour, o.shape) for o in scene.objects), scene


def test_scorer_on_a_blank_image():
    blank = read_scene(np.full((32, 32, 3), world.PALETTE["green"], np.uint8))
    assert blank.background == "green" and blank.objects == ()


def test_shards_hold_captions_and_scene_images(s3_prefix):
    from kosmos_g.platform import storage
    from kosmos_g.platform.data.imaging import decode_image

    prefixes = world.write_world_shards(f"{s3_prefix}/world", seed=2, count=40, rows_per_shard=16)
    captions = shards.read_table(prefixes["captions"]).to_pylist()
    scenes = world.scenes(2, 40)
    assert [row["caption"] for row in captions] == [scene.caption for scene in scenes]
    first = decode_image(captions[0]["image"])
    assert read_scene(first).background == scenes[0].background  # PNG: colours exact
    # The construction pipeline's input (its world preset makes the compositional shards).
    images = sorted(u for u in storage.list_uris(prefixes["images"]) if u.endswith(".png"))
    assert [u.rsplit("/", 1)[1] for u in images] == [world.image_name(i) for i in range(40)]
    assert decode_image(storage.read_bytes(images[7])).tobytes() == scenes[7].render().tobytes()
    # Ground-truth compositional rows (what construction must reproduce): exact entity spans.
    for row, scene in zip(world.compositional_rows(scenes[:10]), scenes):
        assert row["caption"] == scene.caption
        assert [e["text"] for e in row["entities"]] == [o.phrase for o in scene.objects]
        for entity in row["entities"]:
            assert row["caption"][entity["start"]:entity["end"]] == entity["text"]
