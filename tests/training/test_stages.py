"""The three training stages as real Ray Train + DeepSpeed jobs (two CPU
workers) against the real S3 and MLflow servers, chained through the registry."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest
import torch

from kosmos_g.platform import storage, tracking
from kosmos_g.platform.train.job import run_stage
from kosmos_g.platform.train.config import stage_presets


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
    from kosmos_g.platform.data.samples import write_sample_shards

    root = f"s3://kosmos-test/training-{uuid.uuid4().hex[:8]}"
    return root, write_sample_shards(f"{root}/samples")


def _eval_table(root: str) -> str:
    """Two prompts with a reference photo each, for the end-of-stage evaluation."""
    import io
    import json

    from PIL import Image
    from skimage import data

    rows = []
    for key, photo in (("cat", data.chelsea()), ("cup", data.coffee())):
        buffer = io.BytesIO()
        Image.fromarray(photo).resize((48, 48)).save(buffer, format="PNG")
        storage.write_bytes(f"{root}/eval/{key}.png", buffer.getvalue())
        rows.append({"key": key, "prompt": f"a photo of <image> in the snow", "images": [f"{root}/eval/{key}.png"],
                     "text": f"a photo of a {key} in the snow"})
    storage.write_text(f"{root}/eval/prompts.jsonl", "\n".join(json.dumps(r) for r in rows))
    return f"{root}/eval/prompts.jsonl"


@pytest.fixture(scope="module")
def chain(sample_data, ray_local, dino_dir, clip_dir):
    """pretrain → align → instruct, each starting from the previous registration.
    Align also loses a worker mid-run (killed hard at step 7, last checkpoint at 5).
    Instruct ends with the end-of-stage evaluation on a two-prompt table."""
    from kosmos_g.pipelines.stage_eval import EndOfStageEval

    root, prefixes = sample_data
    tag = uuid.uuid4().hex[:6]
    names = {stage: f"{name}-{tag}" for stage, name in ((1, "pretrain"), (2, "align"), (3, "instruct"))}
    results = {}
    results[1] = run_stage(_config(1, prefixes, root, name=names[1], **{"train.steps": 10}))
    results[2] = run_stage(_config(2, prefixes, root, name=names[2], **{"train.steps": 20, "train.fail_at_step": 7}))
    evaluation = {"eval.prompts": _eval_table(root), "eval.dino": dino_dir, "eval.clip": clip_dir, "eval.steps": 2}
    results[3] = run_stage(_config(3, prefixes, root, name=names[3], **{"train.steps": 10, **evaluation}),
                           EndOfStageEval())
    return root, results, names


def _eval_history(run_id: str) -> list[tuple[int, float]]:
    history = tracking.client().get_metric_history(run_id, "eval_loss")
    return [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)]


def test_pretrain_lm_loss_falls(chain):
    _, results, _ = chain
    history = _eval_history(results[1].run_id)
    assert history[0][0] == 0 and history[-1][0] == 10
    assert history[-1][1] < history[0][1], history


def test_align_mse_drops_clearly(chain):
    _, results, _ = chain
    first, last = _window_means(results[2].run_id, "mse")
    assert last < 0.7 * first, (first, last)
    run = tracking.client().get_run(results[2].run_id)
    assert run.data.params["stage"] == "2"
    assert run.data.params["optim.betas"] == "[0.9, 0.98]"


def test_instruct_loss_below_start_and_registers_servable_model(chain):
    _, results, _ = chain
    # Fixed-batch, fixed-noise loss: the per-step loss is dominated by the random timestep.
    history = _eval_history(results[3].run_id)
    assert history[0][0] == 0 and history[-1][0] == 10
    assert history[-1][1] < history[0][1], history
    assert results[3].registered.startswith("kosmos-g/")
    metrics = tracking.client().get_run(results[3].run_id).data.metrics
    for key in ("samples_per_s", "tokens_per_s", "tokens_per_step", "lr", "data_wait_fraction", "loss",
                "data_skipped_total"):
        assert key in metrics
    artifacts = [a.path for a in tracking.client().list_artifacts(results[3].run_id, "samples")]
    assert artifacts == ["samples/grid.png"]


def test_instruct_ends_with_an_evaluation_that_reaches_the_version_card(chain):
    _, results, _ = chain
    metrics = tracking.client().get_run(results[3].run_id).data.metrics
    assert metrics["eval_images"] == 2
    for key in ("eval_dino", "eval_clip_i", "eval_clip_t"):
        assert 0.0 <= metrics[key] <= 100.0
    artifacts = [a.path for a in tracking.client().list_artifacts(results[3].run_id, "eval")]
    assert artifacts == ["eval/samples.png"]
    version = tracking.client().get_model_version(*results[3].registered.split("/"))
    assert "final.eval_clip_t" in version.tags


def test_a_bad_evaluation_table_fails_before_training(sample_data, tmp_path):
    from kosmos_g.pipelines.stage_eval import EndOfStageEval
    from kosmos_g.platform.config import ConfigError

    root, prefixes = sample_data
    table = tmp_path / "prompts.jsonl"
    table.write_text('{"key": "a", "prompt": "a cat"}\n')  # no reference image
    cfg = _config(3, prefixes, root, name="never-trains", **{"eval.prompts": str(table), "eval.dino": "d",
                                                              "eval.clip": "c"})
    with pytest.raises(ConfigError, match="every row needs key, prompt and images"):
        run_stage(cfg, EndOfStageEval())
    with pytest.raises(ConfigError, match="no evaluator"):
        run_stage(cfg)
    with pytest.raises(ConfigError, match="needs eval.dino and eval.clip"):
        run_stage(_config(3, prefixes, root, name="never-trains", **{"eval.prompts": str(table)}), EndOfStageEval())


def test_a_job_whose_workers_leave_the_stream_no_whole_cpu_fails_before_its_run(sample_data, ray_local, capsys):
    """Ray Data's file listing takes one whole CPU beside the Train workers' reservation; without it
    the job would hang at its first batch (two 0.5-CPU workers on 2 cores did). The session cluster
    has 4 CPUs: 2 workers x 1.5 and an actor of 0.5 leave 0.5."""
    import ray

    from kosmos_g.platform.config import ConfigError

    root, prefixes = sample_data
    assert ray.cluster_resources()["CPU"] == 4
    name = f"no-room-{uuid.uuid4().hex[:6]}"
    cfg = _config(1, prefixes, root, name=name, init="random",
                  **{"train.cpus_per_worker": 1.5, "data.num_cpus": 0.5})
    with pytest.raises(ConfigError, match=r"4 CPUs; 2 Train worker\(s\) x train.cpus_per_worker=1.5 .* leave 0.5"):
        run_stage(cfg)
    experiment = tracking.client().get_experiment_by_name(tracking.experiment_name("pretrain"))
    assert experiment is None or tracking.find_run(experiment.experiment_id, name) is None
    # One CPU left is enough: the same job with 1.25 per worker is not refused. Where others hold
    # the CPUs it needs (a Serve application on the local stack), it is told why it will wait.
    from kosmos_g.platform.train.job import check_cpu_room

    fits = _config(1, prefixes, root, **{"train.cpus_per_worker": 1.25, "data.num_cpus": 0.5})
    check_cpu_room(fits)
    capsys.readouterr()
    # Hold all but one of the CPUs free now (earlier tests' services may hold some already).
    holder = ray.remote(num_cpus=max(0.0, ray.available_resources().get("CPU", 0) - 1))(_CpuHolder).remote()
    ray.get(holder.ready.remote())
    try:
        deadline = time.monotonic() + 30
        while ray.available_resources().get("CPU", 0) > 1 and time.monotonic() < deadline:
            time.sleep(0.2)  # the GCS's view of the raylet's resources lags a little
        check_cpu_room(fits)
        assert "of the cluster's 4 CPUs are free now and this job needs 4 at once" in capsys.readouterr().err
    finally:
        ray.kill(holder)


class _CpuHolder:
    def ready(self) -> bool:
        return True


def test_each_stage_starts_from_the_previous_registration(chain):
    _, results, _ = chain
    for stage in (2, 3):
        assert tracking.client().get_run(results[stage].run_id).data.params["init"] == "auto"
    align_version = tracking.client().get_model_version(*results[2].registered.split("/"))
    assert align_version.run_id == results[2].run_id
    # The registry alone says what trained a version.
    assert align_version.tags["stage"] == "2" and align_version.tags["steps"] == "20"
    assert align_version.tags["data.captions"].endswith("/captions") and "final.mse" in align_version.tags
    assert len(align_version.tags["git_commit"]) >= 7 and "stage 2 (align)" in align_version.description
    instruct_version = tracking.client().get_model_version(*results[3].registered.split("/"))
    assert instruct_version.tags["sample_grid"] == f"runs:/{results[3].run_id}/samples/grid.png"
    tags = tracking.client().get_run(results[3].run_id).data.tags
    assert tags["stage"] == "3"


def test_killed_worker_recovers_from_its_checkpoint(chain):
    root, results, names = chain
    assert storage.exists(f"{root}/ray-train/{names[2]}/.fault-injected")
    assert results[2].metrics["step"] == 20
    lr_steps = [m.step for m in tracking.client().get_metric_history(results[2].run_id, "lr")]
    # Steps 6-7 ran twice (lost since the checkpoint at 5): their metrics were logged once or
    # twice (what the dead worker still had queued is lost with it); steps up to the
    # checkpoint and after the restart exactly once.
    assert sorted(set(lr_steps)) == list(range(1, 21))
    assert all(lr_steps.count(step) == 1 for step in (1, 5, 8, 12, 20))
    assert lr_steps.count(6) in (1, 2) and lr_steps.count(7) in (1, 2)
    # The restarted workers' stream begins at the checkpoint's position (5 steps × 2 workers × 4
    # rows), not at the epoch's first row again; each start of the workers logs where it began
    # (a restart that must wait for resources starts, and logs, more than once: same position).
    starts = {(m.step, m.value) for m in tracking.client().get_metric_history(results[2].run_id, "data_start_row")}
    assert starts == {(0, 0.0), (5, 40.0)}
    # The fixed-batch eval_loss at the checkpoint's step, logged before the kill and again by each
    # start of the restored workers, on the batch saved with the checkpoint (the restarted
    # stream's first batch is another one): the same value, as the weights are the same.
    history = tracking.client().get_metric_history(results[2].run_id, "eval_loss")
    at_checkpoint = [m.value for m in history if m.step == 5]
    assert len(at_checkpoint) >= 2 and at_checkpoint == pytest.approx([at_checkpoint[0]] * len(at_checkpoint),
                                                                      rel=1e-5), at_checkpoint


def test_registered_model_matches_trained_weights(chain, tmp_path):
    """The registered bundle reproduces the conditioning of the engine's weights
    as saved by DeepSpeed in the final checkpoint."""
    from kosmos_g.models.checkpoint import load_model

    _, results, _ = chain
    name, version = results[3].registered.split("/")
    bundle = tracking.resolve_artifacts(f"models:/{name}/{version}", tmp_path / "reg")
    registered = load_model(bundle).eval()
    checkpoint = storage.local_dir(results[3].checkpoint_path, tmp_path / "ckpt")
    states = next(Path(checkpoint).rglob("mp_rank_00_model_states.pt"))
    in_memory = load_model(bundle).eval()
    # Our own DeepSpeed checkpoint (trusted): its module state is pickled by DeepSpeed.
    in_memory.load_state_dict(torch.load(states, map_location="cpu", weights_only=False)["module"])
    prompts = ["a photo of a cat", "a red cube on a table"]
    with torch.no_grad():
        assert torch.allclose(registered.encode_prompts(prompts), in_memory.encode_prompts(prompts))


def test_resubmitting_the_same_job_resumes(chain, sample_data):
    root, results, names = chain
    _, prefixes = sample_data
    # Torch threads do not decide the weights: the resubmission with two resumes the same run.
    again = run_stage(_config(3, prefixes, root, name=names[3], register=False, sample_grid=False,
                              **{"train.steps": 13, "train.torch_threads": 2}))
    assert again.run_id == results[3].run_id
    assert again.metrics["step"] == 13
    lr_steps = [m.step for m in tracking.client().get_metric_history(again.run_id, "lr")]
    assert sorted(lr_steps) == list(range(1, 14)), "resubmission restarted instead of resuming"


def test_a_registered_config_is_reused_and_a_changed_start_is_refused(chain, sample_data):
    """The same config (any job name) returns the registered version without training; a job
    name whose run started elsewhere, or trained another config, is not silently resumed."""
    from kosmos_g.platform.config import ConfigError

    root, results, names = chain
    _, prefixes = sample_data
    name, version = results[1].registered.split("/")
    assert tracking.client().get_model_version(name, version).tags["config_hash"]
    again = run_stage(_config(1, prefixes, root, name=f"{names[1]}-again",
                              **{"train.steps": 10, "train.torch_threads": 2}))
    assert (again.registered, again.run_id) == (results[1].registered, results[1].run_id)
    experiment = tracking.client().get_experiment_by_name(tracking.experiment_name("pretrain"))
    assert tracking.find_run(experiment.experiment_id, f"{names[1]}-again") is None, "a reused config trained"
    with pytest.raises(ConfigError, match="would resume"):
        run_stage(_config(2, prefixes, root, name=names[2], init="random",
                          **{"train.steps": 20, "train.fail_at_step": 7}))
    # More steps resume (test_resubmitting_the_same_job_resumes); another config does not.
    with pytest.raises(ConfigError, match="another config"):
        run_stage(_config(1, prefixes, root, name=names[1], **{"train.steps": 12, "data.keep_background_p": 0.9}))


def test_a_job_on_the_newest_inputs_gets_its_own_run_where_its_name_is_taken(chain, sample_data):
    """A job that picks its start itself (`init=auto`: the newest registered previous stage) and
    finds its name's run trained on other inputs, as a chain re-run on a newer backbone or stage
    does, trains a run of its own under `<name>-<resume hash>`; the old run is left as it was.
    The same job with its start given explicitly is refused (the test above)."""
    from kosmos_g.platform.train import job

    root, results, names = chain
    _, prefixes = sample_data
    logged = lambda run_id: len(tracking.client().get_metric_history(run_id, "lr"))  # noqa: E731
    before = logged(results[2].run_id)
    newer = run_stage(_config(2, prefixes, root, name=names[2], register=False, sample_grid=False,
                              **{"train.steps": 3, "optim.lr": 2e-4}))
    assert newer.run_id != results[2].run_id and newer.metrics["step"] == 3
    run_name = tracking.client().get_run(newer.run_id).info.run_name
    assert run_name.startswith(f"{names[2]}-") and len(run_name) == len(names[2]) + 9
    assert logged(results[2].run_id) == before and logged(newer.run_id) == 3
    assert not job.follows_latest(_config(2, prefixes, root, init="random"))
    assert job.follows_latest(_config(2, prefixes, root))
    assert not job.follows_latest(_config(1, prefixes, root))
