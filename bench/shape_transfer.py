"""Where the image-prompted model loses a subject's shape, on the world evaluation's held-out
single-subject cases: per asked shape, how often the stage-3 model draws it from the subject image
and how often its frozen mini decoder draws it when told the case in words; what the model draws
instead; and the two paired case by case (is the model right where the decoder is, or at random?).

    kosmos-g local up && eval "$(kosmos-g local env)"
    .venv/bin/python bench/shape_transfer.py                          # models:/kosmos-g/latest
    .venv/bin/python bench/shape_transfer.py --model models:/kosmos-g/2 --images s3://…/kosmos-g-2
    .venv/bin/python bench/shape_transfer.py --decoder-only models:/kosmos-g-mini-decoder/1

Without `--images` it runs the world evaluation first (`pipelines/evaluate.py --preset world`, as
bench/reproduce_mini.py does, so its images are reused when they exist); `--images` reads an
evaluation's generated images (the `out` its last line prints). The decoder is the one the model's
stage-3 run trained through, sampled as bench/mini_sweep.py's ceiling is (DDIM 25 steps, guidance 4);
`--decoder-only` reads a mini decoder alone, before any Kosmos-G model is trained on it.
Prints markdown tables and logs them, with the numbers, to an MLflow run of the `bench` experiment.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def model_shapes(images: str, singles: int) -> dict[str, str]:
    """{case key: drawn shape} of the single-subject cases an evaluation drew under `images`."""
    from kosmos_g.pipelines.generate import done_keys, image_uri
    from kosmos_g.platform.evaluation import world as world_eval
    from kosmos_g.platform.evaluation.grid import open_image

    written = done_keys(images)
    return {case.key: world_eval.read_case(case, open_image(image_uri(images, case.key))).drawn_shape
            for case in world_eval.cases(singles, 0) if case.kind == "single" and case.key in written}


def decoder_readings(decoder_uri: str, singles: int, threads: int = 2) -> tuple[dict[str, float], dict[str, dict]]:
    """One load of a mini decoder, read two ways on the evaluation's cases: (world metrics of the
    decoder told the cases in words, {"the decoder in words": {single case key: drawn shape},
    "its VAE on the answer": {…}}). The second source is each case's answer
    (`world.answer_scene`, prepared as the decoder job prepares its scenes) through the VAE alone:
    the shapes its autoencoder keeps, a cap on anything drawn through it."""
    import mini_sweep
    import torch
    from PIL import Image

    from kosmos_g.models.images import vae_preprocess
    from kosmos_g.platform.evaluation import world as world_eval

    torch.set_num_threads(threads)
    decoder = mini_sweep.load_decoder(decoder_uri)
    pictures = mini_sweep.case_pictures(decoder, singles)
    readings = [(case, world_eval.read_case(case, picture)) for case, picture in pictures]
    metrics = world_eval.summarise([{"kind": case.kind, "prompt": case.prompt, **reading.hits}
                                    for case, reading in readings])
    in_words = {case.key: reading.drawn_shape for case, reading in readings if case.kind == "single"}
    vae = decoder[1]
    cases = [case for case in world_eval.cases(singles, 0) if case.kind == "single"]
    pixels = torch.stack([vae_preprocess(world_eval.answer_scene(case).render(), vae.config.sample_size)
                          for case in cases])
    with torch.no_grad():
        rebuilt = vae.decode(mini_sweep.encode_latents(vae, pixels)).sample.clamp(-1, 1)
    through_vae = {case.key: world_eval.read_case(case, Image.fromarray(mini_sweep.to_uint8(image))).drawn_shape
                   for case, image in zip(cases, rebuilt)}
    return metrics, {"the decoder in words": in_words, "its VAE on the answer": through_vae}


def report(drawn: dict[str, dict[str, str]], singles: int) -> tuple[dict[str, float], list[str]]:
    """(`world.shape_breakdown` numbers, markdown lines) of each source's {case key: drawn shape},
    the first paired with the second when there are two."""
    from kosmos_g.platform.evaluation import world as world_eval

    breakdown = world_eval.shape_breakdown(world_eval.cases(singles, 0), drawn)
    return breakdown, world_eval.shape_report(breakdown, list(drawn))


def evaluate(model_uri: str, singles: int) -> str:
    """The world evaluation's single-subject cases for the model (`pipelines/evaluate.py`, which
    keeps images it drew before); where its images are."""
    from reproduce_mini import submit

    return submit("evaluate_shapes", "pipelines/evaluate.py", [
        "--preset", "world", "--model", model_uri, "--set", f"singles={singles}", "--set", "pairs=0"])["out"]


def decoder_of(model_uri: str) -> str:
    """The decoder URI the model's training run was given (`model.image_decoder.pretrained_path`)."""
    from kosmos_g.platform import tracking

    name, version = tracking.pin_model_uri(model_uri).removeprefix("models:/").split("/")
    run = tracking.client().get_run(tracking.client().get_model_version(name, version).run_id)
    return run.data.params.get("model.image_decoder.pretrained_path", "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models:/kosmos-g/latest")
    parser.add_argument("--singles", type=int, default=200)
    parser.add_argument("--images", help="an evaluation's generated images (skip the evaluation)")
    parser.add_argument("--decoder-only", metavar="URI", help="no Kosmos-G model: this mini decoder told the cases "
                                                              "in words, alone (e.g. models:/kosmos-g-mini-decoder/1)")
    args = parser.parse_args(argv)
    from reproduce_mini import stack_env_missing

    if stack_env_missing():
        return 2
    from kosmos_g.platform import tracking

    if args.decoder_only:  # the decoder alone: where it loses shapes told in words
        model_uri = decoder_uri = tracking.pin_model_uri(args.decoder_only)
        drawn, images = decoder_readings(decoder_uri, args.singles)[1], None
    else:
        model_uri = tracking.pin_model_uri(args.model)
        images = args.images or evaluate(model_uri, args.singles)
        model = model_shapes(images, args.singles)
        if not model:
            print(f"error: no generated single-subject case under {images}", file=sys.stderr)
            return 1
        decoder_uri = decoder_of(model_uri)
        drawn = {"full": model}
        if decoder_uri.startswith("models:/"):
            drawn.update(decoder_readings(decoder_uri, args.singles)[1])
    breakdown, lines = report(drawn, args.singles)
    sources = [f"`{model_uri}` (images {images})"] if images else []
    if "the decoder in words" in drawn:
        sources += [f"the decoder `{decoder_uri}` told the cases in words", "its VAE on each case's answer"]
    text = "\n".join([f"Held-out single-subject shapes ({len(next(iter(drawn.values())))} cases): " + "; ".join(sources)
                      + ".", "", *lines])
    print(text, flush=True)
    run_id, _ = tracking.start_run("bench", f"shape-transfer-{time.strftime('%Y%m%d-%H%M%S')}",
                                   tags={"model": model_uri})
    tracking.log_metrics(run_id, {k.replace(" ", "_"): v for k, v in breakdown.items() if v == v}, 0)
    tracking.log_text(run_id, text, "shape_transfer.md")
    tracking.end_run(run_id)
    print(f"[shape_transfer] MLflow run {run_id}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
