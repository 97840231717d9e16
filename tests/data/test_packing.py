"""Stage-1 packing: rows filled greedily up to pack_length, documents kept apart in attention
and positions so a packed document is computed exactly as alone; the stream packs for real."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from kosmos_g.platform.data.packing import document_ids, pack_rows


def _row(key: str, length: int, images: int = 0) -> dict:
    return {"source": "captions", "key": key, "draw": 0, "input_ids": list(range(length)),
            "image_mask": [False] * length, "loss_mask": [True] * length, "n_images": images,
            "clip_pixels": bytes([len(key)]) * images, "caption": key, "target_pixels": None,
            "n_entities": 0, "n_entity_text_dropped": 0, "n_background_kept": 0,
            "input_caption_dropped": False, "doc_lengths": [length]}


def test_rows_are_filled_greedily_in_order():
    rows = [_row("a", 5), _row("bb", 4, images=1), _row("c", 6), _row("d", 12), _row("e", 1)]
    packed = pack_rows(rows, pack_length=10)
    assert [p["doc_lengths"] for p in packed] == [[5, 4], [6], [12], [1]]  # 12 > 10 stays alone
    first = packed[0]
    assert first["key"] == "a+bb" and first["source"] == "packed" and len(first["input_ids"]) == 9
    assert first["n_images"] == 1 and first["clip_pixels"] == bytes([2])
    assert packed[1]["key"] == "c" and packed[1]["source"] == "captions"  # a lone row is unchanged
    ids = document_ids([[5, 4], [6]], 10)
    assert ids.tolist() == [[1] * 5 + [2] * 4 + [0], [1] * 6 + [0] * 4]


def test_a_packed_document_is_computed_exactly_as_alone():
    """Text-only and interleaved documents in one row: same logits as each alone."""
    from skimage import data as photos_data

    from kosmos_g.models.config import model_preset
    from kosmos_g.models.kosmos_g import KosmosG
    from kosmos_g.platform.data.packing import pack_rows as pack

    torch.manual_seed(0)
    tiny_model = KosmosG.from_config(model_preset("tiny"))
    photos = [photos_data.chelsea()]
    tok = tiny_model.tokenizer
    documents = [["a red circle on a blue background"], [photos[0], "a cat on a sofa"],
                 ["two yellow stars"]]
    encoded = [tok.encode(d) for d in documents]
    rows = [{**_row(str(i), len(e["input_ids"])), "input_ids": e["input_ids"].tolist(),
             "image_mask": e["image_mask"].tolist(), "loss_mask": e["loss_mask"].tolist()}
            for i, e in enumerate(encoded)]
    (row,) = pack(rows, pack_length=1000)
    batch = tok.collate([{"input_ids": np.array(row["input_ids"]), "image_mask": np.array(row["image_mask"]),
                          "loss_mask": np.array(row["loss_mask"]),
                          "pixel_values": np.concatenate([e["pixel_values"] for e in encoded])}])
    batch["document_ids"] = torch.from_numpy(document_ids([row["doc_lengths"]], batch["input_ids"].shape[1]))
    tiny_model.eval()  # no dropout
    with torch.no_grad():
        packed = tiny_model._mllm(tiny_model._batch(batch), return_logits=True).logits[0]
        start = 0
        for e in encoded:
            alone = tiny_model._mllm(tiny_model._batch(tok.collate([e])), return_logits=True).logits[0]
            n = len(e["input_ids"])
            assert torch.allclose(packed[start:start + n], alone, atol=1e-4)
            start += n
        # Without the document ids the second document would see the first: different logits.
        del batch["document_ids"]
        mixed = tiny_model._mllm(tiny_model._batch(batch), return_logits=True).logits[0]
    assert not torch.allclose(mixed[len(encoded[0]["input_ids"]):], packed[len(encoded[0]["input_ids"]):],
                              atol=1e-4)


def test_the_stage1_stream_packs_rows(ray_local, sample_shards):
    sample_prefixes = sample_shards
    from kosmos_g.models.config import model_preset
    from kosmos_g.platform.data.datastream import DataConfig, collate_fn, training_dataset

    data = DataConfig(captions=sample_prefixes["captions"], compositional=sample_prefixes["compositional"],
                      pack_length=256, samples_per_epoch=32, num_cpus=0.25, workers=1,
                      skip_counter="packing-test")
    model = model_preset("tiny")
    rows = training_dataset(1, data, model).take_all()
    unpacked = training_dataset(1, dataclasses.replace(data, pack_length=0), model).take_all()
    assert all(len(r["input_ids"]) <= 256 for r in rows)
    # Every example is in some row (the sample set's corrupt records are skipped either way).
    assert sorted(n for r in rows for n in r["doc_lengths"]) == sorted(len(r["input_ids"]) for r in unpacked)
    assert len(rows) < len(unpacked)
    assert any(len(r["doc_lengths"]) > 1 for r in rows)
    assert all(sum(r["doc_lengths"]) == len(r["input_ids"]) for r in rows)
    batch = {k: np.array([r[k] for r in rows[:4]], dtype=object) for k in rows[0]}
    collated = collate_fn(1, model)(batch)
    assert collated["document_ids"].shape == collated["input_ids"].shape
    assert int(collated["document_ids"].max()) == max(len(r["doc_lengths"]) for r in rows[:4])


def test_a_packed_stage1_stream_holds_the_whole_job(ray_local, sample_shards, s3_prefix):
    """The stream counts records and a packed row holds several: a stage-1 job's stream must hold
    its steps' packed rows, or the job reads the same records pass after pass (it held 32 of a
    10-step tiny job's 96 rows when it asked for 96 records)."""
    from kosmos_g.platform.data.datastream import records_per_packed_row
    from kosmos_g.platform.train.config import stage_presets
    from kosmos_g.platform.train.resume import StageStream

    cfg = stage_presets(1).get("tiny", [f"storage_path={s3_prefix}/ray-train", "train.steps=10", "name=packed"])
    cfg.data.captions, cfg.data.compositional = sample_shards["captions"], sample_shards["compositional"]
    per_row = records_per_packed_row(cfg.data, cfg.model)
    assert per_row > 2 and per_row == records_per_packed_row(cfg.data, cfg.model)  # measured, the same each time
    assert records_per_packed_row(dataclasses.replace(cfg.data, pack_length=0), cfg.model) == 1.0
    rows = StageStream(cfg, cfg.model, None)().take_all()
    needed = (cfg.train.steps + 2) * cfg.train.batch_size * cfg.train.num_workers
    assert needed <= len(rows) <= 2 * needed, (needed, len(rows))
