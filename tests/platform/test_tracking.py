import os
import uuid
from dataclasses import dataclass

import pytest

from kosmos_g.platform import storage, tracking


@dataclass
class Cfg:
    lr: float = 0.1
    steps: int = 3


def test_run_params_metrics_artifacts_and_resume(stack_env, s3_server, tmp_path):
    key = f"job-{uuid.uuid4().hex[:8]}"
    run_id, resumed = tracking.start_run("unit", key, Cfg())
    assert not resumed
    logger = tracking.RunLogger(run_id, rank=0)
    logger.log_metrics({"loss": 2.0}, step=0)
    assert logger.flush()
    tracking.RunLogger(run_id, rank=1).log_metrics({"loss": 99.0}, step=0)  # ignored: not rank 0
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "model.safetensors").write_bytes(b"w" * 1000)
    tracking.log_dir(run_id, tmp_path / "weights", "model")

    # A restarted job with the same key continues the same run.
    again, resumed = tracking.start_run("unit", key, Cfg(lr=0.5))
    assert (again, resumed) == (run_id, True)
    resumed_logger = tracking.RunLogger(again)
    resumed_logger.log_metrics({"loss": 1.0}, step=1)
    resumed_logger.close()
    tracking.end_run(run_id)

    run = tracking.client().get_run(run_id)
    assert run.data.params == {"lr": "0.1", "steps": "3"}
    history = tracking.client().get_metric_history(run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(0, 2.0), (1, 1.0)]
    assert run.info.status == "FINISHED"
    # Artifacts were proxied by the MLflow server into the S3 bucket.
    stored = storage.list_uris(f"s3://{s3_server.bucket}/mlflow-artifacts/")
    assert any(uri.endswith(f"{run_id}/artifacts/model/model.safetensors") for uri in stored)
    assert any(uri.endswith(f"{run_id}/artifacts/config.yaml") for uri in stored)


def _register_weights(name: str, content: bytes, tmp_path) -> str:
    """A new run whose `model` artifact is one file holding `content`, registered as `name`;
    returns the version number."""
    run_id, _ = tracking.start_run("unit", f"reg-{uuid.uuid4().hex[:8]}")
    model_dir = tmp_path / uuid.uuid4().hex
    model_dir.mkdir()
    (model_dir / "weights.bin").write_bytes(content)
    tracking.log_dir(run_id, model_dir, "model")
    return tracking.register_model(run_id, "model", name)


def test_register_alias_and_resolve(stack_env, tmp_path):
    name = f"kosmos-g-unit-{uuid.uuid4().hex[:6]}"
    assert tracking.latest_model_uri(name) is None
    versions = []
    for content in (b"v1", b"v2"):
        versions.append(_register_weights(name, content, tmp_path))
    assert versions == ["1", "2"]
    uri = tracking.latest_model_uri(name)
    assert uri == f"models:/{name}/latest"
    assert (tracking.resolve_artifacts(uri, tmp_path / "dl") / "weights.bin").read_bytes() == b"v2"
    by_alias = tracking.resolve_artifacts(f"models:/{name}@{tracking.DEFAULT_ALIAS}", tmp_path / "alias")
    assert (by_alias / "weights.bin").read_bytes() == b"v2"
    local_v1 = tracking.resolve_artifacts(f"models:/{name}/1", tmp_path / "dl1")
    assert (local_v1 / "weights.bin").read_bytes() == b"v1"


def test_resolve_storage_uri(stack_env, s3_prefix, tmp_path):
    storage.write_text(f"{s3_prefix}/m/config.json", "{}")
    assert (tracking.resolve_artifacts(f"{s3_prefix}/m", tmp_path) / "config.json").exists()
    with pytest.raises(storage.StorageNotFound):
        tracking.resolve_artifacts(str(tmp_path / "absent"))


def test_metrics_survive_an_unreachable_server(stack_env, monkeypatch):
    """log_metrics never blocks on the server; what could not be sent is kept and sent later."""
    from kosmos_g.platform.stack.services import free_port

    run_id, _ = tracking.start_run("unit", f"retry-{uuid.uuid4().hex[:8]}")
    real_uri = os.environ["MLFLOW_TRACKING_URI"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")  # nothing listens
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    logger = tracking.RunLogger(run_id, flush_every_s=3600)
    for step in range(3):
        logger.log_metrics({"loss": float(step)}, step)
    assert not logger.flush(timeout_s=0)  # the server is down: nothing lost, nothing sent
    monkeypatch.setenv("MLFLOW_TRACKING_URI", real_uri)  # the server is back
    logger.close()
    history = tracking.client().get_metric_history(run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(0, 0.0), (1, 1.0), (2, 2.0)]


def test_active_seconds_sum_a_runs_working_sessions(stack_env):
    """A run trained 10 min, stopped for a day, then continued for 5.5 min counts 14.5 min: the
    continued session's first minute (before its first record) is not seen."""
    from mlflow.entities import Metric

    client = tracking.client()
    experiment = tracking.ensure_experiment(f"unit-active-{uuid.uuid4().hex[:6]}")
    start = 1_700_000_000_000
    run_id = client.create_run(experiment, start_time=start).info.run_id
    minute, day = 60_000, 24 * 3_600_000
    first = [Metric("loss", 1.0, start + t * minute, t) for t in range(1, 11)]  # 1 min in: first record
    second = [Metric("loss", 0.5, start + 10 * minute + day + t * minute, 10 + t) for t in range(1, 6)]
    client.log_batch(run_id, metrics=first + second)
    client.log_batch(run_id, metrics=[Metric("lr", 1e-3, start + 3 * minute + 30_000, 3)])  # other keys count too
    client.set_terminated(run_id, end_time=start + 15 * minute + day + 30_000)
    assert tracking.active_seconds(run_id) == pytest.approx(10 * 60 + 4 * 60 + 30)
    assert tracking.active_seconds(run_id, max_gap_s=2 * day / 1000) == pytest.approx(day / 1000 + 15.5 * 60)


def test_pinned_version_cache_follows_the_registry_not_the_number(stack_env, tmp_path, monkeypatch):
    """A fresh stack numbers its versions from 1 again: its `name/1` must not be served from the
    cache the previous stack's `name/1` left (found when a third chain's jobs loaded the second's)."""
    from kosmos_g.platform import weights

    monkeypatch.setenv("KOSMOS_CACHE_DIR", str(tmp_path / "cache"))
    name = f"kosmos-g-unit-{uuid.uuid4().hex[:6]}"
    for content in (b"first stack", b"next stack"):
        assert _register_weights(name, content, tmp_path) == "1"
        local = weights.registry_dir(f"models:/{name}/1")
        assert (local / "weights.bin").read_bytes() == content
        assert weights.registry_dir(f"models:/{name}/1") == local  # cached for this version
        tracking.client().delete_registered_model(name)  # the registry starts again from version 1
