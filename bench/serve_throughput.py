"""Serving throughput on this machine: images/s and p50/p95 latency at several concurrencies for

  (a) the Serve application with batching on,
  (b) the same application with batching off (max batch size 1 in encoder and denoiser),
  (c) a plain in-process diffusers pipeline (models.generation.generate) with the same
      tiny model and steps, one request at a time behind a lock,

then the ratios a/b and a/c. Everything runs here, in one go: a local Ray, the tiny demo
model (random weights, 32x32 images), HTTP over loopback.

    .venv/bin/python bench/serve_throughput.py [--steps 10] [--requests 96] [--concurrency 1,16]
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures as cf
import io
import json
import os
import platform
import tempfile
import threading
import time

import numpy as np


VARIANTS = ("a_batching_on", "b_batching_off", "c_in_process")


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def measure(call, concurrency: int, requests: int) -> dict:
    """Run `requests` calls with `concurrency` in flight; images/s and latency percentiles."""
    latencies: list[float] = []
    images = 0
    lock = threading.Lock()

    def one(i: int) -> None:
        nonlocal images
        start = time.perf_counter()
        count = call(i)
        elapsed = time.perf_counter() - start
        with lock:
            latencies.append(elapsed)
            images += count

    started = time.perf_counter()
    with cf.ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(requests)))
    wall = time.perf_counter() - started
    return {"images_per_s": images / wall, "p50_ms": percentile(latencies, 50) * 1000,
            "p95_ms": percentile(latencies, 95) * 1000, "requests": requests, "wall_s": wall}


def photo_png() -> bytes:
    from PIL import Image
    from skimage import data

    buffer = io.BytesIO()
    Image.fromarray(data.chelsea()).save(buffer, format="PNG")
    return buffer.getvalue()


def http_caller(url: str, steps: int, image: bytes):
    import requests

    local = threading.local()
    encoded = base64.b64encode(image).decode("ascii")

    def call(i: int) -> int:
        session = getattr(local, "session", None) or requests.Session()
        local.session = session
        body = {"prompt": f"a photo of <image> number {i}", "images": [encoded], "steps": steps, "seed": i}
        response = session.post(f"{url}/v1/generate", json=body, timeout=600)
        response.raise_for_status()
        return len(response.json()["images"])

    return call


def in_process_caller(bundle: str, steps: int, image: bytes):
    from PIL import Image

    from kosmos_g.models.checkpoint import load_model
    from kosmos_g.models.generation import build_pipeline, generate
    from kosmos_g.models.prompt import parse_prompt

    model = load_model(bundle).eval()
    pipeline = build_pipeline(model)
    photo = Image.open(io.BytesIO(image)).convert("RGB")
    lock = threading.Lock()  # one pipeline: its scheduler is stateful, so requests take turns

    def call(i: int) -> int:
        prompt = parse_prompt(f"a photo of <image> number {i}", [photo])
        with lock:
            return len(generate(model, [prompt], steps=steps, seed=i, pipeline=pipeline))

    return call


def serve_variant(name: str, bundle: str, max_batch: int, port: int):
    """Deploy the application (tiny limits, model from `bundle`) with the given batch sizes."""
    from ray import serve

    from kosmos_g.serve.app import build_app
    from kosmos_g.serve.config import PRESETS, with_model_uri

    config = with_model_uri(PRESETS.get("tiny", [
        f"batching.encoder_max_batch_size={max_batch}", f"batching.denoiser_max_batch_size={max_batch}",
        f"http.port={port}",
        # Scheduling tokens only (each replica runs one torch thread): both variants must fit
        # side by side on a 2-CPU Ray; only one of them is busy at a time.
        "ingress.num_cpus=0.2", "encoder.num_cpus=0.25", "denoiser.num_cpus=0.25"]), bundle)
    config.app_name = name
    # Per-request access logs would be shipped to this driver and printed: not what is measured.
    serve.run(build_app(config), name=name, route_prefix=f"/{name}", logging_config={"enable_access_log": False})
    return f"http://127.0.0.1:{port}/{name}"


def batch_stats(url: str) -> dict:
    import requests

    stats = requests.get(f"{url}/v1/stats", timeout=60).json()["denoiser"]
    runtime = requests.get(f"{url}/v1/models", timeout=60).json()["data"][0]["runtime"]
    return {**stats, "torch_threads": runtime["denoiser"]["torch_threads"]}


def summarize(runs: list[dict]) -> dict:
    """Median over repeated runs of each metric (the machine may be shared and noisy)."""
    return {key: float(np.median([run[key] for run in runs])) for key in runs[0]}


def run_all(args) -> dict:
    """Deploy (a) and (b) side by side, then measure a, b, c interleaved, `repeats` rounds,
    so that load from anything else on the machine hits all three alike."""
    from ray import serve

    from kosmos_g.platform.stack import cluster
    from kosmos_g.platform.stack.services import free_port
    from kosmos_g.serve.model_source import build_demo_bundle

    image = photo_png()
    bundle = str(build_demo_bundle("tiny", 0, tempfile.mkdtemp(prefix="bench-tiny-")))
    os.environ.pop("RAY_ADDRESS", None)  # always a fresh local Ray sized to this machine
    cluster.connect(num_cpus=os.cpu_count())
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    runs: dict = {name: {c: [] for c in args.concurrency} for name in VARIANTS}
    try:
        urls = {"a_batching_on": serve_variant("a", bundle, args.max_batch, port),
                "b_batching_off": serve_variant("b", bundle, 1, port)}
        callers = {name: http_caller(url, args.steps, image) for name, url in urls.items()}
        callers["c_in_process"] = in_process_caller(bundle, args.steps, image)
        for call in callers.values():
            measure(call, 4, args.warmup)
        for _ in range(args.repeats):
            for c in args.concurrency:
                for name in VARIANTS:
                    runs[name][c].append(measure(callers[name], c, args.requests if c > 1 else args.requests // 4))
        results = {name: {c: summarize(runs[name][c]) for c in args.concurrency} for name in VARIANTS}
        for name, url in urls.items():
            results[name]["denoiser"] = batch_stats(url)
    finally:
        serve.shutdown()
        cluster.shutdown()
    return results


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{os.cpu_count()} CPU cores ({cpu}), {gpu}, torch {torch.__version__}"


def report(results: dict, args) -> str:
    import torch

    lines = [f"machine: {machine()}",
             f"model: tiny preset (random weights), 32x32, {args.steps} steps, 1 image/request, "
             f"prompt = text + 1 image; max batch {args.max_batch} in (a); median of {args.repeats} "
             "interleaved rounds", "",
             f"{'variant':18s} {'conc':>4s} {'images/s':>9s} {'p50 ms':>8s} {'p95 ms':>8s}"]
    for name in VARIANTS:
        for c in args.concurrency:
            r = results[name][c]
            lines.append(f"{name:18s} {c:4d} {r['images_per_s']:9.2f} {r['p50_ms']:8.1f} {r['p95_ms']:8.1f}")
    for name in ("a_batching_on", "b_batching_off"):
        stats = results[name]["denoiser"]
        lines.append(f"{name} denoiser batches: mean size {stats['mean_batch_size']}, max {stats['max_batch_size']} "
                     f"(torch threads per replica: {stats['torch_threads']})")
    lines.append(f"c_in_process torch threads: {torch.get_num_threads()}")
    lines.append("")
    for c in args.concurrency:
        a = results["a_batching_on"][c]["images_per_s"]
        b = results["b_batching_off"][c]["images_per_s"]
        p = results["c_in_process"][c]["images_per_s"]
        lines.append(f"concurrency {c:2d}: a/b = {a / b:.2f}x   a/c = {a / p:.2f}x   (images/s)")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--requests", type=int, default=96, help="requests per concurrent run (a quarter at 1)")
    parser.add_argument("--warmup", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds; medians are reported")
    parser.add_argument("--concurrency", default="1,16", help="comma-separated client concurrencies")
    parser.add_argument("--max-batch", type=int, default=16, help="encoder/denoiser max batch size in (a)")
    parser.add_argument("--json", default=None, help="also write the raw results here")
    args = parser.parse_args()
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    load_before = os.getloadavg()
    results = run_all(args)
    load_after = os.getloadavg()
    print(report(results, args), flush=True)
    print(f"load average (1 min) before/after: {load_before[0]:.1f} / {load_after[0]:.1f} "
          f"on {os.cpu_count()} cores (other work on the machine skews absolute numbers)")
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"machine": machine(), "args": vars(args), "results": results}, out, indent=2, default=str)


if __name__ == "__main__":
    main()
