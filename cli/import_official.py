"""`kosmos-g import official`: the released Kosmos-G checkpoint as a bundle (and a registered version).

    kosmos-g import official --checkpoint checkpoint_final.pt --clip ViT-L-14-sd.pt \\
        --vocab-dir DIR --sd s3://weights/stable-diffusion-v1-5 --output kosmos-g-official [--register]

Each path may be local or `s3://`. The bundle holds the converted MLLM and AlignerNet
(safetensors) with the vocabulary files; the frozen SD v1.5 decoder stays where `--sd` points
(so give a URI that the serving machines can read when registering).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("import", help="convert released checkpoints into this platform's bundles")
    kinds = parser.add_subparsers(dest="kind", metavar="KIND", required=True)
    official = kinds.add_parser(
        "official", help="the official fairseq checkpoint (xichenpan/Kosmos-G)",
        description="Convert the released checkpoint (torchscale decoder, XConnector resampler, AlignerNet, "
                    "open_clip ViT-L/14) into a bundle; unknown or missing tensors are an error that lists them.",
    )
    official.add_argument("--checkpoint", required=True, help="checkpoint_final.pt (or a stage-1/2 checkpoint)")
    official.add_argument("--clip", help="open_clip ViT-L-14 file (ViT-L-14-sd.pt) for CLIP tensors the "
                                         "checkpoint lacks")
    official.add_argument("--vocab-dir", help="folder with sentencepiece.bpe.model + dict.txt "
                                              "(default: the base preset's tokenizer)")
    official.add_argument("--sd", required=True, help="Stable Diffusion v1.5 in diffusers layout")
    official.add_argument("--output", default="kosmos-g-official", help="bundle folder to write")
    official.add_argument("--preset", default="paper", help="base config for what shapes cannot tell (heads)")
    official.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                          help="model config override applied after conversion, e.g. aligner.num_heads=12")
    official.add_argument("--register", action="store_true", help="log to MLflow and register the bundle")
    official.add_argument("--name", default="kosmos-g", help="registered model name (default: kosmos-g)")
    official.set_defaults(func=run)


def _parse_overrides(items: list[str]) -> dict[str, str]:
    pairs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set expects KEY=VALUE, got {item!r}")
        pairs[key] = value
    return pairs


def convert_bundle(args: argparse.Namespace) -> tuple[Path, dict]:
    """Convert, load strictly, check one forward pass, save the bundle; returns (bundle, summary)."""
    import torch

    from kosmos_g.models.checkpoint import CONFIG_NAME, save_trainable
    from kosmos_g.models.config import apply_overrides, model_preset
    from kosmos_g.models.official import convert, load_converted, read_checkpoint, read_clip
    from kosmos_g.platform.weights import local_file, localize

    state, train_args = read_checkpoint(local_file(args.checkpoint))
    clip = read_clip(local_file(args.clip)) if args.clip else None
    print(f"[import] {len(state)} tensors in {args.checkpoint}" + (f", {len(clip)} in {args.clip}" if clip else ""),
          flush=True)
    base = model_preset(args.preset)
    if args.vocab_dir:
        base.tokenizer.kind, base.tokenizer.vocab_dir = "official", args.vocab_dir
    base.image_decoder.pretrained_path = args.sd
    converted = convert(state, clip, base, train_args)
    converted.config = apply_overrides(converted.config, _parse_overrides(args.overrides))
    requested = converted.config
    converted.config = localize(requested)
    model = load_converted(converted).eval()
    with torch.no_grad():  # the converted model runs: a text-only condition of the U-Net's shape
        condition = model.encode_prompts(["a photo of a dog"])
    bundle = save_trainable(model, args.output)
    config = json.loads((bundle / CONFIG_NAME).read_text())
    config["image_decoder"]["pretrained_path"] = requested.image_decoder.pretrained_path  # the URI as given
    (bundle / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    summary = {"checkpoint": args.checkpoint, "tensors": len(converted.state),
               "ignored": converted.ignored, "initialised": len(converted.initialised),
               "condition_shape": list(condition.shape)}
    return bundle, summary


def register_bundle(bundle: Path, args: argparse.Namespace, summary: dict) -> str:
    from kosmos_g.platform import tracking
    from kosmos_g.platform.mlflow_model import save_pyfunc

    run_id, _ = tracking.start_run("import", f"official:{args.checkpoint}", tags={"source": "official"})
    try:
        tracking.log_params(run_id, {"checkpoint": args.checkpoint, "clip": args.clip or "", "sd": args.sd,
                                     "vocab_dir": args.vocab_dir or ""})
        tracking.log_text(run_id, json.dumps(summary, indent=2), "import_summary.json")
        with tempfile.TemporaryDirectory(prefix="kosmos-import-") as staging:
            tracking.log_dir(run_id, save_pyfunc(bundle, Path(staging) / "model"), "model")
        tags = {"source": "official", "checkpoint": args.checkpoint, "preset": args.preset,
                "git_commit": tracking.git_commit()}
        description = (f"Released Kosmos-G weights imported from {args.checkpoint} (SD decoder {args.sd}); "
                       f"{summary['tensors']} tensors converted.")
        version = tracking.register_model(run_id, "model", args.name, tags=tags, description=description)
    except BaseException:
        tracking.end_run(run_id, "FAILED")
        raise
    tracking.end_run(run_id)
    return f"{args.name}/{version}"


def run(args: argparse.Namespace) -> int:
    from kosmos_g.models.official import OfficialCheckpointError

    try:
        bundle, summary = convert_bundle(args)
    except (OfficialCheckpointError, ValueError) as error:  # layout gaps, vocabulary/config mismatches
        print(f"import failed: {error}")
        return 1
    for reason, count in summary["ignored"].items():
        print(f"[import] left out {count} tensors: {reason}")
    if summary["initialised"]:
        print(f"[import] {summary['initialised']} AlignerNet N tensors are not in this checkpoint (N is only "
              "used by stage 2) and keep their initialisation")
    print(f"[import] bundle written to {bundle} ({summary['tensors']} tensors; condition "
          f"{tuple(summary['condition_shape'])})")
    if args.register:
        print(f"[import] registered {register_bundle(bundle, args, summary)} (tag source=official)")
    return 0
