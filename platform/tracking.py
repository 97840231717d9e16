"""MLflow helpers shared by every pipeline and by serving.

- one experiment per pipeline (`kosmos-g-<pipeline>`);
- a run is keyed by a stable `run_key` (the job name): a restarted or
  re-submitted job finds and continues the same run instead of opening a new one;
- the resolved config is logged once as params and as `config.yaml`;
- `RunLogger` logs metrics on rank 0 only (other ranks get a no-op logger);
- models are registered as a new version with an alias, and `models:/name@alias`
  (or any storage URI) resolves to a local directory.

All calls go through `MlflowClient` with an explicit run id, never the global
"active run", so they behave the same in a Ray worker as in a script.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

RUN_KEY_TAG = "kosmos_g.run_key"
# MLflow reserves the alias "latest": `models:/name/latest` already means the
# newest version. Each registration also moves this alias to the new version.
DEFAULT_ALIAS = "current"
MAX_PARAM_LENGTH = 6000


def client():
    from mlflow import MlflowClient

    return MlflowClient()


def experiment_name(pipeline: str) -> str:
    return f"kosmos-g-{pipeline}"


def ensure_experiment(name: str) -> str:
    mlflow_client = client()
    experiment = mlflow_client.get_experiment_by_name(name)
    if experiment is not None:
        if experiment.lifecycle_stage == "deleted":
            mlflow_client.restore_experiment(experiment.experiment_id)
        return experiment.experiment_id
    try:
        return mlflow_client.create_experiment(name)
    except Exception:
        # Another worker created it between our lookup and create.
        experiment = mlflow_client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def find_run(experiment_id: str, run_key: str) -> str | None:
    runs = client().search_runs(
        [experiment_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{run_key}'", max_results=1,
        order_by=["attributes.start_time DESC"],
    )
    return runs[0].info.run_id if runs else None


def start_run(pipeline: str, run_key: str, config: Any = None, tags: dict[str, str] | None = None) -> tuple[str, bool]:
    """Return (run_id, resumed). A new run gets the config as params + YAML;
    a resumed run is set back to RUNNING and keeps its params."""
    from kosmos_g.platform.config import flatten, to_yaml

    mlflow_client = client()
    experiment_id = ensure_experiment(experiment_name(pipeline))
    run_id = find_run(experiment_id, run_key)
    if run_id is not None:
        mlflow_client.update_run(run_id, status="RUNNING")
        return run_id, True
    run = mlflow_client.create_run(experiment_id, run_name=run_key, tags={RUN_KEY_TAG: run_key, **(tags or {})})
    run_id = run.info.run_id
    if config is not None:
        log_params(run_id, flatten(config))
        log_text(run_id, to_yaml(config), "config.yaml")
    return run_id, False


def set_tags(run_id: str, tags: dict[str, str]) -> None:
    """Set tags on a run, new or continued (`start_run` tags only the runs it creates)."""
    for key, value in tags.items():
        client().set_tag(run_id, key, value)


def log_params(run_id: str, params: dict[str, Any]) -> None:
    from mlflow.entities import Param

    items = [Param(key, str(value)[:MAX_PARAM_LENGTH]) for key, value in params.items()]
    for start in range(0, len(items), 100):  # the API takes at most 100 params per batch
        client().log_batch(run_id, params=items[start:start + 100])


def log_text(run_id: str, text: str, artifact_file: str) -> None:
    client().log_text(run_id, text, artifact_file)


def log_dir(run_id: str, local_dir: str | os.PathLike, artifact_path: str | None = None) -> None:
    client().log_artifacts(run_id, str(local_dir), artifact_path)


def end_run(run_id: str, status: str = "FINISHED") -> None:
    client().set_terminated(run_id, status=status)


def _metric_batch(metrics: dict[str, float], step: int) -> list:
    from mlflow.entities import Metric

    timestamp = int(time.time() * 1000)
    return [Metric(key, float(value), timestamp, step) for key, value in metrics.items()]


def active_seconds(run_id: str, max_gap_s: float = 900.0) -> float:
    """How long a run was being worked on, from its start, end and every metric's timestamps: the
    gaps between consecutive records summed, leaving out any longer than `max_gap_s` (a run that
    stopped and was continued later, e.g. given more steps, counts only its working sessions).
    What a reused job cost when it trained; a close lower bound (start-up before its first record
    of a continued session is not seen)."""
    run = client().get_run(run_id)
    stamps = {run.info.start_time}
    if run.info.end_time:
        stamps.add(run.info.end_time)
    for key in run.data.metrics:
        stamps.update(metric.timestamp for metric in client().get_metric_history(run_id, key))
    ordered = sorted(stamps)
    gaps = (later - earlier for earlier, later in zip(ordered, ordered[1:]))
    return sum(gap for gap in gaps if gap <= max_gap_s * 1000) / 1000


def log_metrics(run_id: str, metrics: dict[str, float], step: int = 0) -> None:
    """Log a few metrics now, blocking: for drivers' one-off summaries (training steps use
    RunLogger, which never blocks)."""
    client().log_batch(run_id, metrics=_metric_batch(metrics, step))


class RunLogger:
    """Metrics for one run; a no-op on every rank but 0.

    A training step never waits for the tracking server: `log_metrics` only queues, and a
    background thread sends the queue in batches every `flush_every_s` seconds (and on
    `flush()`). A failed send, e.g. while the server restarts, keeps the metrics and retries on
    the next round, so a restart loses nothing unless more than `max_pending` pile up."""

    BATCH = 1000  # MLflow's log_batch limit on metrics per call

    def __init__(self, run_id: str | None, rank: int = 0, flush_every_s: float = 5.0,
                 max_pending: int = 200_000):
        import threading

        self.run_id = run_id
        self.enabled = run_id is not None and rank == 0
        self.flush_every_s = flush_every_s
        self.max_pending = max_pending
        self.dropped = 0
        self._pending: list = []
        self._lock = threading.Lock()  # guards _pending
        self._send_lock = threading.Lock()  # one sender at a time, in order
        self._wake = threading.Event()
        self._closed = False
        self._thread = None
        if self.enabled:
            self._thread = threading.Thread(target=self._run, name="mlflow-metrics", daemon=True)
            self._thread.start()

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if not self.enabled:
            return
        batch = _metric_batch(metrics, step)
        with self._lock:
            self._pending.extend(batch)
            overflow = len(self._pending) - self.max_pending
            if overflow > 0:
                del self._pending[:overflow]
                self.dropped += overflow

    def _send_pending(self) -> bool:
        """Send everything queued; False if the server did not take a batch (kept for later)."""
        with self._send_lock:
            while True:
                with self._lock:
                    batch = self._pending[: self.BATCH]
                if not batch:
                    return True
                try:
                    client().log_batch(self.run_id, metrics=batch)
                except Exception as error:  # noqa: BLE001 - any failure: keep and retry later
                    print(f"[tracking] metrics not sent yet ({type(error).__name__}); will retry", flush=True)
                    return False
                with self._lock:
                    del self._pending[: len(batch)]

    def _run(self) -> None:
        while not self._closed:
            self._wake.wait(self.flush_every_s)
            self._wake.clear()
            self._send_pending()

    def flush(self, timeout_s: float = 60.0) -> bool:
        """Send what is queued now, retrying until `timeout_s`; True when nothing is left."""
        if not self.enabled:
            return True
        deadline = time.monotonic() + timeout_s
        while not self._send_pending():
            if time.monotonic() > deadline:
                return False
            time.sleep(1.0)
        return True

    def close(self) -> None:
        self.flush()
        self._closed = True
        self._wake.set()


# ------------------------------------------------------------------ registry


def register_model(run_id: str, artifact_path: str, name: str, alias: str = DEFAULT_ALIAS,
                   tags: dict[str, str] | None = None, description: str | None = None) -> str:
    """Register `<run artifacts>/<artifact_path>` as a new version of `name`,
    point `alias` at it and return the version number."""
    mlflow_client = client()
    from mlflow.exceptions import MlflowException

    try:
        mlflow_client.create_registered_model(name)
    except MlflowException as error:
        if "RESOURCE_ALREADY_EXISTS" not in str(error.error_code):
            raise
    run = mlflow_client.get_run(run_id)
    source = f"{run.info.artifact_uri.rstrip('/')}/{artifact_path}"
    version = mlflow_client.create_model_version(name, source, run_id=run_id, tags=tags, description=description)
    _wait_until_ready(name, version.version)
    mlflow_client.set_registered_model_alias(name, alias, version.version)
    return version.version


def git_commit() -> str:
    """The checkout's commit (with "-dirty" for local changes), or "unknown" outside git."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + ("-dirty" if dirty else "")


