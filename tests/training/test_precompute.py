"""pipelines/precompute.py against the real S3 server and Ray: teacher outputs (stage 2) and
target latents (stage 3) written beside the shards, read by the stream in their place with the
same loss on the same batch, found by the stage job, and never read once the shards change."""

from __future__ import annotations

import uuid

import numpy as np
import pytest
import torch

from kosmos_g.pipelines import precompute
from kosmos_g.platform import storage, tracking
from kosmos_g.platform.data import precomputed, shards
from kosmos_g.platform.data.datastream import collate_fn, training_dataset
from kosmos_g.platform.train import job
from kosmos_g.platform.train.config import stage_presets
from kosmos_g.platform.train.task import StageTask
from tests.conftest import BUCKET


@pytest.fixture(scope="module")
def sample_data(stack_env):
    from kosmos_g.platform.data.samples import write_sample_shards

    root = f"s3://{BUCKET}/precompute-{uuid.uuid4().hex[:8]}"
    return root, write_sample_shards(f"{root}/samples")


def _settings(prefixes: dict, root: str, **overrides) -> list[str]:
    values = {"init": "random", "storage_path": f"{root}/ray-train", "data.captions": prefixes["captions"],
              "data.compositional": prefixes["compositional"], "data.editing": prefixes["editing"],
              "data.workers": 1, "data.num_cpus": 0.5, **overrides}
    return [f"{key}={value}" for key, value in values.items()]


@pytest.fixture(scope="module")
def compute(sample_data, ray_local):
    """stage -> (config, {source: prefix}) of that stage's set, made once by the job as a user runs it."""
    root, prefixes = sample_data
    settings = _settings(prefixes, root)
    made = {}

    def make(stage: int):
        if stage not in made:
            argv = ["--stage", str(stage), "--preset", "tiny", "--batch-size", "5", "--num-cpus", "0.5"]
            assert precompute.main(argv + [arg for setting in settings for arg in ("--set", setting)]) == 0
            cfg = stage_presets(stage).get("tiny", settings)
            made[stage] = cfg, job.precomputed_siblings(cfg, cfg.model, None)
        return made[stage]

    return make


def _examples(stage, cfg, siblings, counter) -> dict[tuple, dict]:
    cfg.data.skip_counter = counter
    rows = training_dataset(stage, cfg.data, cfg.model, siblings=siblings).take_all()
    return {(row["source"], row["key"], row["draw"]): row for row in rows}


def _batch(stage, cfg, rows: list[dict]) -> dict:
    columns = {name: np.asarray([row.get(name) for row in rows] + [None], dtype=object)[:-1] for name in rows[0]}
    return collate_fn(stage, cfg.model)(columns)


@pytest.mark.parametrize("stage", [2, 3], ids=["teacher", "latents"])
def test_the_stream_reads_precomputed_values_with_the_same_loss(compute, stage):
    cfg, siblings = compute(stage)
    assert set(siblings) == {name for name in ("captions", "compositional", "editing")
                             if stage == 3 or name == "captions"}
    plain = _examples(stage, cfg, {}, f"precompute-plain-{stage}")
    read = _examples(stage, cfg, siblings, f"precompute-read-{stage}")
    assert plain.keys() == read.keys()  # the same records kept and skipped
    chosen = sorted(plain)[:6]
    computed_batch = _batch(stage, cfg, [plain[k] for k in chosen])
    read_batch = _batch(stage, cfg, [read[k] for k in chosen])
    stored = "teacher" if stage == 2 else "target_moments"
    assert stored not in computed_batch and stored in read_batch
    if stage == 3:  # the image is not even read: the latents stand in for it
        assert "target_pixels" not in read_batch and all(read[k]["target_pixels"] is None for k in chosen)
    task = StageTask(stage)
    model = task.build(cfg, None, torch.device("cpu"))
    losses = [task.losses(model, batch, cfg, generator=torch.Generator().manual_seed(7), training=False)["loss"]
              for batch in (computed_batch, read_batch)]
    assert torch.isfinite(losses[0])
    torch.testing.assert_close(losses[1], losses[0])


def test_the_stage_job_reads_them_and_a_rewritten_source_is_not_read(compute, sample_data, capsys):
    cfg, siblings = compute(3)
    root, prefixes = sample_data
    name = f"instruct-precomputed-{uuid.uuid4().hex[:6]}"
    run_cfg = stage_presets(3).get("tiny", _settings(prefixes, root, name=name, register="false",
                                                     **{"train.steps": 2, "sample_grid": "false"}))
    result = job.run_stage(run_cfg)
    assert "read for compositional, editing, captions" in capsys.readouterr().out
    assert tracking.client().get_run(result.run_id).data.tags["precomputed"] == ",".join(siblings)
    # New shards in a source: the set no longer describes them, so the stage computes in the step.
    key = precomputed.precompute_key(3, cfg.model, "random", cfg.data)
    assert precomputed.is_complete(prefixes["captions"], key)
    manifest = shards.read_manifest(prefixes["captions"])
    manifest.created_at = "rewritten"
    shards.write_manifest(prefixes["captions"], manifest)
    assert not precomputed.is_complete(prefixes["captions"], key)
    assert job.precomputed_siblings(cfg, cfg.model, None) == {}
    assert storage.exists(storage.join(siblings["captions"], precomputed.MANIFEST))
