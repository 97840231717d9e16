"""`kosmos-g data samples|world|subject|import-captions|import-edits|precompute`: shards in object
storage (and a miniature-world subject image to prompt with, and a stage's precomputed teacher
outputs or target latents beside its shards: pipelines/precompute.py).

Shards land under `$KOSMOS_STORAGE_ROOT/datasets/…` by default (the local
stack's bucket after `eval "$(kosmos-g local env)"`), where the `tiny` training
presets look for them.
"""

from __future__ import annotations

import argparse
import json


def default_root() -> str:
    from kosmos_g.platform import storage

    return storage.default_root("datasets")


def register(subparsers) -> None:
    parser = subparsers.add_parser("data", help="write the sample shards or import data sets into shards")
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)

    samples = actions.add_parser("samples", help="the bundled sample set (scikit-image photographs)")
    samples.add_argument("--output", default=None, help="shard prefix (default: $KOSMOS_STORAGE_ROOT/datasets/samples)")
    samples.set_defaults(func=run_samples)

    world = actions.add_parser("world", help="the miniature world's training shards (captions + compositional)")
    world.add_argument("--out", default=None, help="shard prefix (default: $KOSMOS_STORAGE_ROOT/world, where the "
                       "mini presets read)")
    world.add_argument("--seed", type=int, default=0)
    world.add_argument("--n", type=int, default=10_000, help="scenes (held-out colour pairs never occur)")
    world.set_defaults(func=run_world)

    subject = actions.add_parser("subject", help="a miniature-world subject image (an entity crop, as stage 3 "
                                 "trains on) to put in a prompt")
    subject.add_argument("colour", choices=world_colours())
    subject.add_argument("shape", choices=world_shapes())
    subject.add_argument("--on", default=None, choices=world_colours(), help="background colour (default: a colour "
                         "the subject is trained on, neither its own nor its held-out one)")
    subject.add_argument("--seed", type=int, default=0, help="size and position in the scene it is cropped from")
    subject.add_argument("-o", "--output", required=True, help="PNG file")
    subject.set_defaults(func=run_subject)

    captions = actions.add_parser("import-captions", help="an image-caption table (Parquet/TSV/JSONL) → caption shards")
    captions.add_argument("table", help="table file or prefix; image paths are relative to it")
    captions.add_argument("output", help="shard prefix, e.g. s3://kosmos-g/datasets/my-captions")
    captions.add_argument("--image-column", default="image")
    captions.add_argument("--caption-column", default="caption")
    captions.set_defaults(func=run_import_captions)

    edits = actions.add_parser("import-edits", help="an InstructPix2Pix-style folder or table → editing shards")
    edits.add_argument("source")
    edits.add_argument("output")
    edits.set_defaults(func=run_import_edits)

    precompute = actions.add_parser(
        "precompute", help="a stage's CLIP-teacher outputs (--stage 2) or VAE latents (--stage 3) beside its shards")
    precompute.add_argument("--stage", type=int, choices=[2, 3], default=3)
    precompute.add_argument("--preset", default="tiny", help="the stage's preset (tiny, mini, paper)")
    precompute.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                            help="stage config override, as for the stage job (repeatable)")
    precompute.add_argument("--force", action="store_true", help="compute again even where a complete set exists")
    precompute.add_argument("--workers", type=int, default=1, help="encoder actors (one GPU each when present)")
    precompute.set_defaults(func=run_precompute)


def run_samples(args: argparse.Namespace) -> int:
    from kosmos_g.platform.data.samples import write_sample_shards

    prefixes = write_sample_shards(args.output or f"{default_root()}/samples")
    print(json.dumps(prefixes, indent=2))
    return 0


def run_world(args: argparse.Namespace) -> int:
    from kosmos_g.platform.data.world import write_world_shards

    if args.n < 1:
        print("error: --n must be at least 1")
        return 2
    from kosmos_g.platform.train.config import world_root

    print(json.dumps(write_world_shards(args.out or world_root(), args.seed, args.n), indent=2))
    return 0


def world_colours() -> tuple[str, ...]:
    from kosmos_g.platform.data.world import COLOURS

    return COLOURS


def world_shapes() -> tuple[str, ...]:
    from kosmos_g.platform.data.world import SHAPES

    return SHAPES


def run_subject(args: argparse.Namespace) -> int:
    from kosmos_g.platform.data.world import COLOURS, held_out_background
    from kosmos_g.platform.evaluation.world import Subject, subject_image

    background = args.on or next(c for c in COLOURS if c not in (args.colour, held_out_background(args.colour)))
    if background == args.colour:
        print(f"error: a {args.colour} subject on a {background} background would be invisible")
        return 2
    subject_image(Subject(args.colour, args.shape, background), args.seed).save(args.output)
    print(f"{args.output}: a {args.colour} {args.shape} on {background}")
    return 0


def run_import_captions(args: argparse.Namespace) -> int:
    from kosmos_g.platform.stack import cluster
    from kosmos_g.platform.data.importers import import_captions

    cluster.connect()
    result = import_captions(args.table, args.output, image_column=args.image_column,
                             caption_column=args.caption_column)
    print(result)
    return 0


def run_import_edits(args: argparse.Namespace) -> int:
    from kosmos_g.platform.stack import cluster
    from kosmos_g.platform.data.importers import import_instructpix2pix

    cluster.connect()
    print(import_instructpix2pix(args.source, args.output))
    return 0


def run_precompute(args: argparse.Namespace) -> int:
    from kosmos_g.pipelines.precompute import main

    argv = ["--stage", str(args.stage), "--preset", args.preset, "--workers", str(args.workers)]
    argv += [arg for override in args.overrides for arg in ("--set", override)]
    return main(argv + (["--force"] if args.force else []))
