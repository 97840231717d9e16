"""Throughput of the training stream: Ray Data from S3 vs. a plain Python loop.

    eval "$(kosmos-g local env)"
    python bench/data_stream.py --samples 2000            # sample shards written to the stack
    python bench/data_stream.py --shards s3://bucket/shards --stage 3 --model paper
    python bench/data_stream.py --scaling 1000,10000,100000 --samples 100000   # vs. dataset size

Both sides do the same work on the same shards: fetch the Parquet files, resample the
sources to the blend, shuffle, decode, augment, tokenise, resize (224 px CLIP / 512 px
VAE with `--model paper`) and collate model batches. The Ray side is
`training_dataset(...).iter_torch_batches(collate_fn=...)`; the plain side downloads the
files with boto3 and runs the same `Preprocessor` and `StreamCollator` in one process.
Prints samples/s of each and their ratio, measured in one run.

`--scaling` writes synthetic caption shard sets of each size once (the miniature world's
64-pixel scenes, 2,000 rows per shard, cached in S3 under `bench/scaling-<n>`) and measures, per
size, the stream's time to first batch over a natural epoch (every record once) and its steady
samples/s from the first batch to the last of `--samples` examples (stage 1, tiny image sizes), against a
single-process boto3 + PIL loop over the same shards (each shard fetched, decoded and
preprocessed in turn). `--compare-global` adds the time to first batch of the whole-epoch
shuffle (`shuffle="global"`) on the same natural epoch.

`--job-rows 100000,1000000,10000000` measures what the length of a job costs before its first
batch: the stream of the 1,000-record set sized to hold that many rows (as a training job sizes
it, `train/resume.py`), its window items made in tasks from the epoch's plan (the default for
more than `datastream.LISTED_ITEMS`) against the same items listed on the driver, same run.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import time
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def ray_stream(stage: int, data, model, batch_size: int) -> tuple[int, float, float]:
    """(samples, seconds including start-up, seconds after the first batch)."""
    from kosmos_g.platform.data.datastream import collate_fn, training_dataset

    started = time.perf_counter()
    first = None
    count = 0
    for batch in training_dataset(stage, data, model).iter_torch_batches(
            batch_size=batch_size, collate_fn=collate_fn(stage, model)):
        count += batch["input_ids"].shape[0]
        if first is None:
            first, first_count = time.perf_counter(), count
    end = time.perf_counter()
    return count, end - started, (count - first_count) / max(end - first, 1e-9) if first else 0.0


def _boto3_table(uri: str, columns: list[str]) -> pa.Table:
    from kosmos_g.platform import storage

    location = storage.parse(uri)
    body = storage.s3_client().get_object(Bucket=location.bucket, Key=location.path)["Body"].read()
    return pq.read_table(io.BytesIO(body), columns=columns)


def plain_loop(stage: int, data, model, batch_size: int) -> tuple[int, float]:
    """The same pipeline in one process: boto3 -> pyarrow -> Preprocessor -> collate."""
    from kosmos_g.platform.data import datastream, shards
    from kosmos_g.platform.data.examples import Preprocessor, StreamCollator

    started = time.perf_counter()
    sources = datastream.stage_sources(stage, data)
    tables, counts = {}, {}
    for name, prefix, _ in sources:
        manifest = shards.read_manifest(prefix)
        columns = datastream.STAGE_COLUMNS[stage][name]
        tables[name] = pa.concat_tables([_boto3_table(uri, columns) for uri in manifest.shard_uris(prefix)])
        counts[name] = tables[name].num_rows
    plan = datastream.epoch_plan(counts, {name: w for name, _, w in sources}, data.samples_per_epoch)
    records = pa.concat_tables([datastream.resample(tables[n], n, counts[n], plan[n], data.seed) for n in tables])
    records = records.take(pa.array(np.random.default_rng(data.seed).permutation(records.num_rows)))
    preprocess, collate = Preprocessor(stage, data, model), StreamCollator(stage, model)
    count = 0
    for start in range(0, records.num_rows, batch_size):
        rows = preprocess(records.slice(start, batch_size))
        batch = collate({name: np.asarray(rows.column(name).to_pylist(), dtype=object) for name in rows.column_names})
        count += batch["input_ids"].shape[0]
    return count, time.perf_counter() - started


def scaling_shards(root: str, records: int) -> str:
    """A caption shard set of `records` world scenes under `root`, written on first use."""
    from kosmos_g.platform import storage
    from kosmos_g.platform.data import shards, world

    prefix = storage.join(root, "bench", f"scaling-{records}", "captions")
    if not storage.exists(storage.join(prefix, shards.MANIFEST)):
        print(f"writing {records} records to {prefix} (once)", flush=True)
        rows = (row for start in range(0, records, 1000)
                for row in world.caption_rows(world.scenes(start, min(1000, records - start)), f"s{start}"))
        shards.write_rows(prefix, "captions", rows, rows_per_shard=2000, total=records)
    return prefix


def first_batch_and_steady(data, model, samples: int, batch_size: int) -> tuple[float, float]:
    """(seconds to the first batch, samples/s from the first batch to the last of `samples`).

    Blocks arrive in chunks of up to STREAM_BLOCK_BYTES, so a rate over a part of the run counts
    rows made before it began; over a whole run of many blocks that error is small (`--samples
    100000`: a few percent)."""
    from kosmos_g.platform.data.datastream import collate_fn, training_dataset

    started, first, count = time.perf_counter(), None, 0
    batches = iter(training_dataset(1, data, model).iter_torch_batches(batch_size=batch_size,
                                                                        collate_fn=collate_fn(1, model)))
    for batch in batches:
        count += batch["input_ids"].shape[0]
        if first is None:
            first, first_count = time.perf_counter(), count
        if count >= samples:
            break
    end = time.perf_counter()
    batches.close()  # shuts the execution down now, so its actors do not hold CPUs the next run waits for
    return first - started, (count - first_count) / max(end - first, 1e-9) if count > first_count else 0.0


def plain_records_per_s(data, model, samples: int, batch_size: int) -> float:
    """One process: boto3 fetch of each shard in turn (again from the first when all are used)
    -> Preprocessor (PIL decode) -> collate; samples/s over `samples` examples."""
    from kosmos_g.platform.data import datastream, shards
    from kosmos_g.platform.data.examples import Preprocessor, StreamCollator

    manifest = shards.read_manifest(data.captions)
    preprocess, collate = Preprocessor(1, data, model), StreamCollator(1, model)
    started, count = time.perf_counter(), 0
    while True:
        for uri in manifest.shard_uris(data.captions):
            table = _boto3_table(uri, datastream.STAGE_COLUMNS[1]["captions"])
            records = datastream.resample(table, "captions", manifest.count, manifest.count, data.seed)
            for start in range(0, records.num_rows, batch_size):
                rows = preprocess(records.slice(start, batch_size))
                batch = collate({n: np.asarray(rows.column(n).to_pylist(), dtype=object) for n in rows.column_names})
                count += batch["input_ids"].shape[0]
                if count >= samples:
                    return count / (time.perf_counter() - started)


def scaling(sizes: list[int], samples: int, batch_size: int, workers: int, compare_global: bool) -> list[dict]:
    from kosmos_g.models.config import model_preset
    from kosmos_g.platform.data.datastream import DataConfig

    root, model, rows = os.environ["KOSMOS_STORAGE_ROOT"], model_preset("tiny"), []
    prefixes = {size: scaling_shards(root, size) for size in sizes}
    # Every size streams the same number of examples (records repeated to it when fewer).
    configs = {size: DataConfig(captions=prefix, workers=workers, num_cpus=0.5, samples_per_epoch=samples)
               for size, prefix in prefixes.items()}
    first_batch_and_steady(configs[sizes[0]], model, batch_size, batch_size)  # warm-up: Ray's workers start
    for size in sizes:
        data = configs[size]
        _, steady = first_batch_and_steady(data, model, samples, batch_size)
        row = {"records": size, "steady_samples_per_s": steady,
               "plain_samples_per_s": plain_records_per_s(data, model, samples, batch_size)}
        # Time to first batch of a natural epoch (each record once), which a whole-epoch shuffle
        # must read and shuffle before it hands anything on.
        data.samples_per_epoch = 0
        row["ttfb_s"] = first_batch_and_steady(data, model, batch_size, batch_size)[0]
        if compare_global:
            data.shuffle = "global"
            row["global_ttfb_s"] = first_batch_and_steady(data, model, batch_size, batch_size)[0]
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\n| records | time to first batch | steady samples/s | boto3 + PIL loop samples/s | ratio |"
          + (" whole-epoch shuffle: time to first batch |" if compare_global else ""))
    print("|---|---|---|---|---|" + ("---|" if compare_global else ""))
    for row in rows:
        print(f"| {row['records']:,} | {row['ttfb_s']:.1f} s | {row['steady_samples_per_s']:.0f} | "
              f"{row['plain_samples_per_s']:.0f} | {row['steady_samples_per_s'] / row['plain_samples_per_s']:.2f}x |"
              + (f" {row['global_ttfb_s']:.1f} s |" if compare_global else ""))
    print(f"time to first batch at {sizes[-1]:,} vs {sizes[0]:,} records: {rows[-1]['ttfb_s'] / rows[0]['ttfb_s']:.2f}x")
    return rows


def long_streams(lengths: list[int], batch_size: int, workers: int) -> list[dict]:
    """Per stream length (rows): window items, bytes the driver holds for them listed vs as the
    plan, and seconds to the first batch with the items made in tasks vs listed."""
    import pickle

    from kosmos_g.models.config import model_preset
    from kosmos_g.platform.data import datastream
    from kosmos_g.platform.data.datastream import DataConfig, collate_fn, training_dataset

    model, rows, listing = model_preset("tiny"), [], datastream.LISTED_ITEMS
    data = DataConfig(captions=scaling_shards(os.environ["KOSMOS_STORAGE_ROOT"], 1000), workers=workers, num_cpus=0.5)

    def first_batch(length: int) -> float:
        started = time.perf_counter()
        batches = iter(training_dataset(1, data, model, rows=length).iter_torch_batches(
            batch_size=batch_size, collate_fn=collate_fn(1, model)))
        next(batches)
        seconds = time.perf_counter() - started
        batches.close()
        return seconds

    first_batch(lengths[0])  # warm-up: Ray's workers start
    for length in lengths:
        plan, _ = datastream.stream_plan(datastream.stage_sources(1, data), data, 0, length)
        row = {"rows": length, "items": plan.item_count(), "plan_bytes": len(pickle.dumps(plan)),
               "listed_bytes": len(pickle.dumps(list(plan.items())))}
        datastream.LISTED_ITEMS = 0
        row["generated_first_batch_s"] = first_batch(length)
        datastream.LISTED_ITEMS = 1 << 62
        row["listed_first_batch_s"] = first_batch(length)
        datastream.LISTED_ITEMS = listing
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("\n| stream rows | window items | driver holds: listed / plan | first batch: listed | first batch: "
          "made in tasks | ratio |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['rows']:,} | {row['items']:,} | {row['listed_bytes'] / 1e6:.2f} MB / {row['plan_bytes'] / 1e3:.2f} kB"
              f" | {row['listed_first_batch_s']:.1f} s | {row['generated_first_batch_s']:.1f} s | "
              f"{row['listed_first_batch_s'] / row['generated_first_batch_s']:.1f}x |")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", default=None,
                        help="prefix holding captions/, compositional/, editing/ (default: write the samples)")
    parser.add_argument("--stage", type=int, default=3, choices=(1, 2, 3))
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--model", default="paper", choices=("tiny", "paper"), help="image sizes of this preset")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2, help="most preprocessing actors")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--scaling", default=None, help="comma-separated dataset sizes (records): the scaling table")
    parser.add_argument("--compare-global", action="store_true", help="--scaling: also the whole-epoch shuffle's")
    parser.add_argument("--job-rows", default=None, help="comma-separated stream lengths (rows): first batch vs length")
    args = parser.parse_args(argv)
    if args.job_rows or args.scaling:
        from kosmos_g.platform.stack import cluster

        if not os.environ.get("KOSMOS_STORAGE_ROOT", "").startswith("s3://"):
            parser.error("set KOSMOS_STORAGE_ROOT to an s3:// prefix (eval \"$(kosmos-g local env)\")")
        cluster.connect()
        if args.job_rows:
            rows = long_streams([int(float(n)) for n in args.job_rows.split(",")], args.batch_size, args.workers)
        else:
            rows = scaling([int(n) for n in args.scaling.split(",")], args.samples, args.batch_size, args.workers,
                           args.compare_global)
        if args.json:
            with open(args.json, "w") as stream:
                json.dump(rows, stream, indent=2)
        return 0

    from kosmos_g.models.config import model_preset
    from kosmos_g.platform.stack import cluster
    from kosmos_g.platform.data import samples
    from kosmos_g.platform import storage
    from kosmos_g.platform.data.datastream import DataConfig

    prefix = args.shards
    if prefix is None:
        root = os.environ.get("KOSMOS_STORAGE_ROOT")
        if not root or not root.startswith("s3://"):
            parser.error("set KOSMOS_STORAGE_ROOT to an s3:// prefix (eval \"$(kosmos-g local env)\") or pass --shards")
        prefix = storage.join(root, "bench", f"samples-{uuid.uuid4().hex[:8]}")
        samples.write_sample_shards(prefix)
    data = DataConfig(captions=storage.join(prefix, "captions"), compositional=storage.join(prefix, "compositional"),
                      editing=storage.join(prefix, "editing"), samples_per_epoch=args.samples,
                      workers=args.workers, num_cpus=1.0)
    model = model_preset(args.model)
    cluster.connect()

    plain_count, plain_seconds = plain_loop(args.stage, data, model, args.batch_size)
    ray_count, ray_seconds, ray_steady = ray_stream(args.stage, data, model, args.batch_size)
    results = {
        "stage": args.stage, "model": args.model, "shards": prefix, "batch_size": args.batch_size,
        "plain_samples": plain_count, "plain_seconds": plain_seconds, "plain_samples_per_s": plain_count / plain_seconds,
        "ray_samples": ray_count, "ray_seconds": ray_seconds, "ray_samples_per_s": ray_count / ray_seconds,
        "ray_steady_samples_per_s": ray_steady,
    }
    results["ratio"] = results["ray_samples_per_s"] / results["plain_samples_per_s"]
    results["steady_ratio"] = ray_steady / results["plain_samples_per_s"]
    print(f"stage {args.stage}, {args.model} image sizes, batch {args.batch_size}, shards {prefix}")
    print(f"plain boto3 loop (1 process): {plain_count:6d} samples in {plain_seconds:7.1f}s = "
          f"{results['plain_samples_per_s']:8.1f} samples/s")
    print(f"Ray Data stream             : {ray_count:6d} samples in {ray_seconds:7.1f}s = "
          f"{results['ray_samples_per_s']:8.1f} samples/s (after first batch: {ray_steady:.1f} samples/s)")
    print(f"ratio Ray / plain: {results['ratio']:.2f}x overall, {results['steady_ratio']:.2f}x after start-up")
    if args.json:
        with open(args.json, "w") as stream:
            json.dump(results, stream, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
