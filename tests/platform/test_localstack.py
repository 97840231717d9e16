"""`kosmos-g local up|status|env|down` as a user runs them, on free ports."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from kosmos_g.platform.stack import services
from tests.conftest import REPO_ROOT
from tests.platform.stack_cli import RAY, free_block, parse_exports, port_overrides, run_local


def _serve_deploy_the_shipped_config(tmp_path, env):
    """`serve deploy infra/serve/kosmos-g.yaml` onto the stack (only the port changed, as a user
    on a busy machine would), answered over HTTP, then `serve shutdown`."""
    import time

    import requests
    import yaml

    config = yaml.safe_load((REPO_ROOT / "infra/serve/kosmos-g.yaml").read_text())
    port = services.free_port()
    config["http_options"]["port"] = port
    path = tmp_path / "kosmos-g.yaml"
    path.write_text(yaml.safe_dump(config))
    serve_cli = str(Path(sys.executable).parent / "serve")
    address = ["--address", env["RAY_ADDRESS"]]
    deploy = subprocess.run([serve_cli, "deploy", str(path), *address], capture_output=True, text=True,
                            timeout=300, cwd=REPO_ROOT, env=env)
    assert deploy.returncode == 0, deploy.stdout[-2000:] + deploy.stderr[-2000:]
    try:
        deadline, answer = time.monotonic() + 240, None
        while time.monotonic() < deadline:
            try:
                answer = requests.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
                if answer.status_code == 200:
                    break
            except requests.RequestException:  # the proxy is up before the app
                pass
            time.sleep(2)
        assert answer is not None and answer.status_code == 200, "the deployed app never answered /healthz"
        assert answer.json()["status"] == "ok"
        page = requests.get(f"http://127.0.0.1:{port}/", timeout=30)
        assert page.status_code == 200 and "Kosmos-G playground" in page.text
    finally:
        shutdown = subprocess.run([serve_cli, "shutdown", "--yes", *address], capture_output=True, text=True,
                                  timeout=300, cwd=REPO_ROOT, env=env)
    assert shutdown.returncode == 0, shutdown.stderr[-2000:]


def _submit_fails_on_a_stopped_job(env):
    """infra/local/submit.sh (main-job.sh's `submit`): a job that succeeds passes; one stopped
    mid-run fails the call, where `ray job submit` alone exits 0 for it."""
    import re

    env = {**env, "PATH": f"{Path(sys.executable).parent}:{env.get('PATH', '')}"}

    def submit(code: str) -> subprocess.Popen:
        return subprocess.Popen(["bash", "-c", f'source infra/local/submit.sh && submit python -c "{code}"'],
                                cwd=REPO_ROOT, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    done = submit("print('probe-' + str(2 + 2))")
    output = done.communicate(timeout=300)[0]
    assert done.returncode == 0 and "probe-4" in output, output[-2000:]

    sleeper, lines = submit("import time; time.sleep(300)"), []
    for line in sleeper.stdout:
        lines.append(line)
        if found := re.search(r"Job '(kosmos-g-[\w-]+)' submitted successfully", line):
            break
    assert found, "".join(lines)[-2000:]
    stop = subprocess.run([RAY, "job", "stop", found.group(1)], capture_output=True, text=True, timeout=120, env=env)
    assert stop.returncode == 0, stop.stderr[-2000:]
    output = "".join(lines) + sleeper.communicate(timeout=300)[0]
    assert sleeper.returncode == 1 and f"job {found.group(1)} (python -c" in output and "ended STOPPED" in output, \
        output[-2000:]


def test_up_status_submit_down(tmp_path):
    state = tmp_path / "state"
    overrides = ["--state-dir", str(state), *port_overrides()]
    base_env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_", "MLFLOW_"))}
    try:
        up = run_local("up", *overrides, env=base_env)
        assert up.returncode == 0, up.stderr
        assert "[1/3] starting seaweedfs" in up.stderr and "seaweedfs  ready at http://127.0.0.1" in up.stderr

        again = run_local("up", *overrides, env=base_env)  # idempotent
        assert again.returncode == 0 and again.stderr.count("already running") == 3, again.stderr

        status = run_local("status", "--json", *overrides, env=base_env)
        assert status.returncode == 0
        assert all(item["ready"] for item in json.loads(status.stdout).values())

        env_out = run_local("env", *overrides, env=base_env)
        exported = parse_exports(env_out.stdout)
        for key in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION",
                    "MLFLOW_TRACKING_URI", "RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH"):
            assert key in exported

        # The README's flow: a job submitted from the repo root reaches S3 and MLflow with no flags.
        script = ("import kosmos_g.platform.storage as s, os; "
                  "s.write_bytes(os.environ['KOSMOS_STORAGE_ROOT'] + '/job-probe', b'from-job'); "
                  "print('tracking=' + os.environ['MLFLOW_TRACKING_URI'])")
        job = subprocess.run([RAY, "job", "submit", "--", "python", "-c", script],
                             capture_output=True, text=True, timeout=300, cwd=REPO_ROOT, env={**base_env, **exported})
        assert job.returncode == 0, job.stdout[-2000:] + job.stderr[-2000:]
        assert f"tracking={exported['MLFLOW_TRACKING_URI']}" in job.stdout
        from kosmos_g.platform import storage

        storage._s3_client_for.cache_clear()
        saved = {k: os.environ.get(k) for k in exported}
        os.environ.update(exported)
        try:
            assert storage.read_bytes(exported["KOSMOS_STORAGE_ROOT"] + "/job-probe") == b"from-job"
        finally:
            for k, v in saved.items():
                os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
            storage._s3_client_for.cache_clear()

        # The head's log monitor looks for new log files once a second, not ten times (services.LOG_MONITOR_ENV).
        stack_state = json.loads((state / "stack.json").read_text())
        monitors = [process for process in services.processes_matching(
            services.ray_head_pattern(stack_state["ports"]["ray_gcs"]))
            if any(arg.endswith("log_monitor.py") for arg in process.cmdline())]
        assert len(monitors) == 1, monitors
        assert {key: monitors[0].environ().get(key) for key in services.LOG_MONITOR_ENV} == services.LOG_MONITOR_ENV
        # The MLflow server runs without MLflow's job runner (services.MLFLOW_SERVER_ENV): no huey
        # consumer processes (by now, after a job, they would long have been started).
        commands = [" ".join(process.cmdline()) for process in services.tagged_processes(stack_state["stack_id"])]
        assert any(" server " in command and "mlflow" in command for command in commands), commands
        assert [command for command in commands if "huey" in command] == []

        _submit_fails_on_a_stopped_job({**base_env, **exported})
        _serve_deploy_the_shipped_config(tmp_path, {**base_env, **exported})

        # Without the token the job server refuses the client.
        no_token = {**base_env, "RAY_ADDRESS": exported["RAY_ADDRESS"]}
        refused = subprocess.run([RAY, "job", "list"], capture_output=True,
                                 text=True, timeout=120, env=no_token, cwd=tmp_path)
        assert refused.returncode != 0
    finally:
        down = run_local("down", *overrides, env=base_env)
    assert down.returncode == 0, down.stderr
    saved_state = json.loads((state / "stack.json").read_text())
    assert services.tagged_processes(saved_state["stack_id"]) == []
    # Nothing of the Ray head lives on untagged either (its dashboard and runtime-env agents
    # used to be reparented to init): no process mentions its GCS address any more.
    head = services.ray_head_pattern(saved_state["ports"]["ray_gcs"])
    assert [p.cmdline() for p in services.processes_matching(head)] == []
    status = run_local("status", *overrides, env=base_env)
    assert status.returncode == 1 and "stopped" in status.stdout


def test_up_fails_clearly_when_a_port_is_taken(tmp_path):
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        result = run_local("up", "--state-dir", str(tmp_path), "--set", f"ports.s3={taken}",
                      "--set", f"ports.seaweed_base={free_block(10)}", timeout=120)
    assert result.returncode == 1
    assert f"port(s) already in use by another program: s3={taken}" in result.stderr
    assert "--set ports.s3=PORT" in result.stderr


def test_bad_override_is_rejected(tmp_path):
    result = run_local("env", "--state-dir", str(tmp_path), "--set", "ports.nope=1")
    assert result.returncode == 2 and "unknown key 'ports.nope'" in result.stderr


def test_a_negative_worker_node_count_is_refused_before_anything_starts(tmp_path):
    result = run_local("up", "--worker-nodes", "-1", "--state-dir", str(tmp_path))
    assert result.returncode == 1 and "worker_nodes must be 0 or more, not -1" in result.stderr
    assert not (tmp_path / "stack.json").exists()
