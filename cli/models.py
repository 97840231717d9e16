"""`kosmos-g models`: parameter counts of a model preset, per component (trainable/frozen)."""

from __future__ import annotations

import argparse
import json


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "models", help="show a model preset's parameter counts per component",
        description="Parameter counts per component. The model is built on the meta device "
        "(shapes only), so even the paper preset takes seconds and no memory.",
    )
    parser.add_argument("--preset", default="paper", help="model preset: tiny or paper (default: paper)")
    parser.add_argument("--stage", type=int, choices=(1, 2, 3), default=3,
                        help="training stage deciding what is trainable (default: 3)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # Imported here so that `kosmos-g --help` and other subcommands never load torch.
    from kosmos_g.models.config import PRESETS
    from kosmos_g.models.counts import format_table, preset_parameter_counts

    if args.preset not in PRESETS:
        print(f"unknown preset {args.preset!r}; choose one of {sorted(PRESETS)}")
        return 2
    counts = preset_parameter_counts(args.preset, args.stage)
    print(json.dumps(counts, indent=2) if args.json else format_table(counts))
    return 0
