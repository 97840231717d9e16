"""Connect to Ray: the cluster in `RAY_ADDRESS` when set, else a local Ray
sized to this machine.

`RAY_ADDRESS` may be the dashboard URL (`http://…:8265`, what `ray job submit`
wants and what `kosmos-g local env` exports); `ray.init` needs the GCS address,
so that case maps to the cluster on this machine. `KOSMOS_RAY_GCS_ADDRESS` (set by the local
stack for its shells and jobs) wins over both. Inside a Ray job, Ray itself sets `RAY_ADDRESS`.
"""

from __future__ import annotations

import os

from kosmos_g.platform.stack.services import STACK_ID_VAR

# Environment a job's workers need to reach storage and tracking; passed in
# runtime_env so it also holds on clusters whose nodes were started without it.
FORWARDED_ENV = (
    "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION",
    "MLFLOW_TRACKING_URI", "MLFLOW_S3_ENDPOINT_URL", "KOSMOS_STORAGE_ROOT", "KOSMOS_CACHE_DIR",
    "TORCH_EXTENSIONS_DIR",
)


def forwarded_env() -> dict[str, str]:
    return {key: os.environ[key] for key in FORWARDED_ENV if os.environ.get(key)}


def ray_address() -> str | None:
    address = os.environ.get("RAY_ADDRESS")
    if not address:
        return None
    # The local stack names its GCS (its shell env and every job it runs carry it). Ray's own idea
    # of "the cluster on this machine" (`auto`, and the address a job is handed) comes from a
    # last-writer-wins file under /tmp/ray, wrong as soon as a second Ray starts here (tests
    # running beside the stack sent a stack job to the tests' cluster). A process of the stack
    # (its jobs carry the stack id) or a dashboard URL therefore means the named GCS; any other
    # address a user sets (another cluster) is taken as given.
    pinned = os.environ.get("KOSMOS_RAY_GCS_ADDRESS")
    in_stack = bool(os.environ.get(STACK_ID_VAR))
    if pinned and (in_stack or address.startswith(("http://", "https://"))):
        return pinned
    if address.startswith(("http://", "https://")):
        return "auto"
    return address


def quiet_data_progress() -> None:
    """Ray Data's progress bars (also drawn by Ray Train's split coordinator) would flood job logs;
    every job prints its own progress. A dataset keeps the context it was created in, so this is
    set in every process that builds one (a job's driver; Ray Train's controller, which builds
    a stage's stream at every start of the workers) before it does."""
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False


def connect(num_cpus: int | None = None, **init_kwargs):
    """`ray.init` once per process; returns the Ray context."""
    import ray

    quiet_data_progress()
    if ray.is_initialized():
        return ray.get_runtime_context()
    runtime_env = dict(init_kwargs.pop("runtime_env", None) or {})
    runtime_env["env_vars"] = {**forwarded_env(), **runtime_env.get("env_vars", {})}
    address = ray_address()
    if address is None:
        # "local" always starts a fresh Ray; None would join any cluster this
        # machine ran last (even a dead one, via /tmp/ray/ray_current_cluster).
        address = "local"
        init_kwargs.setdefault("num_cpus", num_cpus or os.cpu_count())
        init_kwargs.setdefault("include_dashboard", False)
    elif address != os.environ.get("RAY_ADDRESS"):
        # ray.init would otherwise also read the dashboard URL from the environment.
        os.environ["RAY_ADDRESS"] = address
    return ray.init(address=address, runtime_env=runtime_env, log_to_driver=True, **init_kwargs)
