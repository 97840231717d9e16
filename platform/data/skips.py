"""Counting records that a Ray Data job skipped, readable by its driver at the end.

Workers (Ray Data tasks and actors) report {reason: n} to a named Ray actor; the driver
reads the totals with `skip_counts(name)`. The actor is created by the driver
(`ensure_counter`), so it lives exactly as long as the driver's job. Totals are
cumulative: a dataset iterated for three epochs counts its corrupt rows three times;
`reset_skip_counts` starts over.

Reasons used by this project: `decode_error` (image bytes PIL cannot read),
`no_entities` (no usable entity in a compositional record), `empty_mask` (every entity
mask empty or below the minimum area), `missing_field` (no caption / instruction /
image), `too_small` (target image under the configured minimum side),
`url_not_fetched` (importers never download), `missing_file` (importer path not found).
"""

from __future__ import annotations

import collections
import functools

NAMESPACE = "kosmos-g"


class SkipRecord(Exception):
    """Raised for a record that cannot be used; `reason` is its skip-count key."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def _actor_class():
    import ray

    @ray.remote(num_cpus=0, max_restarts=0)
    class SkipCounter:
        def __init__(self):
            self.counts: collections.Counter = collections.Counter()

        def add(self, counts: dict[str, int]) -> None:
            self.counts.update({k: int(v) for k, v in counts.items() if v})

        def get(self) -> dict[str, int]:
            return dict(self.counts)

        def reset(self) -> None:
            self.counts.clear()

    return SkipCounter


@functools.lru_cache(maxsize=1)
def _counter_cls():
    return _actor_class()


# Handles held by the driver: a named actor that is not detached dies with its last handle.
_HANDLES: dict[str, object] = {}


def ensure_counter(name: str):
    """The counter actor called `name`, created if needed (call this on the driver;
    it lives until `drop_counter(name)` or the end of the driver's job). It is placed on the
    node of the process creating it (the driver's, or Ray Train's controller beside it): on any
    other node, that node's loss killed the counter and failed a job its training had survived."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if name not in _HANDLES:
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        _HANDLES[name] = _counter_cls().options(name=name, namespace=NAMESPACE, get_if_exists=True,
                                                scheduling_strategy=here).remote()
    return _HANDLES[name]


def drop_counter(name: str) -> None:
    """Stop the counter actor called `name` (its counts are lost)."""
    import ray

    handle = _HANDLES.pop(name, None) or _lookup(name)
    if handle is not None:
        ray.kill(handle)


def _lookup(name: str):
    import ray

    try:
        return ray.get_actor(name, namespace=NAMESPACE)
    except ValueError:
        return None


class SkipRecorder:
    """Held by a worker: `record({"decode_error": 1})` adds to the named counter.

    The call waits for the actor, so totals are complete once the dataset finished.
    Without a counter (a driver that never created one) counts stay local in `local`."""

    def __init__(self, name: str | None):
        self.name = name
        self.local: collections.Counter = collections.Counter()
        self._handle = None

    def record(self, counts: dict[str, int]) -> None:
        counts = {k: v for k, v in counts.items() if v}
        if not counts:
            return
        self.local.update(counts)
        if self.name is None:
            return
        import ray

        if self._handle is None:
            self._handle = _lookup(self.name)
        if self._handle is not None:
            ray.get(self._handle.add.remote(counts))


def skip_counts(name: str) -> dict[str, int]:
    """Totals recorded so far under `name` ({} if nothing was skipped or no counter)."""
    import ray

    handle = _lookup(name)
    return ray.get(handle.get.remote()) if handle is not None else {}


def reset_skip_counts(name: str) -> None:
    import ray

    handle = _lookup(name)
    if handle is not None:
        ray.get(handle.reset.remote())
