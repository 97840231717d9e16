"""What does stage 3 buy per step? The `mini` stage 3 trained afresh for each given number of
steps (its own learning-rate schedule each time, as a shorter preset would have it) from the
registered `kosmos-g-align` and `kosmos-g-mini-decoder`, each run scored on the world
evaluation's held-out cases, on the local stack, same run.

    kosmos-g local up && eval "$(kosmos-g local env)"
    .venv/bin/python bench/stage3_steps.py --steps 1000 2500
    .venv/bin/python bench/stage3_steps.py --steps 1000 --set optim.lr=1e-3

Each run trains under a new name and registers nothing (its model stays in its MLflow run, as the
ablation's does), so the served default stays the registered `kosmos-g`. Prints, per run: the
training job's wall time and samples/s, and the one-subject colour, shape and background and the
two-subject both-colours rates against the targets of issue 11 (the 95% interval of each is the
evaluation's sampling alone). `--reference models:/kosmos-g/1` scores a registered model beside them.
"""

from __future__ import annotations

import argparse
import re
import sys
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from reproduce_mini import TARGETS, stack_env_missing, submit  # noqa: E402
from worker_threads import samples_per_s  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "stage3_steps"


def slug(text: str) -> str:
    """`text` as a log file's name: an override may hold a URI (`…pretrained_path=runs:/<id>/model`)."""
    return re.sub(r"[^\w.-]+", "-", text.replace("=", ""))


def train_afresh(pipeline: str, steps: int, overrides: list[str], results: Path) -> tuple[dict, Path]:
    """`pipelines/<pipeline>.py --preset mini` for `steps` steps under a new name, registering
    nothing; its JSON summary (with the run id) and its log."""
    step = slug("-".join([pipeline, str(steps), *overrides]))
    summary = submit(step, f"pipelines/{pipeline}.py", [
        "--preset", "mini", "--set", f"train.steps={steps}", "--set", f"name={pipeline}-steps-{uuid.uuid4().hex[:6]}",
        "--set", "register=false", "--set", "force=true", *(a for o in overrides for a in ("--set", o))],
        results=results)
    if not summary.get("run_id"):
        raise SystemExit(f"[bench] {step} printed no run id; see {results / step}.log")
    return summary, results / f"{step}.log"


def train(steps: int, overrides: list[str]) -> dict:
    summary, log = train_afresh("instruct", steps, overrides, RESULTS)
    summary["samples_per_s"] = samples_per_s(log, steps)
    return summary


def evaluate(label: str, model_uri: str, singles: int, pairs: int) -> dict:
    return submit(f"evaluate-{label}", "pipelines/evaluate.py", [
        "--preset", "world", "--model", model_uri, "--set", f"singles={singles}", "--set", f"pairs={pairs}"],
        results=RESULTS)


def rate_cell(rate: float, cases: float) -> str:
    """A hit rate with the 95% interval the evaluation's sampling alone leaves open."""
    from kosmos_g.platform.evaluation.world import rate_interval

    low, high = rate_interval(rate, cases)
    return f"{rate:.3f} ({low:.2f}–{high:.2f})"


def row(label: str, trained: dict | None, metrics: dict) -> str:
    cells = [rate_cell(metrics[key], metrics[f"world_{key.split('_')[1]}_images"]) for key in TARGETS]
    time = f"{trained['wall_s'] / 60:.1f} min | {trained['samples_per_s']:.1f}" if trained else "– | –"
    return f"| {label} | {time} | " + " | ".join(cells) + " |"


def sweep(step_counts: list[int], overrides: list[str], train_run, score, table_row) -> list[str]:
    """One table row per step count: `train_run(steps, overrides)` afresh, then
    `score(label, model_uri)` on its model, each row printed as it comes."""
    rows = []
    for steps in step_counts:
        trained = train_run(steps, overrides)
        label = " ".join([f"{steps} steps", *overrides])
        metrics = score(slug(label), f"runs:/{trained['run_id']}/model")
        rows.append(table_row(f"{label} (run {trained['run_id'][:8]})", trained, metrics))
        print(rows[-1], flush=True)
    return rows


def report(rows: list[str], results: Path, script: str, argv: list[str] | None) -> None:
    """Print the table and append it, under the command that made it, to `results`/tables.md
    (every invocation's table, oldest first)."""
    print("\n" + "\n".join(rows))
    with open(results / "tables.md", "a") as tables:
        tables.write(f"\n`{script} {' '.join(argv if argv is not None else sys.argv[1:])}`\n\n"
                     + "\n".join(rows) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, nargs="+", required=True, help="stage-3 step counts, one run each")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a stage-3 config override for every run, e.g. optim.lr=1e-3 (repeatable)")
    parser.add_argument("--reference", default="", help="a trained stage-3 model URI scored beside them")
    parser.add_argument("--singles", type=int, default=200)
    parser.add_argument("--pairs", type=int, default=100)
    args = parser.parse_args(argv)
    if stack_env_missing():
        return 2
    rows = ["| stage 3 | training job | samples/s | " + " | ".join(f"{name} (≥ {target})" for name, target
                                                           in TARGETS.values()) + " |",
            "|---|---|---|" + "---|" * len(TARGETS)]
    if args.reference:
        rows.append(row(args.reference, None, evaluate("reference", args.reference, args.singles, args.pairs)))
        print(rows[-1], flush=True)
    rows += sweep(args.steps, args.overrides, train,
                  lambda label, uri: evaluate(label, uri, args.singles, args.pairs), row)
    report(rows, RESULTS, "stage3_steps.py", argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
