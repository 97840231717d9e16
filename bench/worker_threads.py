"""Does a CPU training worker's step keep its intra-op threads? A `mini` job of the chain run in
turns with `train.torch_threads_others=0` (PyTorch's default: Ray Data's collation threads get as
many intra-op threads as the step, each its own OpenMP team) and `=1` (the loop's default,
`platform/train/loop.own_intra_op_threads`), on the local stack, same run.

    kosmos-g local up && eval "$(kosmos-g local env)"
    .venv/bin/python bench/worker_threads.py                       # stage 3, 150 steps, 2 rounds
    .venv/bin/python bench/worker_threads.py --job mini_clip --steps 250

Each run trains afresh under a new name and registers nothing. Prints each run's samples/s (the
job log's windows after the first two, which hold the start-up) and the ratio of the means. The
machine's speed drifts, so the two settings alternate: 0, 1, 0, 1, ...
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import uuid
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from reproduce_mini import stack_env_missing, submit  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "worker_threads"
# The decoder job: a short VAE part, and its frozen inputs computed in the step (a fresh VAE
# would otherwise have them written for all 10,000 scenes first).
JOBS = {"pretrain": [], "align": [], "instruct": [], "mini_clip": [], "mini_text_clip": [],
        "mini_decoder": ["--set", "vae_steps=20", "--set", "data.precomputed=off"]}
# The training loop's progress line (platform/train/loop.py): one per logged window of steps.
STEP_LINE = re.compile(r"\] step (\d+)/(\d+) loss ([\d.]+) samples/s ([\d.]+)")


class StepWindow(NamedTuple):
    step: int
    total: int
    loss: float  # the window's mean loss
    samples_per_s: float


def step_windows(log: Path, steps: int) -> list[StepWindow]:
    """The logged windows of a job log's `steps`-step part (a decoder job's VAE part has its own
    total, and is left out)."""
    windows = [StepWindow(int(m[1]), int(m[2]), float(m[3]), float(m[4]))
               for line in log.read_text().splitlines() if (m := STEP_LINE.search(line))]
    return [w for w in windows if w.total == steps]


def samples_per_s(log: Path, steps: int) -> float:
    """Mean samples/s of the log's windows of the `steps`-step part, the first two left out."""
    rates = [w.samples_per_s for w in step_windows(log, steps)]
    if len(rates) < 3:
        raise SystemExit(f"[worker_threads] {log}: {len(rates)} logged windows; ask for more --steps")
    return statistics.mean(rates[2:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--job", choices=sorted(JOBS), default="instruct")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    if stack_env_missing():
        return 2
    rates: dict[int, list[float]] = {0: [], 1: []}
    for round_ in range(1, args.rounds + 1):
        for others in (0, 1):
            step = f"{args.job}-others{others}-round{round_}"
            submit(step, f"pipelines/{args.job}.py", [
                "--preset", "mini", "--set", f"train.steps={args.steps}",
                "--set", f"name=threads-{uuid.uuid4().hex[:6]}", "--set", "register=false", "--set", "force=true",
                "--set", f"train.torch_threads_others={others}",
                *JOBS[args.job]], results=RESULTS)
            rates[others].append(samples_per_s(RESULTS / f"{step}.log", args.steps))
            print(f"[worker_threads] {step}: {rates[others][-1]:.1f} samples/s", flush=True)
    shared, own = statistics.mean(rates[0]), statistics.mean(rates[1])
    print(f"\n| {args.job}, {args.steps} steps | samples/s per round | mean |\n|---|---|---|")
    for others, label in ((0, "others 0 (every thread as many as the step)"), (1, "others 1 (the default)")):
        print(f"| {label} | {' / '.join(f'{r:.1f}' for r in rates[others])} | {statistics.mean(rates[others]):.1f} |")
    print(f"\nratio (others 1 / others 0): {own / shared:.2f}×")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
