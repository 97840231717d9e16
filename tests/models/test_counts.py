"""Parameter counts: the paper preset matches the paper, built on the meta device in seconds."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from kosmos_g.models.counts import parameter_counts, preset_parameter_counts


@pytest.fixture(scope="module")
def paper() -> dict:
    return preset_parameter_counts("paper", stage=3)


def within(value: int, reference: float, tolerance: float = 0.10) -> bool:
    return abs(value - reference) <= tolerance * reference


def test_paper_counts_match_the_paper(paper):
    groups, parts = paper["groups"], paper["components"]
    assert within(groups["mllm"]["total"], 1.6e9)  # "about 1.6B" incl. the image encoder
    # AlignerNet's encoder M alone is "approximately 225M" (the released structure: projection,
    # 32,768 learned positions, 12 encoder + 12 query-decoder layers); N mirrors it.
    assert within(parts["aligner.M"]["total"], 225e6, 0.05)
    assert within(parts["aligner.N"]["total"], 250e6, 0.05)
    assert groups["aligner"]["total"] == parts["aligner.M"]["total"] + parts["aligner.N"]["total"]
    assert within(parts["mllm.vision"]["total"], 303e6, 0.01)  # CLIP ViT-L/14 vision tower
    # Stable Diffusion v1.5's components, exact sizes.
    assert parts["image_decoder.unet"]["total"] == 859_520_964
    assert parts["image_decoder.vae"]["total"] == 83_653_863
    assert parts["image_decoder.text_encoder"]["total"] == 123_060_480


def test_stage3_split_of_trainable_and_frozen(paper):
    parts = paper["components"]
    vision = parts["mllm.vision"]
    # Only the last ViT-L block (12.6M) and the final norm train.
    assert vision["trainable"] == 12_596_224 + 2_048
    assert parts["mllm.decoder"]["frozen"] == 0 and parts["aligner.M"]["frozen"] == 0
    assert parts["aligner.N"]["trainable"] == 0
    assert paper["groups"]["image_decoder"]["trainable"] == 0
    total = paper["total"]
    assert total["trainable"] + total["frozen"] == total["total"]


def test_stage_changes_what_counts_as_trainable():
    stage2 = preset_parameter_counts("tiny", stage=2)
    assert stage2["groups"]["mllm"]["trainable"] == 0
    assert stage2["groups"]["aligner"]["frozen"] == 0


def test_paper_model_is_never_allocated():
    from kosmos_g.models.config import model_preset
    from kosmos_g.models.kosmos_g import KosmosG

    model = KosmosG.from_config(model_preset("paper"), device="meta")
    assert all(p.is_meta for p in model.parameters())
    assert parameter_counts(model)["total"]["total"] > 2.8e9


def test_cli_prints_paper_counts_as_json_quickly():
    start = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "kosmos_g.cli.main", "models", "--preset", "paper", "--json"],
                         capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - start
    assert out.returncode == 0, out.stderr
    counts = json.loads(out.stdout)
    assert counts["preset"] == "paper" and within(counts["groups"]["mllm"]["total"], 1.6e9)
    assert within(counts["components"]["aligner.M"]["total"], 225e6, 0.05)
    assert "aligner.N" in counts["components"]
    assert elapsed < 60  # seconds (typically ~5 s; generous for a shared CPU)


def test_cli_table_and_bad_preset(capsys):
    from kosmos_g.cli.main import main

    assert main(["models", "--preset", "tiny"]) == 0
    table = capsys.readouterr().out
    assert "image_decoder.unet" in table and "trainable" in table
    assert main(["models", "--preset", "huge"]) == 2
    assert "tiny" in capsys.readouterr().out


def test_cli_module_is_import_light():
    code = ("import argparse, sys, kosmos_g.cli.models as m; "
            "m.register(argparse.ArgumentParser().add_subparsers()); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
