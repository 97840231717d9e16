"""The mini decoder's U-Net step with and without its precomputed inputs
(platform/train/decoder_inputs.py), in one process: the same batches, model and optimiser, once
running the frozen VAE encoder and text encoder in the step and once reading what they gave.

    .venv/bin/python bench/decoder_inputs.py [--steps 8] [--rounds 2] [--threads 2]

The `mini` preset's sizes (models/mini.py) with random weights (the cost of a step does not depend
on them): batch 32 of world scenes, AdamW on the U-Net and the update of its moving average. The
two ways alternate (in-step, precomputed, in-step, …) because this machine's speed drifts from
minute to minute; each precomputed round is taken against the mean of the in-step rounds either
side. Also prints what precomputing costs per record and what the preset's 5,000 steps save
(compute only: the job's data pipeline also stops decoding and tokenising the scenes).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time


def build(workdir: str):
    """A random mini VAE and text CLIP saved where the U-Net trainee loads them from, and the trainee."""
    from pathlib import Path

    from transformers import CLIPTextModel

    from kosmos_g.models.mini import MiniClipConfig, MiniDecoderConfig, build_clip, build_vae
    from kosmos_g.platform.train.backbones import UnetTrainee

    decoder = MiniDecoderConfig(unet_ema_decay=0.9999)
    build_vae(decoder).save_pretrained(f"{workdir}/vae")
    CLIPTextModel(build_clip(MiniClipConfig()).config.text_config).save_pretrained(f"{workdir}/clip")
    return decoder, UnetTrainee(decoder, Path(workdir), f"{workdir}/clip").train()


def batches(decoder, workdir: str, count: int, batch_size: int):
    """`count` batches of world scenes, both ways: raw (tokens, pixels) and precomputed."""
    import pyarrow as pa

    from kosmos_g.platform.data import precomputed
    from kosmos_g.platform.data.world import caption_rows, scenes
    from kosmos_g.platform.train.backbones import BackbonePreprocessor, to_tensors
    from kosmos_g.platform.train.decoder_inputs import FrozenInputs

    frozen = FrozenInputs(workdir, f"{workdir}/clip", decoder.image_size)
    preprocess = BackbonePreprocessor(decoder.image_size, "vae")
    raw, stored, seconds = [], [], 0.0
    for index in range(count):
        rows = caption_rows(scenes(index, batch_size))
        table = pa.table({"caption": [r["caption"] for r in rows], "image": [r["image"] for r in rows]})
        raw.append(to_tensors(preprocess(table)))
        started = time.perf_counter()
        moments, condition = frozen(table)
        seconds += time.perf_counter() - started
        stored.append(to_tensors(preprocess(pa.table({
            "latent_moments": [precomputed.npy_bytes(m) for m in moments],
            "condition": [precomputed.npy_bytes(c) for c in condition]}))))
    return raw, stored, seconds / (count * batch_size)


def steps_per_s(trainee, optimizer, batches_, steps: int, precomputed: bool) -> float:
    import torch

    started = time.perf_counter()
    for step in range(steps):
        batch = batches_[step % len(batches_)]
        generator = torch.Generator().manual_seed(step)
        if precomputed:
            loss = trainee(generator=generator, cond_dropout=0.1, **batch)["loss"]
        else:
            loss = trainee(batch["input_ids"], batch["pixel_values"], generator, 0.1)["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainee.unet.parameters(), 2.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        trainee.update_ema()
    return steps / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8, help="steps per timed run")
    parser.add_argument("--rounds", type=int, default=2, help="precomputed runs, each between two in-step runs")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the mini jobs run 2)")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="kosmos-bench-") as workdir:
        decoder, trainee = build(workdir)
        raw, stored, per_record = batches(decoder, workdir, 4, args.batch_size)
    optimizer = torch.optim.AdamW(trainee.trainable_parameters(), lr=1e-4)
    steps_per_s(trainee, optimizer, raw, 2, False)  # warm-up
    in_step = [steps_per_s(trainee, optimizer, raw, args.steps, False)]
    read, ratios = [], []
    for _ in range(args.rounds):
        read.append(steps_per_s(trainee, optimizer, stored, args.steps, True))
        in_step.append(steps_per_s(trainee, optimizer, raw, args.steps, False))
        ratios.append(read[-1] / ((in_step[-2] + in_step[-1]) / 2))
    print(f"mini decoder U-Net step, batch {args.batch_size}, {args.threads} torch thread(s), {args.steps} steps a run")
    print("| inputs | steps/s (runs in order) |\n|---|---|")
    print(f"| frozen VAE + text encoder in the step | {' / '.join(f'{v:.3f}' for v in in_step)} |")
    print(f"| precomputed | {' / '.join(f'{v:.3f}' for v in read)} |")
    print(f"precomputed / in the step: {' / '.join(f'{r:.2f}' for r in ratios)} "
          f"(median {statistics.median(ratios):.2f}x)")
    saved = 5000 * (1 / statistics.mean(in_step) - 1 / statistics.mean(read))
    print(f"precomputing costs {per_record * 1000:.1f} ms a record ({per_record * 10000 / 60:.1f} min for the "
          f"world's 10,000); the preset's 5,000 steps save {saved / 60:.1f} min of step compute")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
