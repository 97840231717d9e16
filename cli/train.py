"""`kosmos-g train pretrain|align|instruct|all`: run training stages from the shell.

Each stage runs in this process as a Ray driver (on the cluster in RAY_ADDRESS,
e.g. the local stack after `eval "$(kosmos-g local env)"`, else a local Ray).
`all` runs data construction and the three stages in order, each starting from
the model the previous one registered; with `--preset mini` it first trains (or reuses) the
miniature world's two mini CLIPs and its mini decoder, and construction runs its `world` preset (the
world's stand-ins for the captioner, entity extractor and segmenter).
"""

from __future__ import annotations

import argparse

STAGES = {"pretrain": 1, "align": 2, "instruct": 3}


def register(subparsers) -> None:
    parser = subparsers.add_parser("train", help="run training stages (Ray Train + DeepSpeed)")
    parser.add_argument("stage", choices=[*STAGES, "all"])
    parser.add_argument("--preset", default="tiny", choices=["tiny", "mini", "paper"])
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override applied to every stage run (repeatable)")
    parser.add_argument("--skip-construct", action="store_true", help="with `all`: reuse existing shards")
    parser.set_defaults(func=run)


def _stage_args(args: argparse.Namespace) -> list[str]:
    argv = ["--preset", args.preset]
    for override in args.overrides:
        argv += ["--set", override]
    return argv


def run(args: argparse.Namespace) -> int:
    from kosmos_g.platform.train.job import main as stage_main

    if args.stage != "all":
        return stage_main(STAGES[args.stage], _stage_args(args))
    if args.preset == "mini":
        from kosmos_g.platform.train.backbone_job import main as backbone_main

        for kind in ("clip", "text-clip", "decoder"):
            print(f"=== mini {kind} ===", flush=True)
            status = backbone_main(kind, ["--preset", "mini"])
            if status:
                return status
    if not args.skip_construct:
        from kosmos_g.pipelines.construct import main as construct_main

        # The miniature world's compositional shards come from the construction pipeline too,
        # with the world's stand-ins for its three models.
        status = construct_main(["--preset", "world" if args.preset == "mini" else args.preset])
        if status:
            return status
    for name, stage in STAGES.items():
        print(f"=== {name} ===", flush=True)
        status = stage_main(stage, _stage_args(args))
        if status:
            return status
    return 0
