"""Which of the world's eight held-out pairings does a model draw? The world evaluation's scores
(`pipelines/evaluate.py --preset world`, its `world/scores.csv`) of each given model, per held-out
pairing: the subject's colour on the one background it never appears on in training (`yellow on
white`), for one kind of case (`words`: told in words; `single`: the subject shown as an image).

    kosmos-g local up && eval "$(kosmos-g local env)"
    .venv/bin/python bench/heldout_pairings.py runs:/<stage 2 run>/model runs:/<another>/model --kind words

A model is named as its evaluation was (`--model`, pinned: `models:/kosmos-g/3`, `runs:/<id>/model`),
and its latest finished world evaluation with cases of that kind is read; nothing is generated.
Prints, for each hit (colour, shape, background; `swapped`: the subject's colour and the background
exchanged, read by evaluations since 2026-12-07), a markdown table of the pairings against the
models, then the mean over all cases (the evaluation's metric), the mean over pairings (each
pairing weighed once), and how many pairings each model draws as asked in at least half their
cases. Seeds of one config that differ by 0.2 in a metric differ in which pairings they bind;
these tables show which.
"""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from reproduce_mini import stack_env_missing  # noqa: E402

HITS = ("colour", "shape", "background", "swapped")
BOUND = 0.5  # a pairing counts as drawn when at least this share of its cases is


def scores_of(model_uri: str, kind: str) -> list[dict]:
    """The `kind` rows of `world/scores.csv` of the latest finished world evaluation of `model_uri`."""
    from kosmos_g.platform import tracking

    experiment = tracking.client().get_experiment_by_name(tracking.experiment_name("evaluate"))
    runs = [] if experiment is None else tracking.client().search_runs(
        [experiment.experiment_id], "tags.benchmark = 'world' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"])
    for run in runs:
        if run.data.tags.get("model") != model_uri or f"world_{kind}_images" not in run.data.metrics:
            continue
        with tempfile.TemporaryDirectory() as staging:
            path = tracking.client().download_artifacts(run.info.run_id, "world/scores.csv", staging)
            with open(path, newline="") as handle:
                return [row for row in csv.DictReader(handle) if row["kind"] == kind]
    raise LookupError(f"no finished world evaluation of {model_uri} with {kind!r} cases: run "
                      f"`pipelines/evaluate.py --preset world --model {model_uri}` first")


def table(hit: str, labels: list[str], rows_per_model: list[list[dict]]) -> list[str]:
    """One hit's markdown table: pairings (with their case counts) against the models, a column
    per model in the order of `labels` (which may repeat: `seed 1` under two configs)."""
    from kosmos_g.platform.evaluation import world as world_eval

    rates = [world_eval.by_pairing(rows) for rows in rows_per_model]
    pairings = list(dict.fromkeys(name for model_rates in rates for name in model_rates))
    lines = [f"| {hit}: held-out pairing | cases | " + " | ".join(labels) + " |", "|---|---|" + "---|" * len(labels)]
    for name in pairings:
        counts = {int(model_rates[name]["cases"]) for model_rates in rates if name in model_rates}
        cells = [f"{model_rates[name][hit]:.2f}" if hit in model_rates.get(name, {}) else "–" for model_rates in rates]
        lines.append(f"| {name} | {'/'.join(map(str, sorted(counts)))} | " + " | ".join(cells) + " |")
    summaries = {"all cases": [], "mean over pairings": [], f"pairings at ≥ {BOUND}": []}
    for model_rates, rows in zip(rates, rows_per_model):
        per_pairing = [hits[hit] for hits in model_rates.values() if hit in hits]
        every_case = [v for v in (world_eval.hit_value(row.get(hit)) for row in rows) if v is not None]
        summaries["all cases"].append(f"{sum(every_case) / len(every_case):.3f}" if every_case else "–")
        summaries["mean over pairings"].append(f"{sum(per_pairing) / len(per_pairing):.3f}" if per_pairing else "–")
        summaries[f"pairings at ≥ {BOUND}"].append(f"{sum(r >= BOUND for r in per_pairing)} of {len(per_pairing)}")
    lines += [f"| {name} | | " + " | ".join(cells) + " |" for name, cells in summaries.items()]
    return lines


def main(argv: list[str] | None = None) -> int:
    from kosmos_g.platform.evaluation.world import PAIRING_HITS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help="model URIs as their world evaluations were given them")
    parser.add_argument("--kind", default="words", choices=("single", "words", "text", "pair"))
    parser.add_argument("--labels", nargs="*", help="a column label per model (default: the URIs)")
    parser.add_argument("--hits", nargs="*", default=list(HITS), choices=PAIRING_HITS)
    args = parser.parse_args(argv)
    if args.labels and len(args.labels) != len(args.models):
        parser.error(f"{len(args.labels)} labels for {len(args.models)} models")
    if stack_env_missing():
        return 2
    labels = args.labels or args.models
    try:
        rows_per_model = [scores_of(model, args.kind) for model in args.models]
    except LookupError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    for hit in args.hits:
        print("\n".join(table(hit, labels, rows_per_model)) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
