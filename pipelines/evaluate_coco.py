"""COCO zero-shot FID as a Ray job (paper section 4.1), as the release's sample_kosmosg_coco.py
computes it: captions sampled from `captions_val2014.json` with Python's `random.seed(seed);
random.sample(annotations, samples)`, one image per caption (DDIM, 250 steps, guidance 3),
FID against every val2014 image (resized to 256, centre-cropped) with torchmetrics.

    ray job submit -- python pipelines/evaluate_coco.py --preset coco --coco s3://…/coco \\
        --inception s3://…/inception-2015-12-05.pt --model models:/kosmos-g@current
    kosmos-g evaluate coco --coco … --inception … [--set samples=1000]

`--coco` is the COCO layout: `annotations/captions_val2014.json` and `val2014/<file_name>`.
Generation is the batch job (pipelines/generate.py: resumable under `--out`); Inception
features of both sets come from a Ray Data actor pool; MLflow gets `coco_fid`, the image
counts and a grid of the first prompts and their images.
"""

from __future__ import annotations

import json
import random
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np

from kosmos_g.platform.config import Presets, job_main
from kosmos_g.platform.progress import Progress

GRID_ROWS = 8


@dataclass
class CocoConfig:
    coco: str = ""  # <coco>/annotations/captions_val2014.json, <coco>/val2014/*.jpg
    inception: str = ""  # FID Inception TorchScript file, local or s3://
    model: str = "models:/kosmos-g@current"
    out: str = ""  # generation prefix; default $KOSMOS_STORAGE_ROOT/eval/<name>
    name: str = "coco-fid"  # MLflow run key
    samples: int = 30_000  # captions to generate for (the paper: 30k)
    real_images: int = 0  # 0: every val2014 image (as released); N: the first N, for a quick look
    steps: int = 250
    guidance_scale: float = 3.0
    scheduler: str = "ddim"
    seed: int = 0
    batch_size: int = 4
    feature_batch_size: int = 32


def presets() -> Presets[CocoConfig]:
    registry: Presets[CocoConfig] = Presets(CocoConfig)
    registry.register("coco", CocoConfig)
    registry.register("tiny", lambda: CocoConfig(samples=8, real_images=8, steps=2))
    return registry


def sample_captions(annotations: list[dict], samples: int, seed: int) -> list[dict]:
    """The release's caption sample: Python's global RNG seeded, then random.sample."""
    if samples > len(annotations):
        raise ValueError(f"samples={samples} but the annotation file has only {len(annotations)} captions")
    rng = random.Random(seed)  # same sequence as random.seed(seed); random.sample(...)
    return rng.sample(annotations, samples)


def read_coco(root: str) -> tuple[list[dict], list[str]]:
    """(caption annotations, real image URIs) of a COCO val2014 folder."""
    from kosmos_g.platform import storage

    index = json.loads(storage.read_bytes(storage.join(root, "annotations", "captions_val2014.json")))
    images = [storage.join(root, "val2014", item["file_name"]) for item in index["images"]]
    return index["annotations"], images


def generation_rows(cfg: CocoConfig, captions: list[dict]) -> list[dict[str, Any]]:
    # Each caption is a plain text prompt; a caption with "<i>"/"<image>" in it would ask for an
    # image slot, so such text is spelled out.
    return [{"key": f"{i:05d}", "prompt": c["caption"].replace("<", "‹").replace(">", "›"), "images": [],
             "seed": cfg.seed + i, "steps": cfg.steps, "guidance_scale": cfg.guidance_scale,
             "scheduler": cfg.scheduler} for i, c in enumerate(captions)]


