"""bench/text_roles.py: its cases are the world's held-out and seen pairings, its swaps exchange
the two colours' roles, and its readings are CLIP's own similarities."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from kosmos_g.platform.data import world

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import text_roles  # noqa: E402


def test_cases_are_the_held_out_and_seen_pairings_and_swaps_exchange_roles():
    held, seen = text_roles.role_cases("held"), text_roles.role_cases("seen")
    assert len(held) == 8 * 4 and len(seen) == 8 * 4 * 6  # colour x shape (x the six seen backgrounds)
    assert all(case.background == world.held_out_background(case.colour) for case in held)
    assert all(case.background not in (case.colour, world.held_out_background(case.colour)) for case in seen)
    case = text_roles.RoleCase("orange", "triangle", "red")
    assert case.caption == "a orange triangle on a red background"
    assert case.swapped.caption == "a red triangle on a orange background"
    assert case.swapped.swapped == case


def test_readings_are_clips_own_similarities(clip_dir, capsys):
    from transformers import CLIPModel, CLIPTokenizer

    from kosmos_g.models.images import clip_preprocess

    clip, tokenizer = CLIPModel.from_pretrained(clip_dir).eval(), CLIPTokenizer.from_pretrained(clip_dir)
    cases = text_roles.role_cases("held")[:6]
    readings = text_roles.readings(clip, tokenizer, cases)
    for index, case in enumerate(cases):
        tokens = tokenizer([case.caption, case.swapped.caption], padding="max_length", max_length=77,
                           return_tensors="pt")
        with torch.no_grad():
            logits = clip(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask,
                          pixel_values=clip_preprocess(case.scene().render(), 32)[None]).logits_per_image[0]
        assert readings["prefers"][index].item() == float(logits[0] > logits[1])
    assert torch.all(readings["text_cos"] <= 1.0001) and torch.all(readings["condition_cos"] <= 1.0001)

    assert text_roles.main(["--clip", clip_dir]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert len(rows) == 1 + 8 + 2  # header, the eight held-out pairings, all held out, seen
    assert rows[-2].startswith("| **every held-out pairing** | 32 |") and rows[-1].startswith("| **seen pairings** | 192 |")
