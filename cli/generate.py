"""`kosmos-g generate`: ask a running `kosmos-g serve` for images.

    kosmos-g generate "a photo of <image> on the beach" --image dog.png -o out.png
    kosmos-g generate "<i> wearing <i>" --image dog.png --image hat.png -n 4 -o dog.png  # dog-0.png ...
    kosmos-g generate --batch prompts.jsonl --out DIR [--model models:/kosmos-g@current]  # offline, Ray Data
"""

from __future__ import annotations

import argparse
import base64
import json
import mimetypes
import os
import sys
from pathlib import Path

DEFAULT_URL = "http://127.0.0.1:8000"


def register(subparsers) -> None:
    parser = subparsers.add_parser("generate", help="generate images with a running kosmos-g server",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prompt", nargs="?", help="text with one <image> (or <i>) placeholder per --image")
    parser.add_argument("--batch", metavar="TABLE", default=None,
                        help="a JSONL/Parquet prompt table: generate offline with pipelines/generate.py")
    parser.add_argument("--out", default=None, help="with --batch: output prefix (local or s3://)")
    parser.add_argument("--model", default="models:/kosmos-g@current", help="with --batch: model URI")
    parser.add_argument("--image", action="append", default=[], metavar="FILE",
                        help="image for the next placeholder (repeatable, in order)")
    parser.add_argument("-o", "--output", default="out.png",
                        help="PNG to write; with several images NAME-0.png, NAME-1.png, ...")
    parser.add_argument("--url", default=os.environ.get("KOSMOS_SERVE_URL", DEFAULT_URL),
                        help=f"server URL (default $KOSMOS_SERVE_URL or {DEFAULT_URL})")
    parser.add_argument("--api-key", default=os.environ.get("KOSMOS_API_KEY"),
                        help="API key, when the server requires one (default $KOSMOS_API_KEY)")
    parser.add_argument("--negative-prompt", default=None)
    parser.add_argument("-n", "--num-images", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--guidance-scale", type=float, default=None)
    parser.add_argument("--scheduler", default=None, help="dpm++, ddim, euler or ddpm")
    parser.add_argument("--seed", type=int, default=None, help="same seed, same image")
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--control-image", default=None, metavar="FILE", help="ControlNet condition image")
    parser.add_argument("--control-scale", type=float, default=None)
    parser.add_argument("--lora", default=None, help="LoRA adapter name (from the server's adapter prefix)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the server")
    parser.set_defaults(func=run)


def _fields(args: argparse.Namespace) -> dict[str, str]:
    names = ("negative_prompt", "num_images", "steps", "guidance_scale", "scheduler", "seed", "height",
             "width", "control_scale", "lora")
    fields = {"prompt": args.prompt}
    fields.update({name: str(getattr(args, name)) for name in names if getattr(args, name) is not None})
    return fields


def _file(field: str, path: str) -> tuple[str, tuple[str, bytes, str]]:
    data = Path(path).read_bytes()
    mime = mimetypes.guess_type(path)[0] or "application/octet-stream"
    return field, (Path(path).name, data, mime)


def _outputs(output: str, count: int) -> list[Path]:
    path = Path(output)
    if count == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{i}{path.suffix or '.png'}") for i in range(count)]


def run_batch(args: argparse.Namespace) -> int:
    if not args.out:
        print("error: --batch needs --out", file=sys.stderr)
        return 2
    from kosmos_g.pipelines.generate import run as generate_batch

    summary = generate_batch(args.batch, args.out, args.model)
    return 0 if summary["generated"] or summary["already_done"] else 1


def run(args: argparse.Namespace) -> int:
    if args.batch:
        return run_batch(args)
    if not args.prompt:
        print("error: give a prompt, or --batch TABLE --out DIR", file=sys.stderr)
        return 2
    import requests

    try:
        files = [_file("images", path) for path in args.image]
        if args.control_image:
            files.append(_file("control_image", args.control_image))
    except OSError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    one = (args.num_images or 1) == 1
    headers = {"Accept": "image/png" if one else "application/json"}
    if args.api_key:
        headers["X-API-Key"] = args.api_key
    url = args.url.rstrip("/") + "/v1/generate"
    try:
        response = requests.post(url, data=_fields(args), files=files or None, headers=headers,
                                 timeout=args.timeout)
    except requests.RequestException as error:
        print(f"error: cannot reach {url} ({type(error).__name__}); is `kosmos-g serve` running?", file=sys.stderr)
        return 1
    if response.status_code >= 400:
        try:
            detail = response.json().get("detail", response.text)
        except ValueError:
            detail = response.text
        print(f"error {response.status_code}: {detail}", file=sys.stderr)
        return 1
    if response.headers.get("content-type", "").startswith("image/png"):
        images, seed = [response.content], response.headers.get("X-Kosmos-Seed")
        timings = json.loads(response.headers.get("X-Kosmos-Timings", "{}"))
    else:
        body = response.json()
        images = [base64.b64decode(item["png_base64"]) for item in body["images"]]
        seed, timings = body["seed"], body["timings"]
    paths = _outputs(args.output, len(images))
    for path, data in zip(paths, images):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    stages = ", ".join(f"{k[:-2]} {v:.2f}s" for k, v in timings.items() if k != "total_s")
    print(f"wrote {', '.join(map(str, paths))} (seed {seed}; {timings.get('total_s', 0):.2f}s: {stages})",
          file=sys.stderr)
    return 0
