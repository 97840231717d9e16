"""Start, probe and stop the three services a kosmos-g job talks to: SeaweedFS
(a real S3 server), an MLflow tracking server and a Ray head.

Used by `kosmos-g local up` and by the test fixtures, so the suite runs against
exactly what a user runs. Every process started here carries the environment
variable `KOSMOS_STACK_ID`; stopping a stack kills the recorded pids and any
process still tagged with its id (Ray and MLflow fork helpers), never others.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import psutil

LOOPBACK = "127.0.0.1"
STACK_ID_VAR = "KOSMOS_STACK_ID"
# Ray's log monitor looks for new log files 10 times a second until a session has 1,000 of them; a
# local stack adds ≈ 30 per job, so the search grows with every job and competes with training on
# two cores (≈ 4.7 CPU-s of a tiny stage job after six jobs; 6% of a core while idle). Once a second
# is enough for a new worker's first lines (<0.5 CPU-s a job, 2.5% idle). A user's values win.
LOG_MONITOR_ENV = {"RAY_LOG_MONITOR_MANY_FILES_THRESHOLD": "0", "LOG_NAME_UPDATE_INTERVAL_S": "1"}
# MLflow 3's server starts a job runner by default, for its GenAI jobs: seven huey consumer
# processes that each import MLflow at every start (a stack's first 90 s with them: ≈ 43 CPU-s
# and 8 s of `local up` more, 1.8 GiB more resident; docs/REPRODUCTION.md). The platform runs no
# MLflow server jobs (tracking and the registry need none). A user's value wins.
MLFLOW_SERVER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


class ServiceError(RuntimeError):
    """A service could not be started or did not become ready."""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        return probe.getsockname()[1]


def port_in_use(port: int, host: str = LOOPBACK) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return True
    return False


def check_ports_free(ports: dict[str, int], setting_prefix: str = "") -> None:
    """Raise a ServiceError naming every taken port and the setting that moves it."""
    taken = {name: port for name, port in ports.items() if port_in_use(port)}
    if taken:
        listing = ", ".join(f"{name}={port}" for name, port in taken.items())
        setting = next(iter(taken)).split("+")[0]  # "seaweed_base+filer" is moved by seaweed_base
        raise ServiceError(
            f"port(s) already in use by another program: {listing}. Stop that program or pick "
            f"another port (`kosmos-g local up --set {setting_prefix}{setting}=PORT`)."
        )


def venv_bin(name: str) -> str:
    """A console script installed beside the running interpreter."""
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if not found:
        raise ServiceError(f"`{name}` not found next to {sys.executable} nor on PATH; is the project installed?")
    return found


def wait_until(check: Callable[[], bool], what: str, timeout: float, process: subprocess.Popen | None = None,
               log_path: Path | None = None) -> None:
    """Poll `check` until it returns True; fail fast if `process` exits."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise ServiceError(f"{what} exited with code {process.returncode} during start-up{_log_tail(log_path)}")
        try:
            if check():
                return
        except Exception as error:  # a probe failing is expected until ready
            last_error = error
        time.sleep(0.5)
    detail = f" (last probe error: {last_error})" if last_error else ""
    raise ServiceError(f"{what} not ready after {timeout:.0f}s{detail}{_log_tail(log_path)}")


def _log_tail(log_path: Path | None, lines: int = 15) -> str:
    if not log_path or not log_path.exists():
        return ""
    tail = log_path.read_text(errors="replace").splitlines()[-lines:]
    return f"\n--- last lines of {log_path} ---\n" + "\n".join(tail)


@dataclass
class Launched:
    name: str
    process: subprocess.Popen
    url: str
    log_path: Path


def _spawn(name: str, command: list[str], env: dict[str, str], log_path: Path, cwd: Path | None = None) -> subprocess.Popen:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "ab")
    return subprocess.Popen(
        command, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        start_new_session=True,  # not killed by the terminal's Ctrl-C; stopped by `down`
    )


# ------------------------------------------------------------------ SeaweedFS


@dataclass
class S3Settings:
    access_key: str
    secret_key: str
    bucket: str
    region: str = "us-east-1"
    port: int = 8333

    @property
    def endpoint(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def client_env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": self.region,
            "MLFLOW_S3_ENDPOINT_URL": self.endpoint,
        }


