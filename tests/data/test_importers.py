"""Importers: public layouts in S3 and on disk -> shards -> read back."""

from __future__ import annotations

import base64
import json

import pyarrow as pa
import pyarrow.parquet as pq

from kosmos_g.platform.data import imaging, importers, samples, shards
from kosmos_g.platform import storage

CPUS = 0.5  # per task: the session's local Ray has 2 CPUs


def _jpeg(name: str) -> bytes:
    return imaging.encode_image(imaging.limit_side(samples.photo(name), 96))


def test_import_caption_tables(ray_local, s3_prefix, tmp_path):
    # JSON lines in S3 with image paths relative to the table, a URL, a missing file and a corrupt image.
    names = ["astronaut", "chelsea", "coffee"]
    for name in names:
        storage.write_bytes(f"{s3_prefix}/raw/images/{name}.jpg", _jpeg(name))
    storage.write_bytes(f"{s3_prefix}/raw/images/broken.jpg", _jpeg("rocket")[:300])
    lines = [{"image": f"images/{n}.jpg", "caption": samples.CAPTIONS[n], "id": n} for n in names]
    lines += [{"image": "https://example.com/cat.jpg", "caption": "never fetched", "id": "url"},
              {"image": "images/nope.jpg", "caption": "missing", "id": "missing"},
              {"image": "images/broken.jpg", "caption": "corrupt", "id": "broken"},
              {"image": f"images/{names[0]}.jpg", "caption": "", "id": "no-caption"}]
    storage.write_text(f"{s3_prefix}/raw/table.jsonl", "\n".join(json.dumps(line) for line in lines) + "\n")

    out = f"{s3_prefix}/shards/captions"
    manifest = importers.import_captions(f"{s3_prefix}/raw/table.jsonl", out, key_column="id", num_cpus=CPUS)
    assert manifest.count == 3
    assert manifest.stats["skipped"] == {"url_not_fetched": 1, "missing_file": 1, "decode_error": 1,
                                         "missing_field": 1}
    rows = {r["key"]: r for r in shards.read_table(out).to_pylist()}
    assert set(rows) == set(names)
    assert rows["chelsea"]["image"] == _jpeg("chelsea") and rows["chelsea"]["caption"] == samples.CAPTIONS["chelsea"]
    assert (rows["coffee"]["width"], rows["coffee"]["height"]) == imaging.image_size(_jpeg("coffee"))

    assert shards.parquet_uris(out) == manifest.shard_uris(out)

    # TSV with base64 images (the original Kosmos-G layout), on local disk.
    tsv = tmp_path / "pairs.tsv"
    tsv.write_text("caption\timage\n" + "".join(
        f"{samples.CAPTIONS[n]}\t{base64.b64encode(_jpeg(n)).decode()}\n" for n in ("moon", "coins")))
    local = importers.import_captions(str(tsv), str(tmp_path / "tsv-shards"), num_cpus=CPUS)
    assert local.count == 2 and not local.stats["skipped"]
    assert sorted(r["caption"] for r in shards.read_table(str(tmp_path / "tsv-shards")).to_pylist()) == sorted(
        samples.CAPTIONS[n] for n in ("moon", "coins"))

    # Parquet with Hugging Face {"bytes", "path"} image structs, in S3.
    hf = pa.table({"text": ["a clock"], "image": [{"bytes": _jpeg("clock"), "path": None}]})
    sink = pa.BufferOutputStream()
    pq.write_table(hf, sink)
    storage.write_bytes(f"{s3_prefix}/raw3/hf.parquet", sink.getvalue().to_pybytes())
    hf_manifest = importers.import_captions(f"{s3_prefix}/raw3/hf.parquet", f"{s3_prefix}/shards/hf",
                                            caption_column="text", num_cpus=CPUS)
    assert hf_manifest.count == 1
    assert shards.read_table(f"{s3_prefix}/shards/hf").column("image")[0].as_py() == _jpeg("clock")


