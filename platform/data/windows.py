"""The `stream` shuffle's read plan and its reading: the blend, windows of shards, their parts.

    windows = stream_windows(sources, data)           # on the driver, from the manifests alone
    plan, filesystems = stream_plan(sources, data)    # which windows the stream reads, in order
    items = list(plan.items(0, 1))                    # one item per task, in stream order
    for table in read_window(pa.Table.from_pylist(items), columns, data.seed, filesystems): ...

`epoch_plan` and `resample` decide how many draws each record gets (every shuffle uses them);
`stream_windows` orders the shards and cuts them into windows; `stream_span` says where a
(resumed) stream begins and how many windows it reads; `StreamPlan.items` cuts them into the
parts one task reads (`_parts`), listed on the driver for a short stream or made by
`generate_items` tasks for a long one; `read_window` reads, resamples and shuffles one part, and
`WindowReader` preprocesses it in the same actor. `datastream.py` builds the Ray datasets.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np
import pyarrow as pa

from kosmos_g.platform import storage
from kosmos_g.platform.data import precomputed, shards
from kosmos_g.platform.data.examples import key_hash

if TYPE_CHECKING:
    from kosmos_g.platform.data.datastream import DataConfig

# The one schema every resampled source is brought to, so the union is a single table type.
BLEND_SCHEMA = pa.schema(
    [("source", pa.string()), ("draw", pa.int32())]
    + [field for field in shards.SCHEMAS["compositional"] if field.name not in ("width", "height")]
    + [field for field in shards.SCHEMAS["editing"] if field.name not in ("key", "edited_caption")]
    # Read only from precomputed sets (platform/data/precomputed.py); null otherwise.
    + [pa.field("teacher", pa.binary()), pa.field("target_latents", pa.binary()), pa.field("target_skip", pa.string())]
    # The mini decoder's U-Net inputs (platform/train/decoder_inputs.py), beside caption shards.
    + [pa.field("latent_moments", pa.binary()), pa.field("condition", pa.binary())]
)


def epoch_plan(counts: dict[str, int], weights: dict[str, float], samples_per_epoch: int) -> dict[str, int]:
    """Examples drawn from each source in one epoch: proportional to the weights."""
    total_weight = sum(weights.values())
    shares = {name: weights[name] / total_weight for name in counts}
    empty = [name for name, count in counts.items() if count == 0]
    if empty:
        raise ValueError(f"shard sets without rows: {', '.join(empty)}")
    total = samples_per_epoch or max(math.ceil(counts[n] / shares[n]) for n in counts)
    return {name: int(round(total * shares[name])) for name in counts}


def resample(table: pa.Table, source: str, count: int, target: int, seed: int) -> pa.Table:
    """Ray Data UDF: repeat each record to reach `target` draws from `count` records.

    Every record is drawn `target // count` times, and once more when a hash of
    (seed, source, key) falls under the remainder fraction: deterministic and
    independent of how the shards are split into blocks."""
    base, remainder = divmod(target, count)
    fraction = remainder / count
    keys = table.column("key").to_pylist()
    extra = np.array([key_hash(seed, source, key) / 2.0**64 < fraction for key in keys], dtype=np.int64)
    repeats = base + extra
    index = np.repeat(np.arange(len(keys)), repeats)
    draws = np.concatenate([np.arange(r) for r in repeats]) if len(keys) else np.zeros(0, np.int64)
    taken = table.take(pa.array(index, type=pa.int64()))
    columns = {}
    for field in BLEND_SCHEMA:
        if field.name == "source":
            columns["source"] = pa.array([source] * len(index), pa.string())
        elif field.name == "draw":
            columns["draw"] = pa.array(draws.astype(np.int32), pa.int32())
        elif field.name in taken.column_names:
            columns[field.name] = taken.column(field.name).cast(field.type)
        else:
            columns[field.name] = pa.nulls(len(index), field.type)
    return pa.table(columns, schema=BLEND_SCHEMA)


def source_manifest(name: str, prefix: str) -> shards.Manifest:
    manifest = shards.read_manifest(prefix)
    if manifest.source != name:
        raise shards.ShardError(f"{prefix} holds {manifest.source!r} shards, expected {name!r}")
    return manifest


def stream_windows(sources, data: DataConfig, siblings: dict[str, str] | None = None) -> list[list[dict]]:
    """The read plan of one epoch: windows of `shuffle_window` shards, each shard a dict of
    (source, uri, count, target). Each source's shards are permuted with the seed, then all
    are merged by how far into its source each shard lies, so every stretch of the epoch
    draws from the sources in proportion to their shares."""
    if data.shuffle_window < 1:
        raise ValueError(f"shuffle_window must be at least 1, got {data.shuffle_window}")
    manifests = {name: source_manifest(name, prefix) for name, prefix, _ in sources}
    plan = epoch_plan({name: m.count for name, m in manifests.items()},
                      {name: weight for name, _, weight in sources}, data.samples_per_epoch)
    rng = np.random.default_rng(data.seed)
    placed = []
    for order, (name, prefix, _) in enumerate(sources):
        manifest, uris = manifests[name], manifests[name].shard_uris(prefix)
        done = 0
        for index in rng.permutation(len(uris)):
            rows = int(manifest.shards[index]["rows"])
            middle = (done + rows / 2) / manifest.count  # how far into its source this shard lies
            placed.append((middle, order, {"source": name, "uri": uris[index], "rows": rows,
                                           "count": manifest.count, "target": plan[name],
                                           "sibling": storage.join(siblings[name], manifest.shards[index]["path"])
                                           if name in (siblings or {}) else None}))
            done += rows
    merged = [shard for _, _, shard in sorted(placed, key=lambda item: item[:2])]
    return [merged[i:i + data.shuffle_window] for i in range(0, len(merged), data.shuffle_window)]


# Rows per block a read task hands on, and the most bytes Ray Data gathers into one block:
# small enough that preprocessing and training start before a window is done.
STREAM_BLOCK_ROWS = 256
STREAM_BLOCK_BYTES = 8 * 1024 * 1024
# The stream's first window goes to the actors in STREAM_HEAD_PARTS tasks of STREAM_HEAD_ROWS,
# STREAM_HEAD_ROWS, 2 x STREAM_HEAD_ROWS, ... rows and the rest. Ray Data passes a task's output on
# when a block is full (thousands of rows) or the task ends, and an actor's finished task reached
# the consumer only once the actor's next task had ended too (Ray 2.60, measured): a head of one
# small task followed by the whole window still waited for the window. Growing parts keep that
# wait to a few hundred rows and re-read the window's shards only a few times.
STREAM_HEAD_ROWS = 256
STREAM_HEAD_PARTS = 5
# Most rows of one task: a window that draws more (a small source resampled many times) is cut
# into parts that run on several actors instead of one; each part reads the window's shards.
STREAM_PART_ROWS = 8192


def read_window(batch: pa.Table, columns: dict[str, list[str]], seed: int, filesystems: dict) -> Iterator[pa.Table]:
    """Ray Data UDF: one window of shards -> its records resampled (as `resample`) and shuffled,
    the item's `part` of them ([first, last) rows of the shuffled window; null: all), in blocks
    of STREAM_BLOCK_ROWS."""
    import json

    for window, plan, part in zip(batch.column("window").to_pylist(), batch.column("shards").to_pylist(),
                                  batch.column("part").to_pylist()):
        parts = []
        for shard in json.loads(plan):
            table = precomputed.read_shard(shard["uri"], columns[shard["source"]], filesystems[shard["source"]],
                                           shard.get("sibling"))
            parts.append(resample(table, shard["source"], shard["count"], shard["target"], seed))
        records = pa.concat_tables(parts)
        order = np.random.default_rng([seed, window]).permutation(records.num_rows)
        if part is not None:  # the same shuffle whatever the part: the parts concatenate to the window
            order = order[part[0]:part[1]]
        records = records.take(pa.array(order, type=pa.int64()))
        for start in range(0, records.num_rows, STREAM_BLOCK_ROWS):
            yield records.slice(start, STREAM_BLOCK_ROWS)


class WindowReader:
    """Ray Data actor UDF of the `stream` shuffle: reads each window item (`read_window`) and hands its
    records to `preprocessor(**kwargs)` in batches of `batch_size`. Reading inside the preprocessing
    actor saves moving raw records between processes; one window item per call (`batch_size=1` in
    `map_batches`) makes a task end, and its output go on, at the end of each item."""

    def __init__(self, preprocessor: Callable, kwargs: dict, columns: dict[str, list[str]], seed: int,
                 filesystems: dict, batch_size: int):
        self.preprocess = preprocessor(**kwargs)
        self.columns, self.seed, self.filesystems, self.batch_size = columns, seed, filesystems, batch_size

    def __call__(self, items: pa.Table) -> Iterator[Any]:
        for records in read_window(items, self.columns, self.seed, self.filesystems):
            # One output per STREAM_BLOCK_ROWS records, not one per preprocessing batch.
            yield _concat([self.preprocess(records.slice(start, self.batch_size))
                           for start in range(0, records.num_rows, self.batch_size)])


def _concat(batches: list) -> Any:
    """pyarrow tables or {column: numpy array} batches -> one batch of the same kind."""
    if isinstance(batches[0], pa.Table):
        return pa.concat_tables(batches)
    return {name: np.concatenate([batch[name] for batch in batches]) for name in batches[0]}


def window_rows(window: list[dict]) -> float:
    """Rows a window is expected to draw: a shard draws rows × target / count records. Expected,
    not counted: resampling decides per record."""
    return sum(shard["rows"] * shard["target"] / shard["count"] for shard in window)


def window_starts(windows: list[list[dict]]) -> tuple[list[float], float]:
    """(expected rows of the epoch before each window, rows of the epoch)."""
    starts, total = [], 0.0
    for window in windows:
        starts.append(total)
        total += window_rows(window)
    return starts, total


def stream_span(windows: list[list[dict]], start_row: int, rows: int | None) -> tuple[int, int]:
    """(first, positions): a stream that begins at the first whole window at or after `start_row`
    rows into the stream and then holds at least `rows` rows (None: to the end of that epoch)
    reads windows (first + p) % len(windows) for p in range(positions), the epoch's plan repeated
    epoch after epoch. A resumed job reads on from where its checkpoint left off instead of
    replaying the epoch's first windows; the rows between the checkpoint and that window boundary
    are skipped, never read twice."""
    starts, epoch_rows = window_starts(windows)
    count = len(windows)
    if epoch_rows <= 0:
        return 0, count
    position = float(start_row) % epoch_rows  # the plan repeats epoch after epoch
    first = next((i for i, start in enumerate(starts) if start >= position - 1e-6), count)
    positions = count - first  # to the end of this epoch (none when past its last window's start)
    if rows is None:
        return first % count, positions or count
    held = epoch_rows - starts[first] if first < count else 0.0
    while held < rows or not positions:
        positions += count
        held += epoch_rows
    return first % count, positions


@dataclass(frozen=True)
class StreamPlan:
    """What a `stream` shuffle reads, in order: `positions` windows from `first` on, the epoch's
    `windows` repeated epoch after epoch, each window as one item or several (`_parts`). It holds
    the epoch's plan once, not the stream's items: a stream as long as a paper-scale job (hundreds
    of thousands of windows) is described by its shards, and its items are made as they are read
    (`items`, `generate_items`)."""

    windows: list[list[dict]]
    first: int
    positions: int

    def items(self, begin: int = 0, end: int | None = None) -> Iterator[dict]:
        """The window items of positions [begin, end): {window, shards (JSON), part}."""
        import json

        count = len(self.windows)
        for position in range(begin, self.positions if end is None else end):
            window = (self.first + position) % count
            shards_json = json.dumps(self.windows[window])
            for part in _parts(window_rows(self.windows[window]), head=position == 0):
                yield {"window": window, "shards": shards_json, "part": part}

    def item_count(self) -> int:
        """len(list(self.items())), from one count per window of the plan."""
        count = len(self.windows)
        if self.positions == 0:
            return 0
        parts = np.array([len(_parts(window_rows(window), head=False)) for window in self.windows])
        head = len(_parts(window_rows(self.windows[self.first % count]), head=True))
        rest = self.positions - 1
        following = (self.first + 1 + np.arange(rest % count)) % count
        return head + (rest // count) * int(parts.sum()) + int(parts[following].sum())

    def chunks(self, most: int) -> list[dict]:
        """At most `most` runs of consecutive positions, {"begin", "end"}, covering the stream."""
        size = max(1, math.ceil(self.positions / most))
        return [{"begin": begin, "end": min(begin + size, self.positions)}
                for begin in range(0, self.positions, size)]


# The window items' columns, as `generate_items` makes them (part: [first, last) rows, or null).
ITEM_SCHEMA = pa.schema([("window", pa.int64()), ("shards", pa.string()), ("part", pa.list_(pa.int64()))])


def generate_items(batch: pa.Table, plan: StreamPlan) -> Iterator[pa.Table]:
    """Ray Data UDF: runs of positions ({"begin", "end"}) -> their window items, one table each."""
    for begin, end in zip(batch.column("begin").to_pylist(), batch.column("end").to_pylist()):
        for item in plan.items(begin, end):
            yield pa.Table.from_pylist([item], schema=ITEM_SCHEMA)


def stream_plan(sources, data: DataConfig, start_row: int = 0, rows: int | None = None,
                siblings: dict[str, str] | None = None) -> tuple[StreamPlan, dict]:
    """(the stream's `StreamPlan`, {source: pyarrow filesystem}); `start_row` and `rows` as in
    `stream_span` (both unset: one epoch, from its first window)."""
    windows = stream_windows(sources, data, siblings)
    first, positions = stream_span(windows, start_row, rows)
    filesystems = {name: storage.pyarrow_filesystem(prefix)[0] for name, prefix, _ in sources}
    return StreamPlan(windows, first, positions), filesystems


def _parts(expected_rows: float, head: bool) -> list[list | None]:
    """[first, last) rows of each part of a window that draws about `expected_rows` (last None:
    to the end; [None]: the window whole): the head parts first when `head`, then STREAM_PART_ROWS."""
    cuts = [STREAM_HEAD_ROWS * 2 ** k for k in range(STREAM_HEAD_PARTS - 1)] if head else []
    # Cut while at least half a part is left after the cut: no stub of a few rows at the end.
    cuts += range((cuts[-1] if cuts else 0) + STREAM_PART_ROWS, math.ceil(expected_rows - STREAM_PART_ROWS / 2),
                  STREAM_PART_ROWS)
    bounds = [0] + [cut for cut in cuts if cut < expected_rows] + [None]
    return [[first, last] for first, last in zip(bounds, bounds[1:])] if len(bounds) > 2 else [None]