def seaweed_ports(s3_port: int, base: int | None = None) -> dict[str, int]:
    """All ports of a `weed mini`, explicit so none collides with Ray's worker
    range or another stack (weed would otherwise add 10000 for each gRPC port)."""
    ports = {"s3": s3_port}
    names = ["s3_grpc", "master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc", "admin", "admin_grpc"]
    for offset, name in enumerate(names, start=1):
        ports[name] = (base + offset) if base else free_port()
    return ports


def start_seaweedfs(data_dir: Path, settings: S3Settings, ports: dict[str, int], stack_id: str,
                    log_path: Path, timeout: float = 60) -> Launched:
    data_dir.mkdir(parents=True, exist_ok=True)
    # weed remembers its last flags here and would prefer them over ours.
    (data_dir / "mini.options").unlink(missing_ok=True)
    command = [
        venv_bin("weed"), "mini", f"-dir={data_dir}", f"-ip={LOOPBACK}", f"-ip.bind={LOOPBACK}",
        f"-s3.port={ports['s3']}", f"-s3.port.grpc={ports['s3_grpc']}",
        f"-master.port={ports['master']}", f"-master.port.grpc={ports['master_grpc']}",
        f"-volume.port={ports['volume']}", f"-volume.port.grpc={ports['volume_grpc']}",
        f"-filer.port={ports['filer']}", f"-filer.port.grpc={ports['filer_grpc']}",
        f"-admin.port={ports['admin']}", f"-admin.port.grpc={ports['admin_grpc']}", "-admin.ui=false",
        "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
        f"-s3.localSocket={data_dir}/s3.sock", f"-filer.localSocket={data_dir}/filer.sock",
        f"-bucket={settings.bucket}",
    ]
    # With credentials in its environment weed turns S3 signature checks on.
    env = {**os.environ, "AWS_ACCESS_KEY_ID": settings.access_key,
           "AWS_SECRET_ACCESS_KEY": settings.secret_key, STACK_ID_VAR: stack_id}
    env.pop("AWS_ENDPOINT_URL", None)
    process = _spawn("seaweedfs", command, env, log_path)
    wait_until(lambda: s3_round_trip(settings), "SeaweedFS S3", timeout, process, log_path)
    return Launched("seaweedfs", process, settings.endpoint, log_path)


def s3_round_trip(settings: S3Settings) -> bool:
    """A signed PUT, GET and DELETE against the bucket: proves auth and storage work."""
    import boto3
    from botocore.config import Config

    client = boto3.client(
        "s3", endpoint_url=settings.endpoint, aws_access_key_id=settings.access_key,
        aws_secret_access_key=settings.secret_key, region_name=settings.region,
        config=Config(retries={"max_attempts": 1}, connect_timeout=2, read_timeout=5),
    )
    key = ".kosmos-ready-probe"
    client.put_object(Bucket=settings.bucket, Key=key, Body=b"ok")
    ok = client.get_object(Bucket=settings.bucket, Key=key)["Body"].read() == b"ok"
    client.delete_object(Bucket=settings.bucket, Key=key)
    return ok


# --------------------------------------------------------------------- MLflow


def start_mlflow(state_dir: Path, port: int, s3: S3Settings, stack_id: str, log_path: Path,
                 timeout: float = 120) -> Launched:
    state_dir.mkdir(parents=True, exist_ok=True)
    url = f"http://{LOOPBACK}:{port}"
    command = [
        venv_bin("mlflow"), "server", "--host", LOOPBACK, "--port", str(port), "--workers", "1",
        "--backend-store-uri", f"sqlite:///{state_dir / 'mlflow.db'}",
        # Artifacts are proxied: clients upload over HTTP, the server writes to S3.
        "--artifacts-destination", f"s3://{s3.bucket}/mlflow-artifacts",
    ]
    env = {**MLFLOW_SERVER_ENV, **os.environ, **s3.client_env(), STACK_ID_VAR: stack_id}
    process = _spawn("mlflow", command, env, log_path, cwd=state_dir)
    wait_until(lambda: mlflow_ready(url), "MLflow server", timeout, process, log_path)
    return Launched("mlflow", process, url, log_path)


def mlflow_ready(url: str) -> bool:
    import requests

    response = requests.get(f"{url}/api/2.0/mlflow/experiments/search", params={"max_results": 1}, timeout=5)
    return response.status_code == 200


# ------------------------------------------------------------------------ Ray


