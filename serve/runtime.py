"""Small pieces the model deployments share: device choice and batch statistics."""

from __future__ import annotations

from collections import Counter

# Serve batches that may wait for the model at once (they are merged by Coalescer).
MAX_WAITING_BATCHES = 64


def pick_device() -> str:
    """CUDA when Ray gave this replica a GPU (CUDA_VISIBLE_DEVICES is set by Ray), else CPU."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class BatchStats:
    """How many requests each replica call handled together (a histogram), plus counters."""

    def __init__(self):
        self.batch_sizes: Counter[int] = Counter()
        self.counters: Counter[str] = Counter()

    def record_batch(self, size: int) -> None:
        self.batch_sizes[size] += 1

    def add(self, name: str, value: int = 1) -> None:
        self.counters[name] += value

    def snapshot(self) -> dict:
        batches = sum(self.batch_sizes.values())
        requests = sum(size * n for size, n in self.batch_sizes.items())
        return {
            "batches": batches,
            "requests": requests,
            "max_batch_size": max(self.batch_sizes, default=0),
            "mean_batch_size": round(requests / batches, 3) if batches else 0.0,
            "batch_sizes": {str(size): n for size, n in sorted(self.batch_sizes.items())},
            **dict(self.counters),
        }


class Coalescer:
    """Merges the batches Serve forms while the model is busy into one compute call.

    Ray Serve (2.60) forms the next `@serve.batch` batch as soon as requests arrive, even
    while the previous batch still computes, so under load it queues many small batches.
    Batch handlers submit here instead: whoever gets the model next computes everything
    pending (oldest first, up to `max_items`), and the batches waiting behind it find
    their results already done. `compute` runs in a worker thread, so the replica keeps
    accepting requests meanwhile; it returns one result (or exception object) per item.
    """

    def __init__(self, compute, max_items: int):
        import asyncio

        self.compute = compute
        self.max_items = max_items
        self.pending: list = []
        self.lock = asyncio.Lock()

    async def submit(self, items: list) -> list:
        import asyncio

        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in items]
        self.pending.extend(zip(items, futures))
        async with self.lock:
            while not all(future.done() for future in futures):
                taken, self.pending = self.pending[:self.max_items], self.pending[self.max_items:]
                try:
                    results = await asyncio.to_thread(self.compute, [item for item, _ in taken])
                except asyncio.CancelledError:
                    # Our caller went away mid-compute: the others in `taken` must not wait forever.
                    for _, future in taken:
                        if not future.done():
                            future.set_result(RuntimeError("the batch computing this request was cancelled"))
                    raise
                except Exception as error:  # compute maps request errors itself; this is a bug
                    results = [error] * len(taken)
                for (_, future), result in zip(taken, results):
                    future.set_result(result)
        return [future.result() for future in futures]
