"""The training stream of each stage, built with Ray Data from shard prefixes.

    ds = training_dataset(3, DataConfig(captions=..., compositional=..., editing=...), model_cfg)
    for batch in ds.iter_torch_batches(batch_size=8, collate_fn=collate_fn(3, model_cfg)):
        loss = model.diffusion_loss(batch, ...)

Plan (`shuffle="stream"`, the default; the plan and its reading are in windows.py): each
source's shards in a seeded random order, the sources interleaved in proportion to their blend
weights -> windows of `shuffle_window` consecutive shards (only the columns the stage needs),
every record resampled to its share of the epoch and the window's rows shuffled ->
`Preprocessor` (decode, augment, tokenise, resize; corrupt records skipped and counted) ->
rows that `collate_fn` pads into model batches. Reading and preprocessing run together in
`WindowReader` actors, one window (or part of one) per task, and the stream's first window is
handed on in growing parts (256, 256, 512, 1,024 rows, then the rest), so the first batch waits
for the actors' start and a few hundred rows whatever the dataset's size. Memory holds a few
windows. (`"global"`: Ray Data's `random_shuffle` of the whole epoch instead, a barrier that
materialises every record first; `"blocks"`: shard-block order only.)

Stages:
1. multimodal LM: caption text alone or `<image> caption` (captions source, chosen
   with `stage1_text_only_p`) and compositional captions with entity images after
   their words; sources blended by `weights`.
2. alignment: captions only; the batch carries `captions` for the CLIP text teacher.
3. instruction tuning: compositional : editing : captions blended by `weights`
   (2:2:1 as in the paper) with the augmentations, plus `target_pixels`.
Classifier-free-guidance condition dropout is not done here: the model replaces 10% of
conditions itself (`KosmosG.diffusion_loss(..., cond_dropout=0.1)`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pyarrow as pa

from kosmos_g.models.config import ModelConfig
from kosmos_g.platform.data import precomputed, shards, skips
from kosmos_g.platform import storage
from kosmos_g.platform.data.examples import Preprocessor, StreamCollator
# The blend and the stream's read plan (re-exported: jobs, tests and benches use them from here).
from kosmos_g.platform.data.windows import (BLEND_SCHEMA, STREAM_BLOCK_BYTES, StreamPlan, WindowReader,  # noqa: F401
                                            epoch_plan, generate_items, read_window, resample, source_manifest,
                                            stream_plan, stream_span, stream_windows, window_starts)

# Order of DataConfig.weights.
SOURCE_ORDER = ("compositional", "editing", "captions")
STAGE_SOURCES = {1: ("compositional", "captions"), 2: ("captions",), 3: SOURCE_ORDER}
# Columns each stage reads per source; Parquet never fetches the others.
STAGE_COLUMNS = {
    1: {"captions": ["key", "caption", "image"], "compositional": ["key", "caption", "entities"]},
    2: {"captions": ["key", "caption"]},
    3: {"captions": ["key", "caption", "image"], "compositional": ["key", "caption", "image", "entities"],
        "editing": ["key", "input_caption", "input_image", "instruction", "edited_image"]},
}

@dataclass
class DataConfig:
    """What a training job streams. Shard prefixes of None leave a source out."""

    captions: str | None = None
    compositional: str | None = None
    editing: str | None = None
    # Relative weights of (compositional, editing, captions): the paper's stage-3 blend.
    weights: tuple[float, ...] = (2.0, 2.0, 1.0)
    seed: int = 0
    # Examples per pass over the dataset; 0 = just enough that every record of every
    # used source is drawn at least once (smaller sources are repeated to their share).
    samples_per_epoch: int = 0
    drop_entity_text_p: float = 0.5  # stage 3: the entity's words go, its image stays
    keep_background_p: float = 0.5  # compositional: crop with background vs. background removed
    # What stands where the background was removed: "white" (the construction's fill, as
    # released), "random" (a uniformly random colour per crop) or "colours" (one of
    # `fill_colours` per crop, never the entity's own). Tried against a suspected shortcut in the
    # miniature world; neither beat white there (docs/REPRODUCTION.md).
    removed_background: str = "white"
    fill_colours: tuple[tuple[int, int, int], ...] = ()
    drop_input_caption_p: float = 0.5  # stage 3 editing: drop the input image's caption
    stage1_text_only_p: float = 0.5  # stage 1 captions: text alone vs. "<image> caption"
    # Stage 1: pack examples into rows of up to this many tokens (0 = one example per row;
    # the paper preset: 2,048, as released). `train.batch_size` then counts packed rows.
    pack_length: int = 0
    pack_window: int = 256  # examples considered together when packing
    max_entity_images: int = 10  # entity images per compositional example (later ones stay text)
    min_image_side: int = 0  # stage 3: skip targets whose short side is smaller (paper: 384)
    # Stage 2 keeps captions the CLIP teacher sees whole (<= 75 tokens between its start and end
    # tokens) and that are short for the MLLM, as the released loader does (it filters at 85).
    stage2_max_clip_tokens: int = 75
    stage2_max_text_tokens: int = 85
    fast_decode: bool = True  # decode JPEGs at a reduced scale when the output is smaller
    # "stream" (shard order + row shuffle within windows of `shuffle_window` shards; no barrier),
    # "global" (random_shuffle of the whole epoch), "blocks" (block order only) or "none".
    shuffle: str = "stream"
    shuffle_window: int = 4  # shards read and shuffled together by one read task ("stream")
    preserve_order: bool = True  # deterministic order when iterated by one consumer
    batch_size: int = 32  # records per preprocessing call
    workers: int = 2  # most preprocessing actors
    num_cpus: float = 1.0  # CPUs per read task and per preprocessing actor
    skip_counter: str = "kosmos-g-datastream"  # name of the skip-count actor
    # Stages 2 and 3: read the teacher outputs / target latents of pipelines/precompute.py when a
    # complete set for this decoder is beside every source ("auto"), or never ("off").
    precomputed: str = "auto"

    def inert_fields(self) -> tuple[str, ...]:
        """Fields without effect under the current settings (left out of fingerprints).
        `precomputed` never has one on the weights: the losses are the same either way."""
        return ("precomputed",) + (() if self.shuffle == "stream" else ("shuffle_window",))


def stage_sources(stage: int, data: DataConfig) -> list[tuple[str, str, float]]:
    """(source, prefix, weight) of the sources a stage streams, in SOURCE_ORDER."""
    if stage not in STAGE_SOURCES:
        raise ValueError(f"stage must be 1, 2 or 3, got {stage}")
    if len(data.weights) != len(SOURCE_ORDER):
        raise ValueError(f"weights must have {len(SOURCE_ORDER)} entries {SOURCE_ORDER}, got {data.weights}")
    weights = dict(zip(SOURCE_ORDER, data.weights))
    chosen = [(name, getattr(data, name), float(weights[name])) for name in STAGE_SOURCES[stage]
              if getattr(data, name) and weights[name] > 0]
    if not chosen:
        wanted = " or ".join(STAGE_SOURCES[stage])
        raise ValueError(f"stage {stage} needs shards for {wanted} (with a weight > 0)")
    return chosen


def _read_source(name: str, prefix: str, columns: list[str], data: DataConfig, sibling: str | None = None):
    """(records of one source, their count); with `sibling`, its precomputed columns joined
    shard by shard (precomputed.read_shard), else Ray Data's parquet reader."""
    import ray

    manifest = source_manifest(name, prefix)
    uris = manifest.shard_uris(prefix)
    filesystem, _ = storage.pyarrow_filesystem(prefix)
    if sibling is not None:
        items = [{"uri": uri, "sibling": other} for uri, other in precomputed.sibling_uris(prefix, sibling)]
        ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            _read_shards, fn_args=(columns, filesystem), batch_format="pyarrow", batch_size=1,
            num_cpus=data.num_cpus)
        return ds, manifest.count
    paths = [storage.pyarrow_path(uri) for uri in uris]
    ds = ray.data.read_parquet(paths, filesystem=filesystem, columns=columns,
                               num_cpus=data.num_cpus)
    return ds, manifest.count


