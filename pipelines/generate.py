"""Batch generation as a Ray Data job: a prompt table in, PNGs and a results table out.

    ray job submit -- python pipelines/generate.py --prompts s3://…/prompts.jsonl --out s3://…/run1
    kosmos-g generate --batch prompts.jsonl --out DIR

Rows: {key, prompt, images: [uri…], negative_prompt?, seed?, steps?, guidance_scale?, scheduler?}
with `<image>` (or `<i>`) slots in the prompt, one per image. The stream is
read → encoder actors (MLLM + AlignerNet M: prompt → 77×D condition, batched) → denoiser actors
(U-Net + scheduler + VAE, rows with the same sampler settings denoised together) → one PNG per
row at `<out>/images/<key>.png`, then `<out>/results.parquet` (key, image uri, seed, timings),
rewritten whole on every run. Re-running with the same `--out` skips keys whose PNG exists.
Malformed rows (no prompt, an unreadable image, a slot count that does not match) are skipped
and counted, never fatal. Actors ask for a GPU each when the cluster has GPUs.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from typing import Any

import numpy as np

from kosmos_g.platform.progress import Progress

DEFAULTS = {"negative_prompt": None, "seed": 0, "steps": 20, "guidance_scale": 6.0, "scheduler": "dpm++"}


def read_prompts(uri: str) -> list[dict[str, Any]]:
    """Rows of a JSONL or Parquet table (local or s3://)."""
    from kosmos_g.platform import storage

    if uri.endswith(".parquet"):
        import pyarrow.parquet as pq

        return pq.read_table(io.BytesIO(storage.read_bytes(uri))).to_pylist()
    return [json.loads(line) for line in storage.read_text(uri).splitlines() if line.strip()]


def image_uri(out: str, key: str) -> str:
    """Where the job writes the PNG of row `key`."""
    from kosmos_g.platform import storage

    return storage.join(out, "images", f"{key}.png")


def done_keys(out: str) -> set[str]:
    from kosmos_g.platform import storage

    prefix = storage.join(out, "images")
    return {uri.rsplit("/", 1)[-1][: -len(".png")] for uri in storage.list_uris(prefix) if uri.endswith(".png")}


def _row(raw: dict[str, Any]) -> dict[str, Any]:
    """A uniform row for Ray Data (every column present, images as a JSON string)."""
    row = {key: raw.get(key) if raw.get(key) is not None else default for key, default in DEFAULTS.items()}
    row["key"] = str(raw.get("key") or "")
    row["prompt"] = raw.get("prompt") if isinstance(raw.get("prompt"), str) else ""
    row["images"] = json.dumps(list(raw.get("images") or []))
    row["negative_prompt"] = row["negative_prompt"] or ""
    return row


class ConditionEncoder:
    """Ray Data actor: prompt + images → condition and negative condition (batched)."""

    def __init__(self, bundle: str):
        from kosmos_g.platform.weights import load_bundle

        self.model = load_bundle(bundle).eval()

    def _segments(self, row: dict) -> list:
        from PIL import Image

        from kosmos_g.models.prompt import parse_prompt
        from kosmos_g.platform import storage

        if not row["key"] or not row["prompt"].strip():
            raise ValueError("row needs a key and a prompt")
        images = [Image.open(io.BytesIO(storage.read_bytes(uri))).convert("RGB") for uri in json.loads(row["images"])]
        return parse_prompt(row["prompt"], images)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        started = time.perf_counter()
        rows = [{k: batch[k][i] for k in batch} for i in range(len(batch["key"]))]
        prompts, errors = [], []
        for row in rows:
            try:
                prompts.append(self._segments(row))
                errors.append("")
            except Exception as error:  # noqa: BLE001 - a bad row is counted, not fatal
                prompts.append(None)
                errors.append(f"{type(error).__name__}: {error}")
        valid = [p for p in prompts if p is not None]
        with torch.no_grad():
            cond = self.model.encode_prompts(valid).float().numpy() if valid else None
            empty = self.model.empty_condition(1).float().numpy()[0]
            negatives = {}
            for row in rows:
                text = str(row["negative_prompt"])
                if text and text not in negatives:
                    negatives[text] = self.model.encode_prompts([text]).float().numpy()[0]
        shape = empty.shape
        conditions, uncond, index = [], [], 0
        for row, prompt in zip(rows, prompts):
            if prompt is None:
                conditions.append(np.zeros(shape, np.float32))
            else:
                conditions.append(cond[index])
                index += 1
            uncond.append(negatives.get(str(row["negative_prompt"]), empty))
        elapsed = (time.perf_counter() - started) / max(1, len(rows))
        return {**batch, "condition": np.stack(conditions), "uncondition": np.stack(uncond),
                "error": np.array(errors, dtype=object), "encode_s": np.full(len(rows), elapsed)}


class ImageDenoiser:
    """Ray Data actor: conditions → PNGs in object storage; rows sharing sampler settings
    go through the U-Net together (the serving denoiser's batching rule)."""

    def __init__(self, bundle: str, out: str):
        from kosmos_g.platform.weights import load_bundle

        self.model = load_bundle(bundle).eval()
        self.out = out
        self.pipelines: dict[str, Any] = {}

    def _pipeline(self, scheduler: str):
        from kosmos_g.models.generation import build_pipeline

        if scheduler not in self.pipelines:
            self.pipelines[scheduler] = build_pipeline(self.model, scheduler)
        return self.pipelines[scheduler]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        from kosmos_g.platform import storage

        n = len(batch["key"])
        uris, seconds = [""] * n, [0.0] * n
        groups: dict[tuple, list[int]] = {}
        for i in range(n):
            if not batch["error"][i]:
                key = (str(batch["scheduler"][i]), int(batch["steps"][i]), float(batch["guidance_scale"][i]))
                groups.setdefault(key, []).append(i)
        dtype = self.model.image_decoder.dtype
        for (scheduler, steps, guidance), rows in groups.items():
            started = time.perf_counter()
            with torch.no_grad():
                images = self._pipeline(scheduler)(
                    prompt_embeds=torch.from_numpy(np.stack([batch["condition"][i] for i in rows])).to(dtype),
                    negative_prompt_embeds=torch.from_numpy(np.stack([batch["uncondition"][i] for i in rows])).to(dtype),
                    num_inference_steps=steps, guidance_scale=guidance, output_type="pil",
                    generator=[torch.Generator("cpu").manual_seed(int(batch["seed"][i])) for i in rows],
                ).images
            per_image = (time.perf_counter() - started) / len(rows)
            for i, image in zip(rows, images):
                buffer = io.BytesIO()
                image.save(buffer, format="PNG")
                uris[i] = image_uri(self.out, batch["key"][i])
                storage.write_bytes(uris[i], buffer.getvalue())
                seconds[i] = per_image
        return {"key": batch["key"], "image_uri": np.array(uris, dtype=object), "seed": batch["seed"],
                "error": batch["error"], "encode_s": batch["encode_s"], "denoise_s": np.array(seconds)}


def _actor_options() -> dict[str, Any]:
    import ray

    gpus = ray.cluster_resources().get("GPU", 0)
    return {"num_gpus": 1} if gpus else {"num_cpus": 0.5}


def write_results(out: str, results: list[dict[str, Any]]) -> str:
    """Merge with earlier runs' results and write `<out>/results.parquet` in one object write."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from kosmos_g.platform import storage

    uri = storage.join(out, "results.parquet")
    rows = {}
    if storage.exists(uri):
        rows = {row["key"]: row for row in pq.read_table(io.BytesIO(storage.read_bytes(uri))).to_pylist()}
    rows.update({row["key"]: row for row in results})
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(sorted(rows.values(), key=lambda r: r["key"])), buffer)
    storage.write_bytes(uri, buffer.getvalue())
    return uri


def run(prompts_uri: str, out: str, model: str, batch_size: int = 4, concurrency: int = 1) -> dict[str, Any]:
    """The job: generate, then record the counts in MLflow (experiment `generate`, one run per
    output prefix: a resumed run continues the same MLflow run)."""
    from kosmos_g.platform import tracking
    from kosmos_g.platform.stack import cluster

    cluster.connect()
    started = time.perf_counter()
    run_id, _ = tracking.start_run("generate", out, tags={"prompts": prompts_uri, "model": model})
    try:
        summary = generate_rows(read_prompts(prompts_uri), out, str(tracking.resolve_artifacts(model)),
                                batch_size, concurrency)
    except BaseException:
        tracking.end_run(run_id, "FAILED")
        raise
    seconds = time.perf_counter() - started
    tracking.log_metrics(run_id, {
        **{k: float(summary[k]) for k in ("rows", "generated", "skipped", "already_done")},
        "wall_clock_s": seconds, "images_per_s": summary["generated"] / seconds}, 0)
    tracking.end_run(run_id)
    return {**summary, "run_id": run_id}


def generate_rows(rows: list[dict[str, Any]], out: str, bundle: str, batch_size: int = 4,
                  concurrency: int = 1) -> dict[str, Any]:
    """Generate every row whose key has no PNG under `out` yet (see the module docstring)."""
    import ray

    from kosmos_g.models.checkpoint import require_bundle

    require_bundle(bundle)  # here, not in the first actor, so a wrong model fails before any work
    finished = done_keys(out)
    todo = [_row(r) for r in rows if str(r.get("key") or "") not in finished]
    print(f"[generate] {len(rows)} rows, {len(rows) - len(todo)} already done, {len(todo)} to generate", flush=True)
    results: list[dict[str, Any]] = []
    if todo:
        options = _actor_options()
        ds = ray.data.from_items(todo)
        ds = ds.map_batches(ConditionEncoder, fn_constructor_args=(bundle,), batch_size=batch_size,
                            compute=ray.data.ActorPoolStrategy(size=concurrency), **options)
        ds = ds.map_batches(ImageDenoiser, fn_constructor_args=(bundle, out), batch_size=batch_size,
                            compute=ray.data.ActorPoolStrategy(size=concurrency), **options)
        with Progress("generate", total=len(todo), unit="rows", stream=sys.stdout) as progress:
            for row in ds.iter_rows():
                results.append({k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()})
                progress.update()
    generated = [r for r in results if not r["error"]]
    skipped = [r for r in results if r["error"]]
    for row in skipped:
        print(f"[generate] skipped {row['key'] or '<no key>'}: {row['error']}", flush=True)
    uri = write_results(out, generated)
    summary = {"rows": len(rows), "generated": len(generated), "skipped": len(skipped),
               "already_done": len(rows) - len(todo), "results": uri}
    print(json.dumps(summary), flush=True)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", required=True, help="JSONL or Parquet table, local or s3://")
    parser.add_argument("--out", required=True, help="output prefix, local or s3://")
    parser.add_argument("--model", default="models:/kosmos-g@current", help="registry URI or bundle URI")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=1, help="actors per stage")
    args = parser.parse_args(argv)
    run(args.prompts, args.out, args.model, args.batch_size, args.concurrency)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
