"""Precompute what the frozen models give every step: the CLIP text teacher's output on each
stage-2 caption, or the VAE posterior of each stage-3 target image, into shards beside the
originals (platform/data/precomputed.py). The stage job then reads them instead of running the
teacher / the VAE in its step, with the same loss; without them it computes them as before.

    ray job submit -- python pipelines/precompute.py --stage 3 --preset mini
    ray job submit -- python pipelines/precompute.py --stage 2 --preset paper --set init=models:/kosmos-g-pretrain/3

Takes the stage's own presets and `--set` options (the same data sources, the same starting
model, hence the same frozen decoder). One Ray Data actor pool encodes a shard per call (a GPU per
actor when the cluster has them); a source whose set is complete for this decoder is skipped
unless `--force`. Progress is printed per shard; counts and time go to MLflow (experiment
`kosmos-g/precompute`).
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import pyarrow as pa

from kosmos_g.platform import tracking
from kosmos_g.platform.config import ConfigError, to_dict, to_yaml
from kosmos_g.platform.data import precomputed
from kosmos_g.platform.stack import cluster


class StageShardEncoder(precomputed.ShardEncoder):
    """One source shard -> the frozen teacher's outputs (stage 2) or VAE posteriors (stage 3)."""

    def __init__(self, config: dict, init_uri: str | None, source: str, source_prefix: str, key: str,
                 batch_size: int):
        import torch

        from kosmos_g.platform.config import from_dict
        from kosmos_g.platform.train.config import StageConfig

        super().__init__(source_prefix, key)
        self.cfg = from_dict(StageConfig, config)
        self.source, self.batch_size = source, batch_size
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.decoder = self._decoder(init_uri)

    def _decoder(self, init_uri):
        """The frozen decoder the stage's workers build (train/task.py), from the same place."""
        from kosmos_g.models.image_decoder import ImageDecoder
        from kosmos_g.platform.train.job import model_config_for
        from kosmos_g.platform.train.task import StageTask
        from kosmos_g.platform.weights import localize

        model_cfg = model_config_for(self.cfg, init_uri)
        if model_cfg.image_decoder.pretrained_path:
            return ImageDecoder(localize(model_cfg).image_decoder).to(self.device).train(False)
        # A random decoder (tiny presets started from random): the seeded build of the workers.
        return StageTask(self.cfg.stage).build(self.cfg, None, self.device).image_decoder

    def encode(self, uri: str) -> tuple[dict, int]:
        return self._teacher(uri) if self.cfg.stage == 2 else self._latents(uri)

    def _chunks(self, indices: list[int]):
        for start in range(0, len(indices), self.batch_size):
            yield indices[start:start + self.batch_size]

    def _teacher(self, uri: str) -> tuple[dict, int]:
        records = precomputed.read_shard(uri, ["key", "caption"], self.filesystem).to_pylist()
        captions = [row["caption"] if isinstance(row["caption"], str) and row["caption"].strip() else None
                    for row in records]
        outputs: list[bytes | None] = [None] * len(records)
        for chunk in self._chunks([i for i, caption in enumerate(captions) if caption is not None]):
            states = self.decoder.text_condition([captions[i] for i in chunk]).float().cpu().numpy()
            for i, state in zip(chunk, states):
                outputs[i] = precomputed.npy_bytes(state)
        skipped = sum(value is None for value in outputs)
        return {"key": [row["key"] for row in records], "teacher": pa.array(outputs, pa.binary())}, skipped

    def _latents(self, uri: str) -> tuple[dict, int]:
        import torch

        from kosmos_g.platform.data.examples import target_pixels
        from kosmos_g.platform.data.skips import SkipRecord

        column = precomputed.REPLACED[3][self.source]
        records = precomputed.read_shard(uri, ["key", column], self.filesystem).to_pylist()
        size, data = self.cfg.model.image_decoder.image_size, self.cfg.data
        pixels: list[bytes | None] = []
        reasons: list[str | None] = []
        for row in records:
            try:
                pixels.append(target_pixels(row[column], size, data.min_image_side, data.fast_decode))
                reasons.append(None)
            except SkipRecord as skip:  # kept, so the stage counts it as it would have
                pixels.append(None)
                reasons.append(skip.reason)
        outputs: list[bytes | None] = [None] * len(records)
        for chunk in self._chunks([i for i, raw in enumerate(pixels) if raw is not None]):
            uint8 = np.stack([np.frombuffer(pixels[i], np.uint8).reshape(3, size, size) for i in chunk])
            # The same conversion as the stream's collator (examples.StreamCollator).
            moments = self.decoder.latent_moments(torch.from_numpy(uint8).float() / 255.0 * 2.0 - 1.0)
            for i, moment in zip(chunk, moments.float().cpu().numpy()):  # numpy has no bfloat16
                outputs[i] = precomputed.npy_bytes(moment)
        return {"key": [row["key"] for row in records], "target_latents": pa.array(outputs, pa.binary()),
                "target_skip": pa.array(reasons, pa.string())}, sum(r is not None for r in reasons)