def _read_shards(batch: pa.Table, columns: list[str], filesystem) -> pa.Table:
    return pa.concat_tables([precomputed.read_shard(uri, columns, filesystem, sibling) for uri, sibling
                             in zip(batch.column("uri").to_pylist(), batch.column("sibling").to_pylist())])


def blended_records(stage: int, data: DataConfig, columns: dict[str, list[str]] | None = None,
                    start_row: int = 0, rows: int | None = None, siblings: dict[str, str] | None = None):
    """The resampled, shuffled shard records of a stage (before preprocessing): one row
    per example with `source`, `key`, `draw` and the raw record columns (by default the
    ones the stage needs; e.g. {"captions": ["key"], ...} to study the blend cheaply).

    `start_row` and `rows` (the `stream` shuffle only): begin at the first window boundary at or
    after `start_row` rows into the stream and hold `rows` rows, epoch after epoch; a resumed job
    continues there. The other shuffles begin again at the start of an epoch.

    `siblings` ({source: prefix}, `precomputed.find`): read each source's precomputed columns
    with its records, and not the record columns they replace."""
    sources, siblings = stage_sources(stage, data), siblings or {}
    columns = _read_columns(stage, columns, siblings)
    if data.shuffle == "stream":
        ds = _streamed_records(sources, columns, data, start_row, rows, siblings)
    else:
        ds = _shuffled_records(sources, columns, data, siblings)
    ds.context.execution_options.preserve_order = data.preserve_order
    return ds


