"""Does stage 2 learn the world's captions or the mapping? The stage-2 losses of trained Kosmos-G
models (a stage 2 or later) on four caption sets of the same world:

- seen, one object: every one-object caption of the training data (192, each ~600 times in a
  3,000-step stage 2 of batch 64);
- held out, one object: the 32 captions the training data never holds, `a red star on a yellow
  background` (the object on its held-out background): what the world evaluation tells in words;
- seen, two objects: two-object captions of the training data;
- unseen, two objects: two-object captions of allowed pairs that the training data happens not to
  hold (from scenes of another seed): new sentences, no held-out pairing.

A model that learned the mapping loses about as much on the unseen sets as on the seen ones; one
that memorised its captions loses more on them. Read beside bench/stage2_steps.py's
words-evaluation rows, which measure the same models by what their conditions make the decoder draw.

    kosmos-g local up && eval "$(kosmos-g local env)"
    .venv/bin/python bench/stage2_gap.py runs:/<stage-2 run id>/model runs:/<another>/model

Runs in this process (forward passes only; about 10 s per mini model on 2 cores). Prints a
markdown table: per model and set, the condition MSE against the CLIP text teacher (the loss that
matters for generation) and the reconstruction loss (scaled by each batch's padded length, as in
training), then each unseen set's MSE over its seen set's.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from reproduce_mini import stack_env_missing  # noqa: E402

UNSEEN_SEED = 1  # scenes of another seed: where the two-object captions the training lacks come from


def caption_sets(per_set: int = 192) -> dict[str, list[str]]:
    """The four caption sets, in a fixed order, from the world the jobs train on (seed 0). The
    two-object sets take captions in the order the scenes first show them (no pick by frequency)."""
    from kosmos_g.platform.data import world

    seen = Counter(scene.caption for scene in world.scenes(0, world.TRAINING_SCENES, "train"))
    seen_one = sorted(caption for caption in seen if " and " not in caption)
    seen_two = [caption for caption in seen if " and " in caption]  # a Counter keeps first-seen order
    box = (0, 0, world.MIN_OBJECT, world.MIN_OBJECT)  # captions do not say where; any box will do
    held_out = [world.Scene(world.held_out_background(colour), (world.WorldObject(colour, shape, box),)).caption
                for colour in world.COLOURS for shape in world.SHAPES]
    if any(caption in seen for caption in held_out):
        raise AssertionError("a held-out caption is in the training data: the world's split is broken")
    unseen_two = dict.fromkeys(scene.caption for scene in world.scenes(UNSEEN_SEED, world.TRAINING_SCENES, "train")
                               if " and " in scene.caption and scene.caption not in seen)
    return {"seen, one object": seen_one, "held out, one object": held_out,
            "seen, two objects": seen_two[:per_set], "unseen, two objects": list(unseen_two)[:per_set]}


def stage2_losses(model, captions: list[str], batch_size: int = 64) -> dict[str, float]:
    """Caption-weighted means of the stage-2 losses (`KosmosG.align_loss`) over `captions`."""
    import torch

    totals = {"mse": 0.0, "rec": 0.0}
    with torch.no_grad():
        for start in range(0, len(captions), batch_size):
            chunk = captions[start:start + batch_size]
            losses = model.align_loss(model.tokenizer(chunk), chunk)
            for name in totals:
                totals[name] += float(losses[name]) * len(chunk)
    return {name: total / len(captions) for name, total in totals.items()}


def load_model(model_uri: str, threads: int):
    import torch

    from kosmos_g.platform.weights import load_bundle, local_dir

    torch.set_num_threads(threads)
    return load_bundle(local_dir(model_uri), device="cpu").eval()


def table(results: dict[str, dict[str, dict[str, float]]], sets: dict[str, list[str]]) -> list[str]:
    names = list(sets)
    rows = ["| model | " + " | ".join(f"{name} ({len(sets[name])}): MSE / rec" for name in names)
            + " | held out / seen, one object | unseen / seen, two objects |",
            "|---|" + "---|" * (len(names) + 2)]
    for uri, losses in results.items():
        cells = [f"{losses[name]['mse']:.4f} / {losses[name]['rec']:.4f}" for name in names]
        one = losses["held out, one object"]["mse"] / losses["seen, one object"]["mse"]
        two = losses["unseen, two objects"]["mse"] / losses["seen, two objects"]["mse"]
        rows.append(f"| {uri} | " + " | ".join(cells) + f" | {one:.2f}× | {two:.2f}× |")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help="Kosmos-G model URIs (runs:/…/model, models:/kosmos-g-align/1, a folder)")
    parser.add_argument("--per-set", type=int, default=192, help="captions in each two-object set")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    from kosmos_g.platform.weights import REGISTRY_SCHEMES

    if any(uri.startswith(REGISTRY_SCHEMES) for uri in args.models) and stack_env_missing():
        return 2
    sets = caption_sets(args.per_set)
    results = {}
    for uri in args.models:
        model = load_model(uri, args.threads)
        results[uri] = {name: stage2_losses(model, captions) for name, captions in sets.items()}
        print(f"{uri}: " + ", ".join(f"{name} {losses['mse']:.4f}" for name, losses in results[uri].items()),
              flush=True)
    print("\n".join(table(results, sets)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
