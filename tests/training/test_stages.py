"""The three training stages as real Ray Train + DeepSpeed jobs (two CPU
workers) against the real S3 and MLflow servers, chained through the registry."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import torch

from kosmos_g.platform import storage, tracking
from kosmos_g.platform.train_job import run_stage
from kosmos_g.platform.trainconfig import stage_presets


def _config(stage: int, data_prefixes: dict, s3_root: str, **overrides):
    settings = {"storage_path": f"{s3_root}/ray-train", "train.checkpoint_every": 5, "train.log_every": 5,
                **overrides}
    cfg = stage_presets(stage).get("tiny", [f"{k}={v}" for k, v in settings.items()])
    cfg.data.captions = data_prefixes["captions"]
    cfg.data.compositional = data_prefixes["compositional"]
    cfg.data.editing = data_prefixes["editing"]
    return cfg


def _window_means(run_id: str, metric: str, window: int = 5) -> tuple[float, float]:
    history = sorted(tracking.client().get_metric_history(run_id, metric), key=lambda m: m.step)
    values = [m.value for m in history]
    assert len(values) >= 2 * window, values
    return sum(values[:window]) / window, sum(values[-window:]) / window


@pytest.fixture(scope="module")
def sample_data(stack_env):
    from kosmos_g.platform.samples import write_sample_shards

    root = f"s3://kosmos-test/training-{uuid.uuid4().hex[:8]}"
    return root, write_sample_shards(f"{root}/samples")


@pytest.fixture(scope="module")
def chain(sample_data, ray_local):
    """pretrain → align → instruct, each starting from the previous registration."""
    root, prefixes = sample_data
    tag = uuid.uuid4().hex[:6]
    results = {}
    results[1] = run_stage(_config(1, prefixes, root, name=f"pretrain-{tag}", **{"train.steps": 20}))
    results[2] = run_stage(_config(2, prefixes, root, name=f"align-{tag}", **{"train.steps": 30}))
    results[3] = run_stage(_config(3, prefixes, root, name=f"instruct-{tag}", **{"train.steps": 20}))
    return results


def test_pretrain_lm_loss_falls(chain):
    first, last = _window_means(chain[1].run_id, "loss")
    assert last < first


def test_align_mse_drops_clearly(chain):
    first, last = _window_means(chain[2].run_id, "mse")
    assert last < 0.7 * first, (first, last)
    run = tracking.client().get_run(chain[2].run_id)
    assert run.data.params["stage"] == "2"
    assert run.data.params["optim.betas"] == "[0.9, 0.98]"


def test_instruct_loss_below_start_and_registers_servable_model(chain):
    # Fixed-batch, fixed-noise loss: the per-step loss is dominated by the random timestep.
    history = sorted(tracking.client().get_metric_history(chain[3].run_id, "eval_loss"), key=lambda m: m.step)
    assert history[0].step == 0 and history[-1].step == 20
    assert history[-1].value < history[0].value, [(m.step, m.value) for m in history]
    assert chain[3].registered.startswith("kosmos-g/")
    metrics = tracking.client().get_run(chain[3].run_id).data.metrics
    for key in ("samples_per_s", "tokens_per_s", "lr", "data_wait_fraction", "loss"):
        assert key in metrics
    artifacts = [a.path for a in tracking.client().list_artifacts(chain[3].run_id, "samples")]
    assert artifacts == ["samples/grid.png"]


def test_each_stage_starts_from_the_previous_registration(chain):
    for stage in (2, 3):
        run = tracking.client().get_run(chain[stage].run_id)
        assert run.data.params["init"] == "auto"
    align_version = tracking.client().get_model_version(*chain[2].registered.split("/"))
    assert align_version.run_id == chain[2].run_id


def test_registered_model_matches_trained_weights(chain, tmp_path):
    """The registered bundle reproduces the conditioning of the engine's weights
    as saved by DeepSpeed in the final checkpoint."""
    from kosmos_g.models.checkpoint import load_model

    name, version = chain[3].registered.split("/")
    registered = load_model(tracking.resolve_artifacts(f"models:/{name}/{version}", tmp_path / "reg")).eval()
    checkpoint = storage.local_dir(chain[3].checkpoint_path, tmp_path / "ckpt")
    states = next(Path(checkpoint).rglob("mp_rank_00_model_states.pt"))
    in_memory = load_model(tracking.resolve_artifacts(f"models:/{name}/{version}", tmp_path / "reg2")).eval()
    module_state = torch.load(states, map_location="cpu", weights_only=False)["module"]
    in_memory.load_state_dict(module_state)
    prompts = ["a photo of a cat", "a red cube on a table"]
    with torch.no_grad():
        assert torch.allclose(registered.encode_prompts(prompts), in_memory.encode_prompts(prompts))


def test_killed_worker_recovers_and_resubmission_resumes(sample_data, ray_local):
    root, prefixes = sample_data
    name = f"align-fault-{uuid.uuid4().hex[:6]}"
    first = run_stage(_config(2, prefixes, root, name=name, register=False,
                              **{"train.steps": 8, "train.checkpoint_every": 3, "train.fail_at_step": 5}))
    assert storage.exists(f"{root}/ray-train/{name}/.fault-injected")
    assert first.metrics["step"] == 8
    # Same job name again with more steps: resumes at step 8 in the same MLflow run.
    second = run_stage(_config(2, prefixes, root, name=name, register=False, **{"train.steps": 11}))
    assert second.run_id == first.run_id
    assert second.metrics["step"] == 11
    lr_steps = [m.step for m in tracking.client().get_metric_history(first.run_id, "lr")]
    assert max(lr_steps) == 11
    # Steps 4-5 ran twice (lost since the checkpoint at 3); 9-11 only once: no restart from 0.
    assert lr_steps.count(1) == 1 and lr_steps.count(10) == 1