def run(cfg, args) -> dict[str, float]:
    import ray

    from kosmos_g.platform.data.datastream import stage_sources
    from kosmos_g.platform.train import job

    if cfg.stage not in precomputed.KINDS:
        raise ConfigError("only stages 2 (teacher outputs) and 3 (target latents) have anything to precompute")
    cfg.validate()
    cluster.connect()
    cluster.quiet_data_progress()
    job.pin_backbones(cfg)
    job.ensure_sample_data(cfg)
    job.ensure_world_data(cfg)
    init_uri = job.resolve_init(cfg)
    model_cfg = job.model_config_for(cfg, init_uri)
    identity = job.decoder_identity(model_cfg, init_uri)
    key = precomputed.precompute_key(cfg.stage, model_cfg, identity, cfg.data)
    run_id, _ = tracking.start_run("precompute", f"stage{cfg.stage}-{key}", cfg,
                                   tags={"stage": str(cfg.stage), "key": key, "decoder": identity})
    metrics, started = {"rows": 0, "skipped": 0, "shards": 0}, time.monotonic()
    try:
        for source, prefix, _ in stage_sources(cfg.stage, cfg.data):
            if precomputed.is_complete(prefix, key) and not args.force:
                print(f"[precompute] {source}: {precomputed.prefix_for(prefix, key)} is complete (--force redoes it)",
                      flush=True)
                continue
            gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
            counts = precomputed.encode_source(
                prefix, key, identity, StageShardEncoder,
                {"config": to_dict(cfg), "init_uri": init_uri, "source": source, "batch_size": args.batch_size},
                concurrency=args.workers, num_cpus=args.num_cpus, num_gpus=gpus, label=f"[precompute] {source}")
            metrics = {name: metrics[name] + counts[name] for name in metrics}
    except BaseException:
        tracking.end_run(run_id, "FAILED")
        raise
    seconds = time.monotonic() - started
    metrics.update(seconds=seconds, rows_per_s=metrics["rows"] / max(seconds, 1e-9))
    tracking.log_metrics(run_id, metrics)
    tracking.end_run(run_id)
    print(f"[precompute] stage {cfg.stage} {key}: {metrics['rows']} rows in {metrics['shards']} shards "
          f"({metrics['skipped']} kept as skipped) in {seconds:.0f}s; run {run_id}", flush=True)
    return metrics


def main(argv: list[str] | None = None) -> int:
    from kosmos_g.platform.train.config import stage_presets

    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--stage", type=int, choices=sorted(precomputed.KINDS), default=3)
    known, _ = first.parse_known_args(argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], parents=[first])
    stage_presets(known.stage).add_arguments(parser)
    parser.add_argument("--force", action="store_true", help="compute again even where a complete set exists")
    parser.add_argument("--batch-size", type=int, default=32, help="rows per forward pass of the frozen model")
    parser.add_argument("--workers", type=int, default=1, help="encoder actors (one GPU each when present)")
    parser.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per encoder actor")
    args = parser.parse_args(argv)
    cfg = stage_presets(known.stage).from_args(args)
    if args.print_config:
        print(to_yaml(cfg), end="")
        return 0
    try:
        run(cfg, args)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
