"""Batch-generation throughput on this machine: the Ray Data generation job
(pipelines/generate.py) with batching (encoder and denoiser actors take `--batch` rows at a
time; rows with equal sampler settings share every U-Net pass) against the same job one row
at a time (batch 1), in the same run, rounds interleaved. Tiny model (random weights, 32x32),
a local Ray, local storage; each variant writes to a fresh output prefix.

    .venv/bin/python bench/generate_throughput.py [--rows 48] [--steps 10] [--batch 8] [--rounds 2]

Prints images/s per variant (wall clock of the whole job, actor start-up included, and the
denoise seconds the actors measured) and the ratio batched / one-at-a-time.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq


def photo_files(directory: Path) -> list[str]:
    from PIL import Image
    from skimage import data

    paths = []
    for name in ("chelsea", "coffee", "astronaut", "rocket"):
        path = directory / f"{name}.png"
        Image.fromarray(getattr(data, name)()).resize((64, 64)).save(path)
        paths.append(str(path))
    return paths


def prompt_rows(count: int, steps: int, photos: list[str]) -> list[dict]:
    texts = ("a photo of <image> on the beach", "<image> in the snow", "a painting of <image>")
    return [{"key": f"{i:04d}", "prompt": texts[i % len(texts)], "images": [photos[i % len(photos)]],
             "seed": i, "steps": steps, "scheduler": "dpm++"} for i in range(count)]


def one_run(rows: list[dict], bundle: str, out: str, batch_size: int) -> dict:
    from kosmos_g.pipelines.generate import generate_rows

    start = time.perf_counter()
    summary = generate_rows(rows, out, bundle, batch_size=batch_size)
    seconds = time.perf_counter() - start
    results = pq.read_table(io.BytesIO(Path(summary["results"]).read_bytes())).to_pylist()
    if summary["generated"] != len(rows):
        raise RuntimeError(f"only {summary['generated']} of {len(rows)} rows were generated: {summary}")
    return {"images_per_s": len(rows) / seconds, "seconds": seconds,
            "denoise_s": sum(r["denoise_s"] for r in results)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=48)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)

    import ray
    import torch

    from kosmos_g.models.checkpoint import save_servable
    from kosmos_g.models.config import model_preset
    from kosmos_g.models.kosmos_g import KosmosG

    work = Path(tempfile.mkdtemp(prefix="kosmos-gen-bench-"))
    torch.manual_seed(0)
    bundle = str(save_servable(KosmosG.from_config(model_preset("tiny")), work / "bundle"))
    rows = prompt_rows(args.rows, args.steps, photo_files(work))
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    variants = {"batched": args.batch, "one_at_a_time": 1}
    measured: dict[str, list[dict]] = {name: [] for name in variants}
    for round_index in range(args.rounds):
        for name, batch_size in variants.items():
            result = one_run(rows, bundle, str(work / f"out-{name}-{round_index}"), batch_size)
            measured[name].append(result)
            print(f"round {round_index + 1} {name:14s} {result['images_per_s']:.2f} images/s "
                  f"({result['seconds']:.1f} s, denoise {result['denoise_s']:.1f} s)", file=sys.stderr)
    ray.shutdown()
    summary = {name: {"images_per_s": statistics.median(r["images_per_s"] for r in runs),
                      "denoise_s": statistics.median(r["denoise_s"] for r in runs)}
               for name, runs in measured.items()}
    ratio = summary["batched"]["images_per_s"] / summary["one_at_a_time"]["images_per_s"]
    report = {"rows": args.rows, "steps": args.steps, "batch": args.batch, "rounds": args.rounds,
              "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
              **summary, "ratio_batched_over_one_at_a_time": round(ratio, 2)}
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
