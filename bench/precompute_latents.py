"""Stage 3 with and without precomputed target latents (pipelines/precompute.py), in one run:
the same config, data and number of Ray Train workers, once encoding every target with the
frozen VAE in the step and once reading the VAE posteriors written beforehand.

    .venv/bin/python bench/precompute_latents.py [--steps 20] [--vae sd|tiny] [--set k=v]

`--vae sd` (default) gives the tiny model Stable Diffusion v1.5's VAE architecture (random
weights) at 256 px, so the encoding the step saves costs what it costs in the paper's setting,
scaled down from 512 px; `--vae tiny` keeps the tiny preset's VAE. Prints the precompute job's
rows/s, steps/s of both runs (steady, from the runs' MLflow metrics) and their ratio. Runs
self-contained like bench/train_overhead.py (temporary MLflow store and storage directory
unless the environment points elsewhere).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_overhead import prepare_environment, ray_train_loop, stage_config  # noqa: E402

SD_VAE_256 = ["model.image_decoder.image_size=256", "model.image_decoder.vae_block_out_channels=[128,256,512,512]",
              "model.image_decoder.vae_layers_per_block=2", "model.image_decoder.vae_norm_num_groups=32"]


def precompute_once(cfg) -> dict[str, float]:
    """The precompute job's code on the stage's own config; its wall time."""
    import copy

    from kosmos_g.pipelines import precompute

    started = time.perf_counter()
    precompute.run(copy.deepcopy(cfg), argparse.Namespace(force=False, batch_size=8, workers=1, num_cpus=1.0))
    return {"wall_s": time.perf_counter() - started}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--vae", choices=["sd", "tiny"], default="sd")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    overrides = (SD_VAE_256 if args.vae == "sd" else []) + args.overrides
    with tempfile.TemporaryDirectory(prefix="kosmos-bench-") as workdir:
        prepare_environment(workdir)
        from kosmos_g.platform.stack import cluster

        cluster.connect()
        in_step = ray_train_loop(stage_config(3, args.steps, args.workers, overrides + ["data.precomputed=off"]))
        cfg = stage_config(3, args.steps, args.workers, overrides)
        made = precompute_once(cfg)
        read = ray_train_loop(cfg)
    print(f"stage 3, tiny model with the {args.vae} VAE at {cfg.model.image_decoder.image_size} px, {args.steps} steps, "
          f"global batch {cfg.train.batch_size * cfg.train.num_workers}, {args.workers} Ray Train workers, "
          f"{os.cpu_count()} cores")
    print(f"precompute job (whole sample set, incl. start-up): {made['wall_s']:.1f} s")
    print(f"VAE in the step:        {in_step['steps_per_s']:.2f} steps/s steady, data wait "
          f"{in_step['data_wait_fraction']:.0%}")
    print(f"precomputed latents:    {read['steps_per_s']:.2f} steps/s steady, data wait "
          f"{read['data_wait_fraction']:.0%}")
    print(f"ratio precomputed / in the step: {read['steps_per_s'] / in_step['steps_per_s']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