@dataclass
class RaySettings:
    gcs_port: int = 6379
    dashboard_port: int = 8265
    client_port: int = 10001
    # Ray's default (52365) is fixed; two clusters on one machine must differ.
    agent_port: int = 52365
    num_cpus: int | None = None
    token_path: Path | None = None

    @property
    def gcs_address(self) -> str:
        return f"{LOOPBACK}:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://{LOOPBACK}:{self.dashboard_port}"

    def client_env(self) -> dict[str, str]:
        env = {"RAY_ADDRESS": self.dashboard_url, "KOSMOS_RAY_GCS_ADDRESS": self.gcs_address}
        if self.token_path:
            env.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.token_path)})
        return env


def _ray_node_env(settings: RaySettings, job_env: dict[str, str], stack_id: str) -> dict[str, str]:
    """The environment of a `ray start` (head or worker node): `job_env`, which every job driver and
    worker inherits, the auth token settings, the stack's tag and this venv's scripts on PATH."""
    env = {**LOG_MONITOR_ENV, **os.environ, **job_env, **settings.client_env(), STACK_ID_VAR: stack_id}
    env.pop("RAY_ADDRESS", None)  # `ray start` must not try to join another cluster than it is told
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def start_ray_head(settings: RaySettings, job_env: dict[str, str], cwd: Path, stack_id: str,
                   log_path: Path, timeout: float = 120) -> Launched:
    """`ray start --head --block` from `cwd` (a job's entrypoint runs where the head
    was started) with `job_env` in its environment, which every job driver and
    worker inherits, so jobs reach S3 and MLflow without flags."""
    command = [
        venv_bin("ray"), "start", "--head", "--block", "--disable-usage-stats",
        f"--node-ip-address={LOOPBACK}", f"--port={settings.gcs_port}",
        "--dashboard-host", LOOPBACK, f"--dashboard-port={settings.dashboard_port}",
        f"--ray-client-server-port={settings.client_port}",
        f"--dashboard-agent-listen-port={settings.agent_port}",
    ]
    if settings.num_cpus:
        command.append(f"--num-cpus={settings.num_cpus}")
    process = _spawn("ray", command, _ray_node_env(settings, job_env, stack_id), log_path, cwd=cwd)
    wait_until(lambda: ray_ready(settings), "Ray head", timeout, process, log_path)
    return Launched("ray", process, settings.dashboard_url, log_path)


def start_ray_worker_node(settings: RaySettings, index: int, num_cpus: int, object_store_mb: int,
                          job_env: dict[str, str], cwd: Path, stack_id: str, log_path: Path, temp_dir: Path,
                          timeout: float = 120) -> Launched:
    """One more Ray node on this machine joining the head (`ray start --address … --block`), the
    way a second machine would join a real cluster: its own custom resource `kosmos_node_<index>`
    (so a test can tell the nodes apart), its own temp dir (logs, sockets, spilled objects; a shared
    one made every node's log monitor print every node's worker logs) and random ports, since every
    fixed port (the dashboard agent's, the workers' range) is the head's already.

    Every node advertises the machine's address, not 127.0.0.1: `ray start` replaces a loopback
    `--node-ip-address` by the default route's address on Linux, and its only switch against that
    (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0) also refuses worker nodes. The stack's own services
    (S3, MLflow, the dashboard, the GCS address clients use) stay on 127.0.0.1."""
    command = [
        venv_bin("ray"), "start", f"--address={settings.gcs_address}", "--block", "--disable-usage-stats",
        f"--node-ip-address={LOOPBACK}", f"--num-cpus={num_cpus}", "--num-gpus=0", f"--temp-dir={temp_dir}",
        f"--object-store-memory={object_store_mb * 1024 * 1024}",
        f"--resources={{\"kosmos_node_{index}\": 1}}",
        f"--dashboard-agent-listen-port={free_port()}", "--min-worker-port=0", "--max-worker-port=0",
    ]
    process = _spawn(f"ray-worker-{index}", command, _ray_node_env(settings, job_env, stack_id), log_path,
                     cwd=cwd)
    wait_until(lambda: ray_node_alive(settings, f"kosmos_node_{index}"), f"Ray worker node {index}", timeout,
               process, log_path)
    return Launched(f"ray-worker-{index}", process, settings.gcs_address, log_path)


def dashboard_headers(settings: RaySettings) -> dict[str, str]:
    """The bearer token the head's dashboard (and job server) wants, when auth is on."""
    if settings.token_path and settings.token_path.exists():
        return {"Authorization": f"Bearer {settings.token_path.read_text().strip()}"}
    return {}


