"""Connect to Ray: the cluster in `RAY_ADDRESS` when set, else a local Ray
sized to this machine.

`RAY_ADDRESS` may be the dashboard URL (`http://…:8265`, what `ray job submit`
wants and what `kosmos-g local env` exports); `ray.init` needs the GCS address,
so that case maps to the cluster on this machine. `KOSMOS_RAY_GCS_ADDRESS` (set by the local
stack for its shells and jobs) wins over both. Inside a Ray job, Ray itself sets `RAY_ADDRESS`.

`shutdown` (also run at exit for a local Ray) stops what outlives `ray.shutdown()` of a Ray
this process started.
"""

from __future__ import annotations

import atexit
import os
import sys

from kosmos_g.platform.stack.services import STACK_ID_VAR, processes_with_env, stop_processes

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
    context = ray.init(address=address, runtime_env=runtime_env, log_to_driver=True, **init_kwargs)
    if address == "local":
        _started_raylets[:] = _raylet_pids()
        # Registered after Ray's own exit hook, so it runs first and shuts Ray down itself.
        atexit.register(shutdown)
    return context


# The raylets of the local Ray this process started (none when it joined a cluster).
_started_raylets: list[int] = []


def _raylet_pids() -> list[int]:
    from ray._private import ray_constants, worker

    node = worker._global_node
    processes = node.all_processes.get(ray_constants.PROCESS_TYPE_RAYLET, []) if node is not None else []
    return [info.process.pid for info in processes]


def shutdown(grace: float = 5) -> int:
    """`ray.shutdown()`, then stop the processes of a local Ray this process started that
    outlived it; returns how many (none after joining a cluster).

    `ray.shutdown()` stops the raylet, and the raylet stops the workers it still tracks. A worker
    that has already left it but not exited lives on, reparented to init: seen with Ray 2.60, a
    killed Train controller deadlocked in its own exit (`~CoreWorkerProcessImpl` waiting on its
    asio scheduler), and so does a process a worker started in the background. Every process a
    raylet starts, and what they start, carries the raylet's pid in `RAY_RAYLET_PID`."""
    import ray

    atexit.unregister(shutdown)
    ray.shutdown()
    raylets, _started_raylets[:] = list(_started_raylets), []
    leftovers = [process.pid for raylet in raylets for process in processes_with_env("RAY_RAYLET_PID", str(raylet))]
    if not leftovers:
        return 0
    print(f"stopping {len(leftovers)} process(es) of the local Ray that outlived ray.shutdown(): {leftovers}",
          file=sys.stderr, flush=True)
    return stop_processes(leftovers, None, grace)
