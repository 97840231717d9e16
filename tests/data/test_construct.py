"""Construction of compositional data on the bundled photographs with tiny random
BLIP-2 / MPT / CLIPSeg checkpoints (one loaded from S3), on the real stack."""

from __future__ import annotations

import uuid

import numpy as np
import pytest

from kosmos_g.pipelines import construct
from kosmos_g.pipelines.construct_models import parse_entities
from kosmos_g.pipelines.tiny_models import write_tiny_models
from kosmos_g.platform.data import imaging, samples, shards
from kosmos_g.platform import storage, tracking
from tests.conftest import BUCKET


def test_parse_entities_matches_caption_spans():
    caption = "A bedroom with a bed, two chairs and a red car"
    spans = parse_entities("1. a red car\n2. the bed\n3. two chairs, a lamp", caption)
    assert [caption[s:e] for s, e in spans] == ["bed", "chairs", "red car"]
    assert parse_entities("bedroom, bed", caption, max_entities=1) == [(2, 9)]
    assert parse_entities("the, a, with", caption) == []
    assert parse_entities("cat", "") == []
    # Overlapping answers keep the longer span once.
    assert parse_entities("red car, car, red", caption) == [(39, 46)]


@pytest.fixture(scope="module")
def tiny_models(stack_env, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("tiny-models")
    # Two from local directories, one from an s3:// prefix (downloaded and cached by the actor).
    return write_tiny_models({"captioner": str(root / "captioner"), "entity_llm": str(root / "entity-llm"),
                              "segmenter": f"s3://{BUCKET}/models-{uuid.uuid4().hex[:8]}/segmenter"})


def test_construct_tiny_writes_compositional_shards(ray_local, s3_prefix, tiny_models):
    images = f"{s3_prefix}/images"
    samples.write_sample_images(images)
    storage.write_bytes(f"{images}/zz-corrupt.jpg", b"\xff\xd8\xff\xe0 this is not a JPEG")
    storage.write_text(f"{images}/README.txt", "not an image: never read")
    output = f"{s3_prefix}/compositional"
    run_name = f"test-{s3_prefix.rsplit('/', 1)[-1]}"
    argv = ["--preset", "tiny", "--set", f"input={images}", "--set", f"output={output}",
            "--set", "write_sample_images=false", "--set", "models.build_tiny=false",
            "--set", f"run_name={run_name}"]
    argv += [arg for name, uri in tiny_models.items() for arg in ("--set", f"models.{name}={uri}")]
    assert construct.main(argv) == 0

    manifest = shards.read_manifest(output)
    skipped = manifest.stats["skipped"]
    assert skipped["decode_error"] == 1
    assert manifest.count + sum(skipped.values()) == len(samples.CAPTIONS) + 1
    assert manifest.count > 0 and set(skipped) <= {"decode_error", "no_entities", "empty_mask"}
    rows = shards.read_table(output).to_pylist()
    assert len({row["key"] for row in rows}) == len(rows) and all(row["key"].endswith(".jpg") for row in rows)
    crop_size = construct.PRESETS.get("tiny").segment.crop_size
    for row in rows:
        image = imaging.decode_image(row["image"])
        assert image.size == (row["width"], row["height"]) and max(image.size) <= 256
        assert row["caption"] and 1 <= len(row["entities"]) <= 8
        for entity in row["entities"]:
            assert row["caption"][entity["start"]:entity["end"]] == entity["text"]
            assert entity["area"] >= 0.01
            crop, nobg = imaging.decode_image(entity["crop"]), imaging.decode_image(entity["crop_nobg"])
            assert crop.size == nobg.size == (crop_size, crop_size)
            x0, y0, x1, y1 = entity["box"]
            assert 0 <= x0 < x1 <= row["width"] and 0 <= y0 < y1 <= row["height"]
    # Removed background is white where the crop is not.
    assert any((np.asarray(imaging.decode_image(e["crop_nobg"])) > 245).all(axis=-1).any()
               for row in rows for e in row["entities"])

    # The run is in MLflow with the counts.
    experiment = tracking.client().get_experiment_by_name(tracking.experiment_name("construct"))
    run = tracking.client().get_run(tracking.find_run(experiment.experiment_id, run_name))
    assert run.info.status == "FINISHED"
    assert run.data.metrics["skipped_decode_error"] == 1
    assert run.data.metrics["rows_written"] == manifest.count
    assert run.data.metrics["entities_written"] == sum(len(row["entities"]) for row in rows)
    assert run.data.metrics["images_in"] == len(samples.CAPTIONS) + 1

    # Re-running on the same input writes the same shard files, no duplicates.
    assert construct.main(argv) == 0
    again = shards.read_manifest(output)
    assert again.shards == manifest.shards and again.stats == manifest.stats
    assert shards.parquet_uris(output) == manifest.shard_uris(output)


def test_print_config_and_presets(capsys):
    assert construct.main(["--preset", "paper", "--print-config"]) == 0
    text = capsys.readouterr().out
    assert "mask_threshold: 0.3" in text and "crop_size: 512" in text
    tiny = construct.PRESETS.get("tiny", ["segment.mask_threshold=0.5"])
    assert tiny.segment.mask_threshold == 0.5 and tiny.models.build_tiny


def test_construct_world_reproduces_the_worlds_ground_truth_from_pixels(ray_local, s3_prefix):
    """`--preset world`: the stand-ins (caption and masks read from pixels, entities parsed from
    the caption) through the real Ray Data construction give exactly the entities, boxes and
    crops the world's ground truth gives (world.compositional_rows)."""
    from kosmos_g.pipelines.construct_world import caption_of, parse_caption
    from kosmos_g.platform.data import world

    prefixes = world.write_world_shards(f"{s3_prefix}/world", seed=4, count=40, rows_per_shard=16)
    output = f"{s3_prefix}/world/compositional"
    run_name = f"test-world-{s3_prefix.rsplit('/', 1)[-1]}"
    assert construct.main(["--preset", "world", "--set", f"input={prefixes['images']}", "--set", f"output={output}",
                           "--set", "write_world_images=false", "--set", f"run_name={run_name}",
                           "--set", "rows_per_shard=16"]) == 0

    scenes = world.scenes(4, 40)
    expected = {world.image_name(i): row for i, row in enumerate(world.compositional_rows(scenes))}
    rows = shards.read_table(output).to_pylist()
    assert sorted(row["key"] for row in rows) == sorted(expected)  # every scene has readable objects
    for row in rows:
        truth, scene = expected[row["key"]], scenes[int(row["key"][6:13])]
        assert row["caption"] == caption_of(imaging.decode_image(truth["image"]))
        assert sorted(row["caption"].split()) == sorted(scene.caption.split())  # objects left to right
        assert imaging.decode_image(row["image"]).tobytes() == imaging.decode_image(truth["image"]).tobytes()
        by_box = {tuple(e["box"]): e for e in truth["entities"]}
        assert len(row["entities"]) == len(by_box) or len({e["text"] for e in truth["entities"]}) < len(by_box)
        for entity in row["entities"]:
            assert row["caption"][entity["start"]:entity["end"]] == entity["text"]
            reference = by_box[tuple(entity["box"])]
            assert entity["text"] == reference["text"] and entity["area"] == pytest.approx(reference["area"])
            for variant in ("crop", "crop_nobg"):
                assert imaging.decode_image(entity[variant]).tobytes() == \
                    imaging.decode_image(reference[variant]).tobytes(), variant
    assert parse_caption("a red circle and a yellow star on a blue background") == "red circle, yellow star"