def ray_nodes(settings: RaySettings) -> list[dict]:
    """The cluster's nodes as the dashboard reports them (node id, state, resources)."""
    import requests

    answer = requests.get(f"{settings.dashboard_url}/api/v0/nodes", params={"detail": "1", "limit": "100"},
                          headers=dashboard_headers(settings), timeout=10)
    answer.raise_for_status()
    return answer.json()["data"]["result"]["result"]


def ray_node_alive(settings: RaySettings, resource: str) -> bool:
    return any(node.get("state") == "ALIVE" and resource in (node.get("resources_total") or {})
               for node in ray_nodes(settings))


def ray_ready(settings: RaySettings) -> bool:
    # Jobs are handed to the dashboard agent: until it listens, submissions fail.
    if not port_in_use(settings.agent_port):
        return False
    env = {**os.environ, **settings.client_env()}
    env.pop("RAY_ADDRESS", None)
    status = subprocess.run([venv_bin("ray"), "status", f"--address={settings.gcs_address}"],
                            env=env, capture_output=True, timeout=30)
    if status.returncode != 0:
        return False
    import requests

    return requests.get(f"{settings.dashboard_url}/api/version", headers=dashboard_headers(settings),
                        timeout=5).status_code == 200


# ------------------------------------------------------------------- stopping


def processes_with_env(name: str, value: str) -> list[psutil.Process]:
    """Processes (other than this one) whose environment sets `name` to `value`."""
    found = []
    for process in psutil.process_iter():
        try:
            if process.pid != os.getpid() and process.environ().get(name) == value:
                found.append(process)
        except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
    return found


def tagged_processes(stack_id: str) -> list[psutil.Process]:
    """Processes whose environment carries this stack's id."""
    return processes_with_env(STACK_ID_VAR, stack_id)


def processes_matching(pattern: str) -> list[psutil.Process]:
    """Processes with a command-line argument matching the regular expression `pattern` (e.g.
    a Ray head's GCS address, which every agent and worker of that head is started with)."""
    import re

    regex = re.compile(pattern)
    found = []
    for process in psutil.process_iter():
        try:
            if process.pid != os.getpid() and any(regex.search(arg) for arg in process.cmdline()):
                found.append(process)
        except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
    return found


def ray_head_pattern(gcs_port: int) -> str:
    """Matches the `--gcs-address=HOST:PORT` argument of every process of the head on `gcs_port`
    (HOST is whichever address Ray resolved, loopback or not)."""
    return rf"^--gcs[-_]address=[^:\s]+:{int(gcs_port)}$"


def stop_processes(pids: list[int], stack_id: str | None, grace: float = 15,
                   pattern: str | None = None) -> int:
    """SIGTERM the recorded pids with all their descendants, everything tagged with
    `stack_id` and everything with a command-line argument matching `pattern`; SIGKILL what is
    left after `grace` seconds. Returns how many were stopped.

    Descendants are collected before anything is signalled: Ray's dashboard and runtime-env
    agents do not carry the stack's tag and would otherwise be reparented to init and live on;
    `pattern` catches the ones already orphaned (after a crash or a killed raylet)."""
    targets: dict[int, psutil.Process] = {}
    for pid in pids:
        try:
            process = psutil.Process(pid)
            if stack_id is None or process.environ().get(STACK_ID_VAR) == stack_id:
                targets[pid] = process
                for child in process.children(recursive=True):
                    targets.setdefault(child.pid, child)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    for process in processes_matching(pattern) if pattern else []:
        targets.setdefault(process.pid, process)
    for process in targets.values():
        _signal(process, signal.SIGTERM)
    psutil.wait_procs(list(targets.values()), timeout=grace / 2)
    if stack_id:
        for process in tagged_processes(stack_id):
            targets.setdefault(process.pid, process)
            _signal(process, signal.SIGTERM)
    _, alive = psutil.wait_procs(list(targets.values()), timeout=grace / 2)
    for process in alive:
        _signal(process, signal.SIGKILL)
    psutil.wait_procs(alive, timeout=5)
    return len(targets)


def _signal(process: psutil.Process, signum: int) -> None:
    try:
        process.send_signal(signum)
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        pass


@dataclass
class Stopper:
    """Collects launched services so a fixture or a failed `up` can stop them all."""

    stack_id: str
    launched: list[Launched] = field(default_factory=list)

    def stop(self) -> None:
        stop_processes([item.process.pid for item in self.launched], self.stack_id)
        for item in self.launched:
            try:
                item.process.wait(timeout=1)
            except subprocess.TimeoutExpired:
                pass
