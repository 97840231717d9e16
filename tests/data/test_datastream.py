"""The training stream: batches per stage, blend ratios, augmentation rates,
determinism and skipped corrupt records (Ray Data over shards in SeaweedFS)."""

from __future__ import annotations

import collections

import numpy as np
import pyarrow as pa
import pytest
import torch

from kosmos_g.models.images import clip_preprocess, vae_preprocess
from kosmos_g.models.prompt import BATCH_KEYS
from kosmos_g.platform.data import datastream, imaging, samples, shards, windows
from kosmos_g.platform.data.datastream import DataConfig, collate_fn, training_dataset
from kosmos_g.platform.data.examples import Preprocessor

BAD_KEYS = {"bad-bytes", "truncated", "no-caption", "no-entities", "bad-edit"}


def _config(prefixes, **overrides) -> DataConfig:
    return DataConfig(**prefixes, num_cpus=0.5, workers=1, **overrides)


def _numpy_batch(table) -> dict[str, np.ndarray]:
    """What iter_torch_batches hands a collate_fn: column name -> object array."""
    return {name: np.asarray(table.column(name).to_pylist() + [None], dtype=object)[:-1] for name in table.column_names}


def _check_batch(batch, stage, cfg):
    extra = {1: set(), 2: {"captions"}, 3: {"target_pixels"}}[stage]
    assert set(batch) == set(BATCH_KEYS) | extra
    size = cfg.mllm.vision.image_size
    b, length = batch["input_ids"].shape
    assert batch["input_ids"].dtype == torch.long
    for name in ("attention_mask", "image_mask", "loss_mask"):
        assert batch[name].dtype == torch.bool and batch[name].shape == (b, length)
    assert batch["pixel_values"].shape[1:] == (3, size, size) and batch["pixel_values"].dtype == torch.float32
    assert int(batch["image_mask"].sum()) == batch["pixel_values"].shape[0] * cfg.mllm.image_tokens
    assert not (batch["loss_mask"] & ~batch["attention_mask"]).any()
    if stage == 2:
        assert len(batch["captions"]) == b and all(isinstance(c, str) and c for c in batch["captions"])
    if stage == 3:
        side = cfg.image_decoder.image_size
        target = batch["target_pixels"]
        assert target.shape == (b, 3, side, side) and target.dtype == torch.float32
        assert target.min() >= -1 and target.max() <= 1


@pytest.fixture(scope="module")
def dirty_shards(sample_shards, stack_env):
    """The sample shards plus corrupt records of every kind, in S3."""
    prefix = sample_shards["captions"].rsplit("/", 1)[0] + "-dirty"
    captions = samples.caption_rows()
    captions += [dict(captions[0], key="bad-bytes", image=b"\x89PNG broken"),
                 dict(captions[1], key="truncated", image=captions[1]["image"][:200]),
                 dict(captions[2], key="no-caption", caption="")]
    composed = samples.compositional_rows()
    composed.append(dict(composed[0], key="no-entities", entities=[]))
    edits = samples.editing_rows()
    edits.append(dict(edits[0], key="bad-edit", edited_image=b"GIF89a nope"))
    for source, rows in (("captions", captions), ("compositional", composed), ("editing", edits)):
        shards.write_rows(f"{prefix}/{source}", source, rows)
    return {source: f"{prefix}/{source}" for source in ("captions", "compositional", "editing")}


@pytest.fixture(scope="module")
def stage3(ray_local, dirty_shards, tiny_cfg):
    """One stage-3 epoch over the dirty shards: (config, example rows)."""
    data = _config(dirty_shards, samples_per_epoch=64, seed=3, skip_counter="test-stage3-skips")
    return data, training_dataset(3, data, tiny_cfg).take_all()


def _batches(stage: int, data: DataConfig, cfg) -> list[dict]:
    return list(training_dataset(stage, data, cfg).iter_torch_batches(batch_size=16, collate_fn=collate_fn(stage, cfg)))


def test_stage1_batches_in_the_same_order_every_time(ray_local, sample_shards, tiny_cfg):
    data = _config(sample_shards, samples_per_epoch=48, seed=5)
    first, second = _batches(1, data, tiny_cfg), _batches(1, data, tiny_cfg)
    for batch in first:
        _check_batch(batch, 1, tiny_cfg)
    assert abs(sum(b["input_ids"].shape[0] for b in first) - 48) <= 8  # last partial repeat drawn per record
    images = sum(int(b["image_mask"].any(dim=1).sum()) for b in first)
    assert 0 < images < sum(b["input_ids"].shape[0] for b in first)  # text-only and interleaved examples
    # Two sources blended, shuffled, preprocessed by actors: the same batches again.
    assert len(first) == len(second)
    for a, b in zip(first, second):
        assert all(torch.equal(a[key], b[key]) for key in BATCH_KEYS)


