"""Which Ray cluster a process joins: the local stack's named GCS wins over Ray's per-machine guess."""

from __future__ import annotations

from kosmos_g.platform.stack.cluster import ray_address


def test_the_stacks_gcs_wins_over_rays_guess(monkeypatch):
    monkeypatch.delenv("KOSMOS_RAY_GCS_ADDRESS", raising=False)
    monkeypatch.delenv("KOSMOS_STACK_ID", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert ray_address() is None  # no cluster asked for: a local Ray
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")
    assert ray_address() == "auto"
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.9:6379")
    assert ray_address() == "10.0.0.9:6379"
    # A shell of the stack (`kosmos-g local env`): the dashboard URL means the stack's GCS; an
    # address the user sets for another cluster is taken as given.
    monkeypatch.setenv("KOSMOS_RAY_GCS_ADDRESS", "127.0.0.1:6379")
    assert ray_address() == "10.0.0.9:6379"
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")
    assert ray_address() == "127.0.0.1:6379"
    # Inside a stack job Ray may hand out another cluster's address (its /tmp/ray bootstrap file
    # is last-writer-wins when tests start a second Ray on the machine): the stack's name wins.
    monkeypatch.setenv("KOSMOS_STACK_ID", "abc123")
    monkeypatch.setenv("RAY_ADDRESS", "192.0.2.2:34375")
    assert ray_address() == "127.0.0.1:6379"
