"""`kosmos-g evaluate dreambench …`: the DreamBench job (pipelines/evaluate.py) from the shell.

    kosmos-g evaluate dreambench --subjects s3://…/dreambench --model models:/kosmos-g@current \\
        --dino s3://…/dino-vits16 --clip s3://…/clip-vit-base-patch32 [--preset dreambench|tiny] [--set k=v]

Runs in this process as a Ray driver (the cluster in RAY_ADDRESS, else a local Ray).
"""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    parser = subparsers.add_parser("evaluate", help="score a model: DreamBench DINO / CLIP-I / CLIP-T to MLflow",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("benchmark", choices=["dreambench"])
    parser.add_argument("rest", nargs=argparse.REMAINDER, help="arguments of pipelines/evaluate.py")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from kosmos_g.pipelines.evaluate import main

    return main(args.rest)
