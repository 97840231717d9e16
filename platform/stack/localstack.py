"""The embedded local stack: SeaweedFS (S3) + MLflow + a Ray head on 127.0.0.1,
with all state under `<repo>/.kosmos/` (git-ignored).

`up` is idempotent: services already running (recorded pid alive and probe OK)
are left alone. `down` stops exactly what `up` started. `env` prints the
`export` lines a shell (or a test) needs to reach the stack.
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import shutil
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from kosmos_g.platform.stack import services
from kosmos_g.platform.stack.services import RaySettings, S3Settings, ServiceError

ORDER = ("seaweedfs", "mlflow", "ray")


@dataclass
class Ports:
    s3: int = 8333
    # SeaweedFS's internal servers; kept out of Ray's worker port range (10002-19999).
    seaweed_base: int = 8340
    mlflow: int = 5000
    ray_gcs: int = 6379
    ray_dashboard: int = 8265
    ray_client: int = 10001
    # Not Ray's default 52365, which any `ray.init()` on this machine also takes.
    ray_agent: int = 52375


@dataclass
class LocalStackConfig:
    bucket: str = "kosmos-g"
    region: str = "us-east-1"
    ray_num_cpus: int | None = None
    # Extra Ray nodes on this machine (`kosmos-g local up --worker-nodes N`), each joining the
    # head as a second machine would: multi-node placement and node failures, tested locally.
    worker_nodes: int = 0
    worker_num_cpus: int = 1
    worker_object_store_mb: int = 512
    ports: Ports = field(default_factory=Ports)


WORKER_PREFIX = "ray-worker-"


def worker_name(index: int) -> str:
    return f"{WORKER_PREFIX}{index}"


def worker_index(name: str) -> int | None:
    """N of a `ray-worker-N` service; None for the other services."""
    return int(name[len(WORKER_PREFIX):]) if name.startswith(WORKER_PREFIX) else None


def worker_temp_dir(stack_id: str, index: int) -> Path:
    """A worker node's Ray temp dir: short (Ray's Unix sockets live under it), one per node."""
    return Path(tempfile.gettempdir()) / f"ray-{stack_id[:8]}-node{index}"


def repo_root() -> Path:
    """The checkout this package was installed from (jobs run from here)."""
    return Path(__file__).resolve().parents[2]


def default_state_dir() -> Path:
    return Path(os.environ.get("KOSMOS_STATE_DIR", repo_root() / ".kosmos"))


class LocalStack:
    def __init__(self, state_dir: Path | None = None, config: LocalStackConfig | None = None):
        self.state_dir = Path(state_dir or default_state_dir()).resolve()
        self.state_file = self.state_dir / "stack.json"
        self.config = config or LocalStackConfig()

    # ----------------------------------------------------------- state file

    def _load_state(self) -> dict:
        if self.state_file.exists():
            return json.loads(self.state_file.read_text())
        return {}

    def _save_state(self, state: dict) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        temporary = self.state_file.with_suffix(".tmp")
        temporary.write_text(json.dumps(state, indent=2))
        os.replace(temporary, self.state_file)

    def _identity(self) -> dict:
        """Stack id, credentials and ports: created once, reused by every `up`
        so the S3 data and MLflow store stay reachable across restarts."""
        state = self._load_state()
        if "credentials" not in state:
            state.update({
                "stack_id": uuid.uuid4().hex,
                "credentials": {"access_key": "kosmos", "secret_key": secrets.token_urlsafe(24)},
                "bucket": self.config.bucket,
                "region": self.config.region,
                "services": {},
            })
        if "ports" not in state or not self._anything_alive(state):
            # Ports follow the current config whenever nothing is running.
            ports = self.config.ports
            state["ports"] = {"s3": ports.s3, "mlflow": ports.mlflow, "ray_gcs": ports.ray_gcs,
                              "ray_dashboard": ports.ray_dashboard, "ray_client": ports.ray_client,
                              "ray_agent": ports.ray_agent, "seaweed": services.seaweed_ports(ports.s3, ports.seaweed_base)}
        self._save_state(state)
        return state

    def _service_names(self, state: dict) -> list[str]:
        """The three services, then the worker nodes asked for now or recorded as started."""
        recorded = [name for name in state.get("services", {}) if worker_index(name)]
        wanted = [worker_name(index) for index in range(1, self.config.worker_nodes + 1)]
        return [*ORDER, *sorted(set(recorded) | set(wanted), key=worker_index)]

    def _anything_alive(self, state: dict) -> bool:
        return any(self._alive(name, state) for name in state.get("services", {}))

    def s3_settings(self, state: dict) -> S3Settings:
        creds = state["credentials"]
        return S3Settings(creds["access_key"], creds["secret_key"], state["bucket"], state["region"], state["ports"]["s3"])

    def ray_settings(self, state: dict) -> RaySettings:
        ports = state["ports"]
        return RaySettings(ports["ray_gcs"], ports["ray_dashboard"], ports["ray_client"], ports["ray_agent"],
                           self.config.ray_num_cpus, self.state_dir / "ray" / "auth_token")

    def mlflow_url(self, state: dict) -> str:
        return f"http://{services.LOOPBACK}:{state['ports']['mlflow']}"

    def env(self) -> dict[str, str]:
        """The environment clients and jobs use to reach this stack."""
        state = self._identity()
        return {
            **self.s3_settings(state).client_env(),
            **self.ray_settings(state).client_env(),
            "MLFLOW_TRACKING_URI": self.mlflow_url(state),
            "KOSMOS_STORAGE_ROOT": f"s3://{state['bucket']}",
        }

    # --------------------------------------------------------------- status

    def _alive(self, name: str, state: dict) -> bool:
        record = state.get("services", {}).get(name)
        if not record:
            return False
        try:
            process = psutil.Process(record["pid"])
            return process.is_running() and process.status() != psutil.STATUS_ZOMBIE and \
                process.environ().get(services.STACK_ID_VAR) == state["stack_id"]
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            return False

    def _probe(self, name: str, state: dict) -> bool:
        try:
            if name == "seaweedfs":
                return services.s3_round_trip(self.s3_settings(state))
            if name == "mlflow":
                return services.mlflow_ready(self.mlflow_url(state))
            if worker_index(name):
                return services.ray_node_alive(self.ray_settings(state), f"kosmos_node_{worker_index(name)}")
            return services.ray_ready(self.ray_settings(state))
        except Exception:
            return False

    def status(self) -> dict[str, dict]:
        state = self._load_state()
        report = {}
        for name in self._service_names(state):
            record = state.get("services", {}).get(name)
            alive = bool(record) and self._alive(name, state)
            report[name] = {
                "running": alive,
                "ready": alive and self._probe(name, state),
                "pid": record["pid"] if record else None,
                "url": record["url"] if record else None,
            }
        return report

    # ------------------------------------------------------------------- up

    def up(self, log=print) -> dict[str, str]:
        if self.config.worker_nodes < 0:
            raise ServiceError(f"worker_nodes must be 0 or more, not {self.config.worker_nodes}")
        state = self._identity()
        stack_id = state["stack_id"]
        logs = self.state_dir / "logs"
        s3 = self.s3_settings(state)
        ray_settings = self.ray_settings(state)
        self._ensure_ray_token(ray_settings.token_path)
        launched: list[services.Launched] = []
        wanted = [*ORDER, *(worker_name(index) for index in range(1, self.config.worker_nodes + 1))]
        try:
            for number, name in enumerate(wanted, start=1):
                if self._alive(name, state) and self._probe(name, state):
                    log(f"{name:10s} already running (pid {state['services'][name]['pid']})")
                    continue
                self._check_ports(name, state)
                log(f"[{number}/{len(wanted)}] starting {name}, waiting until it answers…")
                if name == "seaweedfs":
                    item = services.start_seaweedfs(self.state_dir / "s3", s3, state["ports"]["seaweed"],
                                                    stack_id, logs / "seaweedfs.log")
                elif name == "mlflow":
                    item = services.start_mlflow(self.state_dir / "mlflow", state["ports"]["mlflow"], s3,
                                                 stack_id, logs / "mlflow.log")
                elif name == "ray":
                    item = services.start_ray_head(ray_settings, self._job_env(), repo_root(), stack_id,
                                                   logs / "ray.log")
                else:
                    index = worker_index(name)
                    item = services.start_ray_worker_node(
                        ray_settings, index, self.config.worker_num_cpus, self.config.worker_object_store_mb,
                        self._job_env(), repo_root(), stack_id, logs / f"{name}.log",
                        worker_temp_dir(stack_id, index))
                launched.append(item)
                state["services"][name] = {"pid": item.process.pid, "url": item.url, "log": str(item.log_path)}
                self._save_state(state)
                log(f"{name:10s} ready at {item.url} (pid {item.process.pid}, log {item.log_path})")
        except BaseException:
            # Leave nothing half-started behind; services that were already up stay up.
            services.stop_processes([item.process.pid for item in launched], stack_id)
            for item in launched:
                state["services"].pop(item.name, None)
            self._save_state(state)
            raise
        return {name: record["url"] for name, record in state["services"].items()}

    def _job_env(self) -> dict[str, str]:
        """What every process of a Ray node (and so every job) inherits: storage and tracking."""
        return {k: v for k, v in self.env().items() if not k.startswith("RAY_")}

    def _check_ports(self, name: str, state: dict) -> None:
        if worker_index(name):
            return  # a worker node takes random ports
        ports = state["ports"]
        if name == "seaweedfs":
            # Every SeaweedFS server port moves with `seaweed_base`, except the S3 one.
            wanted = {("s3" if k == "s3" else f"seaweed_base+{k}"): v for k, v in ports["seaweed"].items()}
        elif name == "mlflow":
            wanted = {"mlflow": ports["mlflow"]}
        else:
            wanted = {k: ports[k] for k in ("ray_gcs", "ray_dashboard", "ray_client", "ray_agent")}
        services.check_ports_free(wanted, setting_prefix="ports.")

    @staticmethod
    def _ensure_ray_token(path: Path) -> None:
        if path.exists() and path.read_text().strip():
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(secrets.token_hex(32))
        path.chmod(0o600)

    # ----------------------------------------------------------------- down

    def down(self, log=print) -> int:
        state = self._load_state()
        if not state.get("services"):
            log("nothing running")
            return 0
        pids = [record["pid"] for record in state["services"].values()]
        # Every process of this stack's Ray head is started with its GCS address.
        stopped = services.stop_processes(pids, state["stack_id"],
                                          pattern=services.ray_head_pattern(state["ports"]["ray_gcs"]))
        for name in list(state["services"]):
            log(f"{name:10s} stopped")
            if worker_index(name):
                shutil.rmtree(worker_temp_dir(state["stack_id"], worker_index(name)), ignore_errors=True)
        state["services"] = {}
        self._save_state(state)
        self._forget_ray_cluster(state["ports"]["ray_gcs"])
        return stopped

    @staticmethod
    def _forget_ray_cluster(gcs_port: int) -> None:
        """Ray remembers the last head it started here and `ray.init()` would try
        to join it after it is gone; forget it when it was ours."""
        marker = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
        try:
            if marker.read_text().strip().endswith(f":{gcs_port}"):
                marker.unlink()
        except OSError:
            pass


def export_lines(env: dict[str, str]) -> str:
    return "\n".join(f"export {key}={shlex.quote(value)}" for key, value in sorted(env.items()))


def describe_failure(error: Exception) -> str:
    if isinstance(error, ServiceError):
        return str(error)
    return f"{type(error).__name__}: {error}"