def test_stage2_batches_carry_captions(ray_local, sample_shards, tiny_cfg):
    batches = _batches(2, _config(sample_shards, samples_per_epoch=40), tiny_cfg)
    for batch in batches:
        _check_batch(batch, 2, tiny_cfg)
    captions = {c for b in batches for c in b["captions"]}
    assert captions <= set(samples.CAPTIONS.values()) and len(captions) == len(samples.CAPTIONS)


def test_stage3_examples_and_batches(stage3, tiny_cfg):
    data, rows = stage3
    assert abs(len(rows) - 64) <= 12
    assert {row["source"] for row in rows} == {"compositional", "editing", "captions"}
    table = pa.Table.from_pylist(rows)
    for start in range(0, table.num_rows, 16):
        _check_batch(collate_fn(3, tiny_cfg)(_numpy_batch(table.slice(start, 16))), 3, tiny_cfg)


def test_collation_reads_the_vocabulary_once_and_no_weights(stage3, tiny_cfg, monkeypatch):
    """Collation runs at every step in the training worker: it localizes the vocabulary once per
    process and never the backbones (a `runs:/` decoder used to be downloaded at every step)."""
    import copy
    import pickle

    from kosmos_g.platform import weights
    from kosmos_g.platform.data import examples

    cfg = copy.deepcopy(tiny_cfg)
    cfg.image_decoder.pretrained_path = "runs:/0123456789abcdef/model"  # no such run: fetching it fails
    cfg.mllm.vision.pretrained_path = "models:/no-such-clip/1"
    fetched, localized = [], []
    monkeypatch.setattr(weights, "registry_dir", lambda uri: fetched.append(uri))
    monkeypatch.setattr(examples, "localize", lambda *args: localized.append(args) or weights.localize(*args))
    collate = collate_fn(3, cfg)
    table = pa.Table.from_pylist(stage3[1])
    for start in (0, 16, 32):
        _check_batch(collate(_numpy_batch(table.slice(start, 16))), 3, cfg)
    assert fetched == [] and len(localized) == 1
    _check_batch(pickle.loads(pickle.dumps(collate))(_numpy_batch(table.slice(0, 16))), 3, cfg)  # as Ray ships it


def test_corrupt_records_are_skipped_and_counted(stage3):
    data, rows = stage3
    assert not BAD_KEYS & {row["key"] for row in rows}
    counts = datastream.skip_counts(data)
    assert set(counts) <= {"decode_error", "missing_field", "no_entities"}
    assert counts.get("decode_error", 0) >= 1 and sum(counts.values()) >= 2
    datastream.reset_skip_counts(data)
    assert datastream.skip_counts(data) == {}


def test_examples_do_not_depend_on_batching_or_order(sample_shards, tiny_cfg):
    """Augmentations are seeded per (seed, stage, source, key, draw): the same example
    whichever actor builds it, in whatever batch and order (in-process)."""
    data = _config(sample_shards, seed=3)
    tables = []
    for source in datastream.SOURCE_ORDER:
        table = shards.read_table(sample_shards[source], columns=datastream.STAGE_COLUMNS[3][source])
        tables.append(datastream.resample(table, source, table.num_rows, 2 * table.num_rows, data.seed))
    records = pa.concat_tables(tables)
    preprocess = Preprocessor(3, data, tiny_cfg)

    def by_id(table):
        return {(r["source"], r["key"], r["draw"]): (bytes(np.asarray(r["input_ids"])), r["clip_pixels"],
                                                      r["target_pixels"]) for r in table.to_pylist()}

    whole = by_id(preprocess(records))
    reversed_records = records.take(pa.array(np.arange(records.num_rows)[::-1]))
    pieces = pa.concat_tables([preprocess(reversed_records.slice(i, 7)) for i in range(0, records.num_rows, 7)])
    assert by_id(pieces) == whole and len(whole) == records.num_rows
    # Another seed draws other repeats and other augmentations.
    other = by_id(Preprocessor(3, _config(sample_shards, seed=4), tiny_cfg)(records))
    assert other != whole
    table = shards.read_table(sample_shards["captions"], columns=["key", "caption"])
    draws = [datastream.resample(table, "captions", table.num_rows, 30, seed).column("key").to_pylist()
             for seed in (3, 4)]
    assert draws[0] != draws[1]


