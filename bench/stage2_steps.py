"""How many stage-2 steps does the alignment need? The `mini` stage 2 trained afresh for each given
number of steps (its own learning-rate schedule each time) from the registered `kosmos-g-pretrain`,
each run then told the world evaluation's one-subject held-out cases in words
(`a red star on a purple background`): text-to-image through the MLLM and AlignerNet, the paper's
Table 2 measure of stage 2, whose ceiling is the frozen decoder told the same words.

    kosmos-g local up && eval "$(kosmos-g local env)"
    .venv/bin/python bench/stage2_steps.py --steps 600 3000 --decoder models:/kosmos-g-mini-decoder/1
    .venv/bin/python bench/stage2_steps.py --steps 3000 --set model.aligner.encoder_layers=0   # Table 2's ablation

Each run trains under a new name and registers nothing (its model stays in its MLflow run), so
`bench/stage3_steps.py --set init=runs:/<run id>/model` can start a stage 3 from it. Prints, per
run: the job's wall time, steps/s, the last logged window's loss, and the colour, shape and
background drawn as asked (each with the 95% interval of the evaluation's sampling) and CLIP-T.
`--decoder` adds the ceiling row: the frozen mini decoder told the same cases with its own text
encoder (`bench/shape_transfer.decoder_readings`, in this process; no CLIP-T), alone without
`--steps`; `--reference` adds a trained Kosmos-G model (a stage 2 or 3) told them as the runs are.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from reproduce_mini import stack_env_missing, submit  # noqa: E402
from stage3_steps import rate_cell, report, sweep, train_afresh  # noqa: E402
from worker_threads import step_windows  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "stage2_steps"
ASKED = ("colour", "shape", "background")


def train(steps: int, overrides: list[str]) -> dict:
    summary, log = train_afresh("align", steps, overrides, RESULTS)
    windows = step_windows(log, steps)
    summary["last_loss"] = windows[-1].loss if windows else float("nan")
    summary["steps"] = steps
    return summary


def told_in_words(label: str, model_uri: str, singles: int) -> dict:
    """The world evaluation's one-subject cases (and their twins) with the words kind, no pairs."""
    return submit(f"evaluate-{label}", "pipelines/evaluate.py", [
        "--preset", "world", "--model", model_uri, "--set", f"singles={singles}", "--set", "pairs=0",
        "--set", "words=true"], results=RESULTS)


def decoder_in_words(decoder_uri: str, singles: int) -> dict:
    """The frozen decoder's metrics on the one-subject cases in words, named as `row` reads them
    (the decoder is no Kosmos-G model, so the evaluation job cannot prompt it)."""
    import shape_transfer

    metrics, _ = shape_transfer.decoder_readings(decoder_uri, singles)
    return {key.replace("world_single_", "world_words_"): value
            for key, value in metrics.items() if key.startswith("world_single_")}


def row(label: str, trained: dict | None, metrics: dict) -> str:
    cells = [rate_cell(metrics[f"world_words_{name}"], metrics["world_words_images"]) for name in ASKED]
    clip_t = metrics.get("world_words_clip_t")
    cells.append("–" if clip_t is None else f"{clip_t:.1f}")
    if trained:
        steps_per_s = trained["steps"] / trained["wall_s"]
        job = f"{trained['wall_s'] / 60:.1f} min | {steps_per_s:.2f} | {trained['last_loss']:.4f}"
    else:
        job = "– | – | –"
    return f"| {label} | {job} | " + " | ".join(cells) + " |"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, nargs="*", default=[], help="stage-2 step counts, one run each")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a stage-2 config override for every run, e.g. model.aligner.encoder_layers=0 (repeatable)")
    parser.add_argument("--decoder", default="",
                        help="a mini decoder URI told the same words with its own text encoder (the ceiling row)")
    parser.add_argument("--reference", default="",
                        help="a trained Kosmos-G model URI told the same words beside them, e.g. models:/kosmos-g-align/1")
    parser.add_argument("--singles", type=int, default=200)
    args = parser.parse_args(argv)
    if not (args.steps or args.decoder or args.reference):
        parser.error("nothing to measure: give --steps, --decoder or --reference")
    if stack_env_missing():
        return 2
    rows = ["| stage 2 | training job (with its start) | steps/s | last loss | told in words: "
            + " | ".join(ASKED) + " | CLIP-T |", "|---|---|---|---|---|---|---|---|"]
    if args.decoder:
        rows.append(row(f"{args.decoder} (the decoder alone)", None, decoder_in_words(args.decoder, args.singles)))
        print(rows[-1], flush=True)
    if args.reference:
        rows.append(row(args.reference, None, told_in_words("reference", args.reference, args.singles)))
        print(rows[-1], flush=True)
    rows += sweep(args.steps, args.overrides, train, lambda label, uri: told_in_words(label, uri, args.singles), row)
    report(rows, RESULTS, "stage2_steps.py", argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