def test_image_cell_forms(tmp_path):
    jpeg = _jpeg("coins")
    (tmp_path / "coins.jpg").write_bytes(jpeg)
    assert importers.image_bytes(jpeg, str(tmp_path)) == jpeg
    assert importers.image_bytes({"bytes": jpeg, "path": "x"}, str(tmp_path)) == jpeg
    assert importers.image_bytes("coins.jpg", str(tmp_path)) == jpeg
    assert importers.image_bytes(str(tmp_path / "coins.jpg"), "/elsewhere") == jpeg
    assert importers.image_bytes(base64.b64encode(jpeg).decode(), str(tmp_path)) == jpeg
    assert importers.image_bytes("data:image/jpeg;base64," + base64.b64encode(jpeg).decode(), "") == jpeg
    for value, reason in (("http://x/y.jpg", "url_not_fetched"), ("gone.png", "missing_file"),
                          (None, "missing_field"), ("not base64 !", "decode_error")):
        try:
            importers.image_bytes(value, str(tmp_path))
        except importers.SkipRecord as skip:
            assert skip.reason == reason
        else:
            raise AssertionError(f"{value!r} was accepted")


def test_import_instructpix2pix_folders_and_table(ray_local, s3_prefix):
    root = f"{s3_prefix}/ip2p"
    for index, name in enumerate(["astronaut", "coffee"]):
        folder = f"{root}/{index:07d}"
        storage.write_text(f"{folder}/prompt.json", json.dumps(
            {"input": samples.CAPTIONS[name], "edit": "make it black and white", "output": f"{name} in grey"}))
        for seed in ("1234", "5678"):
            storage.write_bytes(f"{folder}/{seed}_0.jpg", _jpeg(name))
            storage.write_bytes(f"{folder}/{seed}_1.jpg", imaging.encode_image(
                imaging.decode_image(_jpeg(name)).convert("L")))
    storage.write_bytes(f"{root}/0000000/999_0.jpg", _jpeg("astronaut"))  # no partner: ignored
    storage.write_bytes(f"{root}/0000001/777_0.jpg", _jpeg("coffee"))
    storage.write_bytes(f"{root}/0000001/777_1.jpg", b"corrupt")  # counted

    out = f"{s3_prefix}/shards/editing"
    manifest = importers.import_instructpix2pix(root, out, num_cpus=CPUS)
    assert manifest.source == "editing" and manifest.count == 4
    assert manifest.stats["skipped"] == {"decode_error": 1}
    rows = shards.read_table(out).to_pylist()
    assert sorted(r["key"] for r in rows) == ["0000000/1234", "0000000/5678", "0000001/1234", "0000001/5678"]
    astronaut = next(r for r in rows if r["key"] == "0000000/1234")
    assert astronaut["input_caption"] == samples.CAPTIONS["astronaut"]
    assert astronaut["instruction"] == "make it black and white" and astronaut["edited_caption"] == "astronaut in grey"
    assert astronaut["input_image"] == _jpeg("astronaut")

    # The Hugging Face table layout of the same data.
    table = pa.table({
        "original_prompt": ["a rocket at dusk"], "edit_prompt": ["make it night"],
        "edited_prompt": ["a rocket at night"],
        "original_image": [{"bytes": _jpeg("rocket"), "path": None}],
        "edited_image": [{"bytes": imaging.encode_image(samples.EDITS["darker"][2](samples.photo("rocket"))),
                          "path": None}],
    })
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    storage.write_bytes(f"{s3_prefix}/hf/train-0.parquet", sink.getvalue().to_pybytes())
    hf = importers.import_instructpix2pix(f"{s3_prefix}/hf", f"{s3_prefix}/shards/hf-editing", num_cpus=CPUS)
    assert hf.count == 1
    row = shards.read_table(f"{s3_prefix}/shards/hf-editing").to_pylist()[0]
    assert (row["input_caption"], row["instruction"], row["edited_caption"]) == (
        "a rocket at dusk", "make it night", "a rocket at night")