def test_blend_ratios_over_thousands_of_samples(ray_local, sample_shards):
    data = _config(sample_shards, samples_per_epoch=3000, seed=7)
    keys_only = {source: ["key"] for source in datastream.SOURCE_ORDER}
    rows = datastream.blended_records(3, data, keys_only).select_columns(["source", "key", "draw"]).take_all()
    assert abs(len(rows) - 3000) <= 40
    sources = collections.Counter(row["source"] for row in rows)
    for name, share in (("compositional", 0.4), ("editing", 0.4), ("captions", 0.2)):
        assert abs(sources[name] / len(rows) - share) < 0.03, sources
    # Every record is used; small sources are repeated to their share, draws numbered.
    keys = {(row["source"], row["key"]) for row in rows}
    assert len(keys) == len(samples.CAPTIONS) + len(samples.ENTITIES) + 2 * len(samples.EDITED_PHOTOS)
    assert len({(row["source"], row["key"], row["draw"]) for row in rows}) == len(rows)


def test_augmentation_rates(sample_shards, tiny_cfg):
    """The stage-3 augmentation probabilities over ~2000 draws each (in-process, the
    same Preprocessor the stream's actors run)."""
    data = _config(sample_shards, seed=11)
    tables = []
    for source, draws in (("compositional", 900), ("editing", 1200)):
        table = shards.read_table(sample_shards[source], columns=datastream.STAGE_COLUMNS[3][source])
        tables.append(datastream.resample(table, source, table.num_rows, draws, data.seed))
    rows = Preprocessor(3, data, tiny_cfg)(pa.concat_tables(tables)).to_pylist()
    compositional = [row for row in rows if row["source"] == "compositional"]
    entities = sum(row["n_entities"] for row in compositional)
    assert entities > 2000
    # One draw per example (as released): all of an example's entity words go, or none do.
    assert all(row["n_entity_text_dropped"] in (0, row["n_entities"]) for row in compositional)
    dropped = [row["n_entity_text_dropped"] > 0 for row in compositional]
    assert abs(np.mean(dropped) - 0.5) < 0.06
    assert abs(sum(row["n_background_kept"] for row in compositional) / entities - 0.5) < 0.04
    editing = [row for row in rows if row["source"] == "editing"]
    assert abs(np.mean([row["input_caption_dropped"] for row in editing]) - 0.5) < 0.05
    assert all(row["n_images"] == 1 for row in editing)
    # A dropped entity text leaves its image: images == entities, fewer text tokens.
    assert all(row["n_images"] == row["n_entities"] for row in compositional)


def test_pixels_match_model_preprocessing(sample_shards, tiny_cfg):
    """The stream's uint8 transport + collate equals models.images.clip/vae_preprocess."""
    data = _config(sample_shards, fast_decode=False, drop_input_caption_p=0.0)
    table = shards.read_table(sample_shards["editing"], columns=datastream.STAGE_COLUMNS[3]["editing"])
    records = datastream.resample(table, "editing", table.num_rows, table.num_rows, 0)
    batch = collate_fn(3, tiny_cfg)(_numpy_batch(Preprocessor(3, data, tiny_cfg)(records)))
    first = table.to_pylist()[0]
    clip = clip_preprocess(imaging.decode_image(first["input_image"]), tiny_cfg.mllm.vision.image_size)
    target = vae_preprocess(imaging.decode_image(first["edited_image"]), tiny_cfg.image_decoder.image_size)
    assert torch.equal(batch["pixel_values"][0], clip) and torch.equal(batch["target_pixels"][0], target)
    assert batch["loss_mask"][0].any() and batch["input_ids"][0, 0] == 1  # <s>


def test_config_validation(sample_shards):
    with pytest.raises(ValueError, match="stage 2 needs"):
        datastream.stage_sources(2, DataConfig(editing=sample_shards["editing"]))
    with pytest.raises(ValueError, match="weights"):
        datastream.stage_sources(3, DataConfig(**sample_shards, weights=(1.0, 1.0)))
    only = datastream.stage_sources(3, DataConfig(**sample_shards, weights=(0.0, 2.0, 1.0)))
    assert [name for name, _, _ in only] == ["editing", "captions"]
    assert datastream.epoch_plan({"a": 10, "b": 10}, {"a": 2.0, "b": 1.0}, 0) == {"a": 20, "b": 10}


