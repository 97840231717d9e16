"""`kosmos-g evaluate dreambench|coco …`: the evaluation jobs (pipelines/evaluate.py,
pipelines/evaluate_coco.py) from the shell.

    kosmos-g evaluate dreambench --subjects s3://…/dreambench --model models:/kosmos-g@current \\
        --dino s3://…/dino-vits16 --clip s3://…/clip-vit-base-patch32 [--preset dreambench|tiny] [--set k=v]
    kosmos-g evaluate coco --coco s3://…/coco --inception s3://…/inception-2015-12-05.pt \\
        --model models:/kosmos-g@current [--preset coco|tiny] [--set samples=1000]

Runs in this process as a Ray driver (the cluster in RAY_ADDRESS, else a local Ray).
"""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    parser = subparsers.add_parser("evaluate", help="score a model: DreamBench DINO / CLIP-I / CLIP-T or COCO FID, to MLflow",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("benchmark", choices=["dreambench", "coco"])
    parser.add_argument("rest", nargs=argparse.REMAINDER, help="arguments of pipelines/evaluate.py")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.benchmark == "coco":
        from kosmos_g.pipelines.evaluate_coco import main
    else:
        from kosmos_g.pipelines.evaluate import main
    return main(args.rest)