def _read_columns(stage: int, columns: dict[str, list[str]] | None, siblings: dict[str, str]) -> dict:
    """{source: the columns read from its shards}: `columns` (default: the stage's), with the
    precomputed ones in place of those they replace where a source has `siblings`."""
    return {name: precomputed.read_columns(stage, name, list(names), name in siblings)
            for name, names in (columns or STAGE_COLUMNS[stage]).items()}


def _shuffled_records(sources, columns: dict[str, list[str]], data: DataConfig, siblings: dict[str, str]):
    """Ray Data's parquet reader per source, resampled, unioned, then shuffled as a whole."""
    read = {name: _read_source(name, prefix, columns[name], data, siblings.get(name))
            for name, prefix, _ in sources}
    plan = epoch_plan({name: count for name, (_, count) in read.items()},
                      {name: weight for name, _, weight in sources}, data.samples_per_epoch)
    parts = []
    for name, (ds, count) in read.items():
        parts.append(ds.map_batches(resample, fn_args=(name, count, plan[name], data.seed),
                                    batch_format="pyarrow", batch_size=None, num_cpus=data.num_cpus))
    ds = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    if data.shuffle == "global":
        ds = ds.random_shuffle(seed=data.seed, num_cpus=data.num_cpus)
    elif data.shuffle == "blocks":
        ds = ds.randomize_block_order(seed=data.seed)
    elif data.shuffle != "none":
        raise ValueError(f"shuffle must be 'stream', 'global', 'blocks' or 'none', got {data.shuffle!r}")
    return ds


def _streamed_records(sources, columns: dict[str, list[str]], data: DataConfig, start_row: int = 0,
                      rows: int | None = None, siblings: dict[str, str] | None = None):
    """`stream_windows` as a dataset of windows, read by tasks that resample and shuffle each;
    from `start_row` on and for `rows` rows (see `stream_span`)."""
    plan, filesystems = stream_plan(sources, data, start_row, rows, siblings)
    return _over_windows(plan, data, read_window, fn_args=(columns, data.seed, filesystems))


# A stream of at most this many window items lists them on the driver, one block each; a longer
# one makes them in tasks (`generate_items`), at most ITEM_TASKS runs of windows. Listing costs
# a `ray.put` per item: 20,000 items took 53 s before the first row on this 2-core machine, and a
# paper-scale stage-2 job (300,000 steps x 3,584 captions, 4,000-record windows) has ≈ 270,000.
LISTED_ITEMS = 2048
ITEM_TASKS = 256


def _over_windows(plan: StreamPlan, data: DataConfig, fn: Callable, **map_args):
    """The stream's window items as a dataset mapped by `fn`, one item per call."""
    import ray

    item_count = plan.item_count()
    if item_count <= LISTED_ITEMS:
        ds = ray.data.from_items(list(plan.items()), override_num_blocks=item_count)
    else:
        chunks = plan.chunks(ITEM_TASKS)
        # Each task makes its run's items as the stream reaches them (Ray Data holds a generator
        # task back while its output waits), and the repartition, fused into that task, hands
        # each item on as a block of its own, so each reads in a task of its own as when listed.
        # The fusion needs the repartition's default resources (one CPU) on the item task too.
        ds = ray.data.from_items(chunks, override_num_blocks=len(chunks)).map_batches(
            generate_items, fn_args=(plan,), batch_format="pyarrow", batch_size=1,
        ).repartition(target_num_rows_per_block=1)
    ds = ds.map_batches(fn, batch_format="pyarrow", batch_size=1, num_cpus=data.num_cpus, **map_args)
    # Ray Data holds a task's output back until a block reaches this size: with the default (128
    # MiB) a window of small records would come out whole, and the first batch would wait for it.
    ds.context.target_max_block_size = STREAM_BLOCK_BYTES
    ds.context.execution_options.preserve_order = data.preserve_order
    return ds


def _pool(data: DataConfig):
    from ray.data import ActorPoolStrategy

    return ActorPoolStrategy(min_size=1, max_size=max(1, data.workers))