def test_stage2_keeps_captions_the_teacher_sees_whole(tiny_cfg):
    """As released: stage 2 skips captions over 75 CLIP tokens or too long for the MLLM."""
    rows = [{"source": "captions", "key": f"k{i}", "draw": 0, "caption": caption}
            for i, caption in enumerate(["a red circle on a blue background", " ".join(["dog"] * 80),
                                         " ".join(["cat"] * 40)])]
    table = pa.Table.from_pylist(rows)
    preprocess = Preprocessor(2, DataConfig(captions="unused", skip_counter=None), tiny_cfg)
    kept = preprocess(table).column("key").to_pylist()
    assert kept == ["k0", "k2"] and preprocess.skips.local == {"caption_too_long_for_clip": 1}
    strict = Preprocessor(2, DataConfig(captions="unused", skip_counter=None, stage2_max_text_tokens=20), tiny_cfg)
    assert strict(table).column("key").to_pylist() == ["k0"]
    assert strict.skips.local["caption_too_long"] == 2


@pytest.fixture(scope="module")
def many_shards(sample_shards, stack_env):
    """The sample captions and compositional rows cut into shards of 2 rows (9 + 3 shards)."""
    prefix = sample_shards["captions"].rsplit("/", 1)[0] + "-many"
    shards.write_rows(f"{prefix}/captions", "captions", samples.caption_rows(), rows_per_shard=2)
    shards.write_rows(f"{prefix}/compositional", "compositional", samples.compositional_rows(), rows_per_shard=2)
    return {source: f"{prefix}/{source}" for source in ("captions", "compositional")}


def _epoch(data: DataConfig, **position) -> list[tuple[str, str, int]]:
    keys_only = {source: ["key"] for source in datastream.SOURCE_ORDER}
    rows = datastream.blended_records(1, data, keys_only, **position).take_all()
    return [(row["source"], row["key"], row["draw"]) for row in rows]


def _operators(ds) -> str:
    """The names of every operator of a dataset's logical plan (str(dag) names the last only)."""
    names, pending = [], [ds._logical_plan.dag]
    while pending:
        op = pending.pop()
        names.append(op.name)
        pending += op.input_dependencies
    return " <- ".join(names)


def test_stream_shuffle_reorders_the_global_epoch_without_a_barrier(ray_local, many_shards):
    """`shuffle="stream"` draws exactly what the whole-epoch shuffle draws (same resampling),
    in an order fixed by the seed; its plan holds no all-to-all operator (no shuffle barrier), and
    the sources are interleaved in proportion along the epoch rather than one after the other."""
    data = _config(many_shards, samples_per_epoch=60, seed=5, shuffle_window=2)
    streamed = _epoch(data)
    assert sorted(streamed) == sorted(_epoch(_config(many_shards, samples_per_epoch=60, seed=5, shuffle="global")))
    assert streamed == _epoch(data)  # same seed, same order
    assert streamed != _epoch(_config(many_shards, samples_per_epoch=60, seed=6, shuffle_window=2))
    plan = _operators(datastream.blended_records(1, data, {s: ["key"] for s in datastream.SOURCE_ORDER}))
    assert "FromItems" in plan and "Shuffle" not in plan and "Randomize" not in plan and "AllToAll" not in plan, plan

    # Windows of 2 shards; each half of the epoch holds about half of each source's draws.
    windows = datastream.stream_windows(datastream.stage_sources(1, data), data)
    assert [len(w) for w in windows] == [2] * 6 and len({s["uri"] for w in windows for s in w}) == 12
    half = len(streamed) // 2
    for source in ("captions", "compositional"):
        total = sum(1 for row in streamed if row[0] == source)
        first = sum(1 for row in streamed[:half] if row[0] == source)
        assert abs(first - total / 2) <= total / 4, (source, first, total)
    # Rows are shuffled within a window: not in the order the shards hold them.
    first_window_keys = [key for _, key, _ in streamed[:8]]
    assert first_window_keys != sorted(first_window_keys)


