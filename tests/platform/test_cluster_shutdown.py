"""A local Ray started by `cluster.connect` leaves no process behind: what outlives
`ray.shutdown()` (a worker that left its raylet but hangs in its own exit, or anything a worker
put in the background) is stopped by `cluster.shutdown`, which also runs at exit."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import psutil

# A fresh local Ray in a process of its own (the suite's Ray must live on). A task puts a sleeper
# in the background, in a session of its own (`sh … &` in a new session: reparented at once and
# out of the worker's process group, so Ray's cleanups of a worker's children and of its process
# group do not reach it; as with a worker that has left its raylet, nothing of Ray does) and the
# script prints its pid, whether ray.shutdown() alone left it running, and what cluster.shutdown()
# stopped; with "exit" it leaves Ray to the exit hooks instead.
SCRIPT = textwrap.dedent("""
    import subprocess, sys, psutil, ray
    from kosmos_g.platform.stack import cluster

    cluster.connect(num_cpus=1)

    @ray.remote(num_cpus=0)
    def start_in_background():
        command = sys.executable + " -c 'import time; time.sleep(300)' >/dev/null 2>&1 & echo $!"
        return int(subprocess.run(["sh", "-c", command], capture_output=True, text=True,
                                  start_new_session=True).stdout)

    pid = ray.get(start_in_background.remote())
    print("sleeper", pid, flush=True)
    if sys.argv[1] == "explicit":
        ray.shutdown()
        print("alive after ray.shutdown", psutil.Process(pid).is_running(), flush=True)
        print("stopped", cluster.shutdown(), flush=True)
""")


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _run(mode: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items()
           if key not in ("RAY_ADDRESS", "KOSMOS_RAY_GCS_ADDRESS", "KOSMOS_STACK_ID")}
    done = subprocess.run([sys.executable, "-c", SCRIPT, mode], env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = dict(line.rsplit(" ", 1) for line in done.stdout.splitlines() if " " in line)
    pid = int(lines["sleeper"])
    try:
        assert not _running(pid), f"the background process {pid} outlived its Ray ({mode})\n{done.stderr[-2000:]}"
    finally:
        if _running(pid):
            psutil.Process(pid).kill()
    return lines


def test_what_outlives_ray_shutdown_is_stopped():
    explicit = _run("explicit")
    assert explicit["alive after ray.shutdown"] == "True"  # Ray alone would leave it running
    assert int(explicit["stopped"]) >= 1
    _run("exit")  # a script that never shuts Ray down: the exit hook does