def _wait_until_ready(name: str, version: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = client().get_model_version(name, version).status
        if status == "READY":
            return
        if status == "FAILED_REGISTRATION":
            raise RuntimeError(f"registration of {name} version {version} failed")
        time.sleep(0.5)
    raise TimeoutError(f"{name} version {version} not READY after {timeout}s")


def latest_model_uri(name: str) -> str | None:
    """`models:/name/latest` (the newest version) if `name` has any version, else None."""
    from mlflow.exceptions import MlflowException

    try:
        versions = client().search_model_versions(f"name = '{name}'", max_results=1)
    except MlflowException:
        return None
    return f"models:/{name}/latest" if versions else None


def version_tagged(name: str, key: str, value: str) -> str | None:
    """The newest version of `name` whose tag `key` is `value` (e.g. a config fingerprint), or None."""
    from mlflow.exceptions import MlflowException

    try:
        versions = client().search_model_versions(f"name = '{name}'")
    except MlflowException:
        return None
    matching = [v for v in versions if v.tags.get(key) == value]
    return max(matching, key=lambda v: int(v.version)).version if matching else None


def pin_model_uri(uri: str) -> str:
    """`models:/name/latest` as the concrete newest version (`models:/name/7`), so every worker of
    a job reads the same files; other URIs unchanged. A name without versions is a ValueError."""
    import re

    match = re.fullmatch(r"models:/([\w.-]+)/latest", uri)
    if not match:
        return uri
    name = match.group(1)
    from mlflow.exceptions import MlflowException

    try:
        versions = client().search_model_versions(f"name = '{name}'")
    except MlflowException:
        versions = []
    if not versions:
        raise ValueError(f"{uri}: no version of {name} is registered yet")
    return f"models:/{name}/{max(int(v.version) for v in versions)}"


BUNDLE_ARTIFACT = "bundle"  # the registered MLflow model's artifact holding our bundle


def bundle_of(directory: str | os.PathLike) -> Path:
    """The bundle inside an MLflow model folder (see platform/mlflow_model.py); the folder
    itself when it is a bare bundle."""
    directory = Path(directory)
    inner = directory / "artifacts" / BUNDLE_ARTIFACT
    return inner if (directory / "MLmodel").is_file() and inner.is_dir() else directory


def resolve_artifacts(uri: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """A local directory for `models:/…`, `runs:/…` or a storage URI/path; for a registered
    MLflow model, the bundle inside it."""
    if uri.startswith(("models:/", "runs:/", "mlflow-artifacts:/")):
        import mlflow

        destination = Path(cache_dir) if cache_dir else Path(tempfile.mkdtemp(prefix="kosmos-model-"))
        destination.mkdir(parents=True, exist_ok=True)
        return bundle_of(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(destination)))
    from kosmos_g.platform import storage

    return bundle_of(storage.local_dir(uri, cache_dir))
