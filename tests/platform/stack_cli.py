"""`kosmos-g local …` as a user runs it, on free ports: shared by the local-stack tests."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

from kosmos_g.platform.stack import services
from tests.conftest import REPO_ROOT

KOSMOS_G = str(Path(sys.executable).parent / "kosmos-g")
RAY = str(Path(sys.executable).parent / "ray")


def free_block(size: int) -> int:
    """A base port with `size` free ports above it."""
    for _ in range(50):
        base = services.free_port()
        if base + size < 65000 and not any(services.port_in_use(base + i) for i in range(1, size + 1)):
            return base
    raise RuntimeError("no free port block")


def _free_everywhere(port: int) -> bool:
    return not services.port_in_use(port) and not services.port_in_use(port, "0.0.0.0")


def port_overrides() -> list[str]:
    """`--set ports.…` for every port of a stack, so a test stack never meets the user's: a free
    block below Linux's ephemeral range (32768+), where the random ports Ray and the OS hand out
    while the stack starts cannot land on one of them (a Ray client server once failed to bind
    a port picked by bind(0) moments before), and above Ray's worker ports (10002-19999)."""
    import random

    for _ in range(100):
        base = random.randrange(20000, 32000, 20)
        if all(_free_everywhere(base + offset) for offset in range(20)):
            ports = {"s3": base, "seaweed_base": base + 1, "mlflow": base + 12, "ray_gcs": base + 13,
                     "ray_dashboard": base + 14, "ray_client": base + 15, "ray_agent": base + 16}
            return [arg for key, value in ports.items() for arg in ("--set", f"ports.{key}={value}")]
    raise RuntimeError("no free block of 20 ports between 20000 and 32000")


def clean_env() -> dict[str, str]:
    """This process's environment without anything that points at a stack."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_", "MLFLOW_", "KOSMOS_"))}


def run_local(*args, env=None, timeout=300):
    return subprocess.run([KOSMOS_G, "local", *args], capture_output=True, text=True, timeout=timeout,
                          env=env or os.environ.copy(), cwd=REPO_ROOT)


def parse_exports(text: str) -> dict[str, str]:
    env = {}
    for line in text.splitlines():
        assert line.startswith("export "), line
        key, value = line[len("export "):].split("=", 1)
        env[key] = shlex.split(value)[0]
    return env
