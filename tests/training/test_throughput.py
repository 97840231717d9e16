"""The logged rates count training steps only: evaluation and checkpoints run paused."""

from __future__ import annotations

import pytest

from kosmos_g.platform.train import loop


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_paused_time_is_left_out_of_the_rates(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(loop.time, "perf_counter", clock)
    meter = loop.Throughput()
    for _ in range(4):  # four steps of 0.5 s, 8 samples and 100 tokens each, 0.1 s data wait
        clock.now += 0.5
        meter.add((8, 100), waited=0.1)
    with meter.paused():  # an evaluation or checkpoint of 3 s
        clock.now += 3.0
    rates = meter.metrics(world_size=2)
    assert rates["samples_per_s"] == 4 * 8 * 2 / 2.0
    assert rates["tokens_per_step"] == 100 * 2
    assert abs(rates["data_wait_fraction"] - 0.4 / 2.0) < 1e-12


def test_a_pause_that_raises_is_still_left_out(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(loop.time, "perf_counter", clock)
    meter = loop.Throughput()
    clock.now += 1.0
    meter.add((4, 10), waited=0.0)
    try:
        with meter.paused():
            clock.now += 5.0
            raise OSError("checkpoint upload failed")
    except OSError:
        pass
    assert meter.metrics(world_size=1)["samples_per_s"] == 4.0


def test_the_early_first_batch_keeps_the_stream_and_its_errors():
    """FirstBatchEarly fetches the first batch in a thread while the caller builds its model: the
    batches and their order are the stream's, and a stream that fails raises at the first `next`."""
    import threading

    fetched_by = []

    def stream():
        fetched_by.append(threading.current_thread().name)
        yield from ({"step": index} for index in range(4))

    early = loop.FirstBatchEarly(stream())
    assert [next(early)["step"] for _ in range(4)] == [0, 1, 2, 3]
    assert fetched_by[0].startswith("first-batch")  # the generator started in the fetcher thread
    with pytest.raises(StopIteration):
        next(early)

    def broken():
        raise RuntimeError("the training stream produced no full batch")
        yield

    failing = loop.FirstBatchEarly(broken())
    with pytest.raises(RuntimeError, match="no full batch"):
        next(failing)