def training_dataset(stage: int, data: DataConfig, model: ModelConfig, start_row: int = 0,
                     rows: int | None = None, siblings: dict[str, str] | None = None):
    """A `ray.data.Dataset` of preprocessed examples for `stage`; batch it with
    `iter_torch_batches(collate_fn=collate_fn(stage, model))`. Skipped records are
    counted under `data.skip_counter` (see `skip_counts`); `start_row`, `rows` and `siblings`
    as in `blended_records`."""
    skips.ensure_counter(data.skip_counter)
    ds = preprocessed_stream(stage, data, Preprocessor, {"stage": stage, "data": data, "model": model},
                             start_row=start_row, rows=rows, siblings=siblings)
    if stage == 1 and data.pack_length > 0:
        from kosmos_g.platform.data.packing import pack_table

        ds = ds.map_batches(pack_table, fn_args=(data.pack_length,), batch_format="pyarrow",
                            batch_size=data.pack_window, num_cpus=0.25)
    return ds


def preprocessed_stream(stage: int, data: DataConfig, preprocessor: Callable, kwargs: dict,
                        columns: dict[str, list[str]] | None = None, start_row: int = 0,
                        rows: int | None = None, siblings: dict[str, str] | None = None):
    """`blended_records` (same arguments) through `preprocessor(**kwargs)` in a pool of actors, in
    batches of `data.batch_size` pyarrow rows. The `stream` shuffle reads each window in the actor
    that preprocesses it (`WindowReader`); the others read first, then preprocess."""
    if data.shuffle != "stream":
        return blended_records(stage, data, columns, start_row, rows, siblings).map_batches(
            preprocessor, fn_constructor_kwargs=kwargs, batch_format="pyarrow", batch_size=data.batch_size,
            num_cpus=data.num_cpus, compute=_pool(data))
    plan, reader_kwargs = _window_reading(stage, data, preprocessor, kwargs, columns, start_row, rows, siblings)
    return _over_windows(plan, data, WindowReader, fn_constructor_kwargs=reader_kwargs, compute=_pool(data))


def _window_reading(stage: int, data: DataConfig, preprocessor: Callable, kwargs: dict,
                    columns: dict[str, list[str]] | None, start_row: int, rows: int | None,
                    siblings: dict[str, str] | None) -> tuple[StreamPlan, dict]:
    """(the `stream` shuffle's `StreamPlan`, `WindowReader`'s constructor arguments), arguments as
    in `preprocessed_stream`."""
    sources, siblings = stage_sources(stage, data), siblings or {}
    plan, filesystems = stream_plan(sources, data, start_row, rows, siblings)
    return plan, {"preprocessor": preprocessor, "kwargs": kwargs, "columns": _read_columns(stage, columns, siblings),
                  "seed": data.seed, "filesystems": filesystems, "batch_size": data.batch_size}


def records_per_packed_row(data: DataConfig, model: ModelConfig, siblings: dict[str, str] | None = None,
                           sample: int = 512) -> float:
    """How many stage-1 records one packed row holds (1.0 without packing), measured on the first
    `sample` records of the stream's first window: read, preprocessed and packed here, in this
    process, as the stream does. The epoch's first window whatever the resume position, so one
    config always gives the same figure. `start_row` and `rows` count records, so a job that wants
    N packed rows asks for about N times this many (train/resume.py)."""
    if data.shuffle != "stream" or data.pack_length <= 0:
        return 1.0
    import dataclasses

    from kosmos_g.platform.data.packing import pack_rows

    # No skip counter: the sample's skipped records are the stream's to count, when it reads them.
    preprocess = {"stage": 1, "data": dataclasses.replace(data, skip_counter=None), "model": model}
    plan, reader_kwargs = _window_reading(1, data, Preprocessor, preprocess, None, 0, None, siblings)
    first = {**next(plan.items(0, 1)), "part": [0, sample]}  # the window's shuffle is the same whatever the part
    reader = WindowReader(**reader_kwargs)
    rows = [row for table in reader(pa.Table.from_pylist([first])) for row in table.to_pylist()]
    return len(rows) / len(pack_rows(rows, data.pack_length)) if rows else 1.0


def collate_fn(stage: int, model: ModelConfig) -> Callable[[dict[str, np.ndarray]], dict[str, Any]]:
    """Pads example rows into the model batch dict (models/prompt.py) plus `captions`
    (stage 2) and `target_pixels` (stage 3)."""
    return StreamCollator(stage, model)


def skip_counts(data: DataConfig | str) -> dict[str, int]:
    """{reason: records skipped} so far by streams using this config's counter."""
    return skips.skip_counts(data if isinstance(data, str) else data.skip_counter)


def reset_skip_counts(data: DataConfig | str) -> None:
    skips.reset_skip_counts(data if isinstance(data, str) else data.skip_counter)
