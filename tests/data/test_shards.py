"""Shard format, manifest and the bundled sample set, against the real SeaweedFS."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kosmos_g.platform.data import imaging, samples, shards
from kosmos_g.platform import storage


def test_sample_shards_round_trip(sample_shards):
    assert set(sample_shards) == {"captions", "compositional", "editing"}
    expected = {"captions": len(samples.CAPTIONS), "compositional": len(samples.ENTITIES),
                "editing": 2 * len(samples.EDITED_PHOTOS)}
    for source, prefix in sample_shards.items():
        assert prefix.startswith("s3://")
        manifest = shards.read_manifest(prefix)
        assert (manifest.source, manifest.schema_version) == (source, shards.SCHEMA_VERSION)
        assert manifest.count == expected[source] == sum(s["rows"] for s in manifest.shards)
        table = shards.read_table(prefix)
        assert table.schema.equals(shards.schema(source)) and table.num_rows == manifest.count
        raw = json.loads(storage.read_text(storage.join(prefix, shards.MANIFEST)))
        assert raw["format"] == shards.FORMAT and set(raw["columns"]) == set(shards.schema(source).names)

    for row in shards.read_table(sample_shards["captions"]).to_pylist():
        image = imaging.decode_image(row["image"])
        assert image.size == (row["width"], row["height"]) and max(image.size) <= samples.MAX_SIDE
        assert row["caption"] == samples.CAPTIONS[row["key"].removeprefix("sample-")]

    for row in shards.read_table(sample_shards["compositional"]).to_pylist():
        assert [e["start"] for e in row["entities"]] == sorted(e["start"] for e in row["entities"])
        for entity in row["entities"]:
            assert row["caption"][entity["start"]:entity["end"]] == entity["text"]
            crop, nobg = imaging.decode_image(entity["crop"]), imaging.decode_image(entity["crop_nobg"])
            assert crop.size == nobg.size == (samples.CROP_SIZE, samples.CROP_SIZE)
            # Outside the (elliptical) mask the background is white, inside it is the photo.
            corner = np.asarray(nobg)[:4, :4].astype(int)
            assert (corner > 240).all() and 0 < entity["area"] < 1
            x0, y0, x1, y1 = entity["box"]
            assert 0 <= x0 < x1 <= row["width"] and 0 <= y0 < y1 <= row["height"]

    assert shards.entity_count(sample_shards["compositional"]) == sum(len(e) for e in samples.ENTITIES.values())

    for row in shards.read_table(sample_shards["editing"]).to_pylist():
        before, after = (np.asarray(imaging.decode_image(row[c]), dtype=np.float32)
                         for c in ("input_image", "edited_image"))
        assert before.shape == after.shape and np.abs(before - after).mean() > 2  # a real pixel edit
        assert row["instruction"] and row["edited_caption"].startswith(row["input_caption"])


def test_manifest_errors_and_rewrites(tmp_path):
    prefix = str(tmp_path / "captions")
    with pytest.raises(shards.ShardError, match="no shard manifest"):
        shards.read_manifest(prefix)
    rows = samples.caption_rows()[:5]
    first = shards.write_rows(prefix, "captions", rows, rows_per_shard=2)
    assert [s["path"] for s in first.shards] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    # A smaller rewrite replaces the files: same names, stale ones gone, no duplicates.
    second = shards.write_rows(prefix, "captions", rows[:3], rows_per_shard=2)
    assert [s["path"] for s in second.shards] == ["part-00000.parquet", "part-00001.parquet"]
    assert shards.read_manifest(prefix).count == 3 == shards.read_table(prefix).num_rows

    manifest_uri = storage.join(prefix, shards.MANIFEST)
    data = json.loads(storage.read_text(manifest_uri))
    storage.write_text(manifest_uri, json.dumps({**data, "schema_version": shards.SCHEMA_VERSION + 1}))
    with pytest.raises(shards.ShardError, match="schema version"):
        shards.read_manifest(prefix)
    with pytest.raises(Exception):
        shards.to_table("captions", [{"key": "k", "caption": 3, "image": b"", "width": 1, "height": 1}])
    with pytest.raises(shards.ShardError, match="unknown source"):
        shards.schema("video")


def test_entity_crops_square_and_white_outside_mask():
    from PIL import Image

    image = Image.new("RGB", (200, 100), (10, 200, 30))
    mask = np.zeros((100, 200), bool)
    mask[20:60, 150:190] = True  # 40x40 at the right edge
    crop, nobg, box = imaging.entity_crops(image, mask, 32, margin=0.0)
    assert box == (150, 20, 190, 60) and crop.size == nobg.size == (32, 32)
    assert (np.asarray(crop) == (10, 200, 30)).all() and (np.asarray(nobg) == (10, 200, 30)).all()
    mask[:] = False
    mask[40:50, 40:50] = True
    crop, nobg, _ = imaging.entity_crops(image, mask, 32, margin=0.5)
    assert (np.asarray(nobg)[0, 0] == 255).all() and (np.asarray(crop)[0, 0] == (10, 200, 30)).all()
    assert imaging.entity_crops(image, np.zeros((100, 200), bool), 32) is None
    with pytest.raises(imaging.ImageDecodeError):
        imaging.decode_image(b"\xff\xd8\xff not a jpeg")
