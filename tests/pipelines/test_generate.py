"""Batch generation on real Ray Data and S3: PNGs + results table, bad rows skipped and counted,
a re-run skips keys already written."""

from __future__ import annotations

import io
import json

import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from kosmos_g.platform import storage


def _png(colour) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 40), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def test_generate_table_resume_and_bad_rows(ray_local, s3_prefix, tmp_path):
    from kosmos_g.models.checkpoint import save_servable
    from kosmos_g.models.config import model_preset
    from kosmos_g.models.kosmos_g import KosmosG
    from kosmos_g.pipelines.generate import done_keys, run

    torch.manual_seed(0)
    bundle = save_servable(KosmosG.from_config(model_preset("tiny")), tmp_path / "bundle")
    red, blue = f"{s3_prefix}/in/red.png", f"{s3_prefix}/in/blue.png"
    storage.write_bytes(red, _png((220, 40, 40)))
    storage.write_bytes(blue, _png((40, 80, 220)))
    rows = [
        {"key": "a", "prompt": "<image> on a green background", "images": [red], "steps": 2, "seed": 1},
        {"key": "b", "prompt": "<image> and <image>", "images": [red, blue], "steps": 2, "scheduler": "ddim"},
        {"key": "c", "prompt": "a red circle", "steps": 2, "negative_prompt": "blurry"},
        {"key": "missing-image", "prompt": "<image> on grass", "images": [f"{s3_prefix}/in/nope.png"], "steps": 2},
        {"key": "bad-prompt", "prompt": "<image> <image>", "images": [red], "steps": 2},
    ]
    table = f"{s3_prefix}/prompts.jsonl"
    storage.write_text(table, "\n".join(json.dumps(r) for r in rows))
    out = f"{s3_prefix}/out"
    summary = run(table, out, str(bundle), batch_size=3)
    assert (summary["generated"], summary["skipped"], summary["already_done"]) == (3, 2, 0)
    from kosmos_g.platform import tracking

    recorded = tracking.client().get_run(summary["run_id"]).data.metrics
    assert (recorded["generated"], recorded["skipped"], recorded["rows"]) == (3, 2, 5)
    assert recorded["images_per_s"] > 0

    results = pq.read_table(io.BytesIO(storage.read_bytes(f"{out}/results.parquet"))).to_pylist()
    assert sorted(r["key"] for r in results) == ["a", "b", "c"]
    for row in results:
        image = Image.open(io.BytesIO(storage.read_bytes(row["image_uri"])))
        assert image.size == (32, 32) and row["denoise_s"] > 0
    first_a = storage.read_bytes(f"{out}/images/a.png")

    # Resume: one new row; done keys are not generated again (their PNGs stay as they were).
    storage.write_text(table, "\n".join(json.dumps(r) for r in rows[:3] + [
        {"key": "d", "prompt": "a blue square", "steps": 2}]))
    from kosmos_g.cli.main import main  # the same job from the shell: kosmos-g generate --batch

    assert main(["generate", "--batch", table, "--out", out, "--model", str(bundle)]) == 0
    assert sorted(done_keys(out)) == ["a", "b", "c", "d"]
    assert storage.read_bytes(f"{out}/images/a.png") == first_a
    results = pq.read_table(io.BytesIO(storage.read_bytes(f"{out}/results.parquet"))).to_pylist()
    assert sorted(r["key"] for r in results) == ["a", "b", "c", "d"]


def test_a_model_folder_without_a_checkpoint_fails_before_any_actor(tmp_path):
    """The driver refuses a folder that holds no Kosmos-G checkpoint (a registered mini decoder
    given as `--model`, say) before Ray Data starts an actor, instead of each actor failing."""
    from kosmos_g.pipelines.generate import generate_rows

    out = tmp_path / "out"
    with pytest.raises(FileNotFoundError, match="no config.json"):
        generate_rows([{"key": "a", "prompt": "a red circle"}], str(out), str(tmp_path))
    assert not out.exists()  # nothing generated, nothing written