def test_windows_go_on_in_parts_the_first_in_growing_ones(many_shards, monkeypatch):
    """Ray Data passes a task's output on only when the task ends (or a block is full), so the
    stream hands its first window to the preprocessing actors in parts of 1, 1, 2, 4, ... head rows
    (the first batch waits for the first part, not the window), and cuts windows that draw more
    than STREAM_PART_ROWS into parts for several actors. The parts hold exactly each window's
    rows in the window's order."""
    monkeypatch.setattr(windows, "STREAM_HEAD_ROWS", 1)
    monkeypatch.setattr(windows, "STREAM_PART_ROWS", 6)
    data = _config(many_shards, samples_per_epoch=60, seed=5, shuffle_window=4)  # 3 windows of ~20 draws
    plan, filesystems = windows.stream_plan(datastream.stage_sources(1, data), data)
    items = list(plan.items())
    parts = [[item["part"] for item in items if item["window"] == window] for window in (0, 1, 2)]
    assert parts[0] == [[0, 1], [1, 2], [2, 4], [4, 8], [8, 14], [14, None]]
    assert parts[1] == parts[2] == [[0, 6], [6, 12], [12, None]]
    columns = {source: ["key"] for source in ("captions", "compositional")}

    def rows(chosen: list[dict]) -> list[tuple]:
        tables = windows.read_window(pa.Table.from_pylist(chosen), columns, data.seed, filesystems)
        return [(row["source"], row["key"], row["draw"]) for table in tables for row in table.to_pylist()]

    whole = [rows([dict(next(item for item in items if item["window"] == window), part=None)]) for window in (0, 1, 2)]
    assert all(len(window) > 14 for window in whole)
    assert rows(items) == whole[0] + whole[1] + whole[2]
    monkeypatch.setattr(windows, "STREAM_PART_ROWS", 8192)  # the default: small windows go whole
    items = list(windows.stream_plan(datastream.stage_sources(1, data), data)[0].items())
    assert [item["part"] for item in items] == [[0, 1], [1, 2], [2, 4], [4, 8], [8, None], None, None]


def test_a_resumed_stream_continues_at_the_next_window_boundary(ray_local, many_shards):
    """A job resumed at a checkpoint `start_row` rows into its stream reads on from the first
    window at or after that row (the same rows in the same order as the uninterrupted stream
    from there), epoch after epoch, instead of replaying the epoch's first windows."""
    data = _config(many_shards, samples_per_epoch=60, seed=5, shuffle_window=2)
    one_epoch = _epoch(data)
    uninterrupted = _epoch(data, rows=150)  # three epochs in one pass, each the same plan
    assert uninterrupted == one_epoch * 3
    windows = datastream.stream_windows(datastream.stage_sources(1, data), data)
    starts, epoch_rows = datastream.window_starts(windows)
    assert epoch_rows == pytest.approx(60)

    resumed = _epoch(data, start_row=25, rows=60)
    begins = uninterrupted.index(resumed[0])
    assert resumed == uninterrupted[begins:begins + len(resumed)] and len(resumed) >= 60
    boundary = min(start for start in starts if start >= 25)
    assert 25 <= begins and abs(begins - boundary) <= 4  # expected rows vs resampled rows
    assert resumed == _epoch(data, start_row=25, rows=60)  # a position, not a timing
    # A position in a later epoch lands at the same place in that epoch.
    assert _epoch(data, start_row=60 + 25, rows=60) == resumed


def test_a_long_stream_makes_its_window_items_in_tasks(ray_local, many_shards, tiny_cfg, monkeypatch):
    """A stream of more than LISTED_ITEMS window items does not list them on the driver (a
    `ray.put` each: minutes for a paper-scale job's hundreds of thousands) but makes them in
    tasks from the epoch's plan, each item still read in a task of its own: the same rows in the
    same order as when listed, from the start or resumed, raw or through the preprocessing actors."""
    data = _config(many_shards, samples_per_epoch=60, seed=5, shuffle_window=2)
    keys_only = {source: ["key"] for source in datastream.SOURCE_ORDER}

    def examples(**position) -> list[tuple]:
        rows = training_dataset(1, data, tiny_cfg, **position).take_all()
        return [(row["source"], row["key"], row["draw"], list(row["input_ids"])) for row in rows]

    listed = _epoch(data, rows=150), _epoch(data, start_row=25, rows=60), examples(rows=90)
    plan, _ = datastream.stream_plan(datastream.stage_sources(1, data), data, 0, 150)
    assert plan.item_count() == len(list(plan.items())) > 8  # the head's parts and 2.5 epochs of windows
    assert "generate_items" not in _operators(datastream.blended_records(1, data, keys_only, rows=150))

    monkeypatch.setattr(datastream, "LISTED_ITEMS", 8)
    monkeypatch.setattr(datastream, "ITEM_TASKS", 3)
    dag = _operators(datastream.blended_records(1, data, keys_only, rows=150))
    assert "MapBatches(generate_items)" in dag and "StreamingRepartition" in dag, dag
    assert (_epoch(data, rows=150), _epoch(data, start_row=25, rows=60), examples(rows=90)) == listed


def test_stream_window_must_be_positive(sample_shards):
    data = _config(sample_shards, shuffle_window=0)
    with pytest.raises(ValueError, match="shuffle_window"):
        datastream.stream_windows(datastream.stage_sources(2, data), data)