class InceptionActor:
    """Ray Data actor: FID Inception features of images (real ones resized and cropped first)."""

    def __init__(self, inception: str):
        from kosmos_g.platform import storage
        from kosmos_g.platform.evaluation.metrics import InceptionFeatures

        self.network = InceptionFeatures(str(storage.local_file(inception)))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        from kosmos_g.platform.evaluation.grid import open_image
        from kosmos_g.platform.evaluation.metrics import fid_input

        pixels = np.stack([fid_input(open_image(uri), bool(real)) for uri, real in zip(batch["uri"], batch["real"])])
        features = self.network(torch.from_numpy(pixels)).numpy().astype(np.float64)
        return {"real": batch["real"], "features": list(features)}


def inception_features(uris_real: list[str], uris_generated: list[str], cfg: CocoConfig) -> tuple[np.ndarray, np.ndarray]:
    import ray

    items = [{"uri": u, "real": True} for u in uris_real] + [{"uri": u, "real": False} for u in uris_generated]
    stream = ray.data.from_items(items).map_batches(
        InceptionActor, fn_constructor_args=(cfg.inception,), batch_size=cfg.feature_batch_size, num_cpus=0.5,
        compute=ray.data.ActorPoolStrategy(size=1))
    real, generated = [], []
    with Progress("coco: inception features", total=len(items), unit="images", stream=sys.stdout) as progress:
        for batch in stream.iter_batches(batch_size=cfg.feature_batch_size, batch_format="numpy"):
            for is_real, feature in zip(batch["real"], batch["features"]):
                (real if is_real else generated).append(np.asarray(feature))
            progress.update(len(batch["real"]))
    return np.stack(real), np.stack(generated)


def log_grid(run_id: str, rows: list[dict], out: str, written: set[str]) -> None:
    from kosmos_g.pipelines.generate import image_uri
    from kosmos_g.platform import tracking
    from kosmos_g.platform.evaluation.grid import open_image, prompt_grid

    shown = [{"text": r["prompt"], "generated": open_image(image_uri(out, r["key"]))}
             for r in rows if r["key"] in written][:GRID_ROWS]
    if shown:
        tracking.client().log_image(run_id, prompt_grid(shown, max_references=0), "coco/samples.png")


def run(cfg: CocoConfig) -> dict[str, float]:
    from kosmos_g.pipelines.generate import done_keys, generate_rows, image_uri
    from kosmos_g.platform import storage, tracking
    from kosmos_g.platform.evaluation.metrics import fid_from_features
    from kosmos_g.platform.stack import cluster

    if not (cfg.coco and cfg.inception):
        raise ValueError("--coco and --inception are required (a COCO folder and the FID Inception file)")
    cluster.connect()
    out = cfg.out or storage.default_root("eval", cfg.name)
    annotations, real_uris = read_coco(cfg.coco)
    if cfg.real_images:
        real_uris = real_uris[:cfg.real_images]
    rows = generation_rows(cfg, sample_captions(annotations, cfg.samples, cfg.seed))
    run_id, _ = tracking.start_run("evaluate", cfg.name, cfg, tags={"benchmark": "coco-fid"})
    print(f"[coco] {len(rows)} captions to generate for, {len(real_uris)} real images", flush=True)
    summary = generate_rows(rows, out, str(tracking.resolve_artifacts(cfg.model)), cfg.batch_size)
    written = done_keys(out)
    generated_uris = [image_uri(out, r["key"]) for r in rows if r["key"] in written]
    real, generated = inception_features(real_uris, generated_uris, cfg)
    metrics = {"coco_fid": fid_from_features(real, generated), "coco_real_images": float(len(real)),
               "coco_generated_images": float(len(generated)), "coco_skipped_rows": float(summary["skipped"])}
    tracking.log_metrics(run_id, metrics, 0)
    log_grid(run_id, rows, out, written)
    tracking.end_run(run_id)
    print(json.dumps({"run_id": run_id, **metrics}), flush=True)
    return metrics


def main(argv: list[str] | None = None) -> int:
    return job_main(argv, presets(), "coco", ("coco", "inception", "model", "out", "name"), run, __doc__.splitlines()[0])


if __name__ == "__main__":
    raise SystemExit(main())
