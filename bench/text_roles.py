"""Does a CLIP tell a world caption from its role swap? `a orange triangle on a red background`
against `a red triangle on a orange background`, on the held-out pairings (the subject's colour on
the one background it never appears on in training) and, as a control, on seen ones.

    kosmos-g local up && eval "$(kosmos-g local env)"
    .venv/bin/python bench/text_roles.py                                   # the decoder's text CLIP
    .venv/bin/python bench/text_roles.py --clip models:/kosmos-g-mini-clip/latest

The frozen mini decoder swaps two held-out pairings when told them in words (orange on red comes
out red on orange; docs/REPRODUCTION.md). This says whether its text encoder already confuses them,
or whether what the U-Net reads from it does. For each case, with one object drawn in the middle of
the scene, it prints:

- `image prefers it`: the CLIP's image embedding of the scene is nearer the right caption's text
  embedding than the swap's (its contrastive objective, what it was trained on);
- `text cos`: the cosine of the two captions' text embeddings (1: the encoder cannot tell them);
- `condition cos`: the cosine of the two captions' 77 last hidden states, flattened: the condition
  the decoder's U-Net cross-attends to.

Nothing is trained or generated; a CLIP folder (local path or URI) is read.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

BOX = (18, 18, 46, 46)  # one 28-px object in the middle of the 64-px scene


@dataclass(frozen=True)
class RoleCase:
    colour: str
    shape: str
    background: str

    @property
    def caption(self) -> str:
        return f"a {self.colour} {self.shape} on a {self.background} background"

    @property
    def swapped(self) -> "RoleCase":
        return RoleCase(self.background, self.shape, self.colour)

    def scene(self):
        """The case drawn: its one object in the middle of its background."""
        from kosmos_g.platform.data import world

        return world.Scene(self.background, (world.WorldObject(self.colour, self.shape, BOX),))


def role_cases(split: str) -> list[RoleCase]:
    """`held`: each colour on its held-out background, every shape (32 cases); `seen`: each colour on
    every background it appears on in training, every shape."""
    from kosmos_g.platform.data import world

    cases = []
    for colour in world.COLOURS:
        held = world.held_out_background(colour)
        backgrounds = [held] if split == "held" else [b for b in world.COLOURS if b not in (colour, held)]
        cases += [RoleCase(colour, shape, background) for background in backgrounds for shape in world.SHAPES]
    return cases


@torch.no_grad()
def readings(clip, tokenizer, cases: list[RoleCase]) -> dict[str, torch.Tensor]:
    """Per case: `prefers` (1.0 where the scene's image embedding is nearer the right caption),
    `text_cos` and `condition_cos` of the right caption against its swap."""
    from kosmos_g.models.images import clip_preprocess
    from kosmos_g.models.mini import CONDITION_LENGTH
    from kosmos_g.platform.evaluation.metrics import projected

    size = clip.config.vision_config.image_size
    pixels = torch.stack([clip_preprocess(case.scene().render(), size) for case in cases])
    tokens = tokenizer([c.caption for c in cases] + [c.swapped.caption for c in cases], padding="max_length",
                       max_length=CONDITION_LENGTH, truncation=True, return_tensors="pt")
    image = F.normalize(projected(clip.get_image_features(pixel_values=pixels)), dim=-1)
    text = F.normalize(projected(clip.get_text_features(input_ids=tokens.input_ids,
                                                        attention_mask=tokens.attention_mask)), dim=-1)
    hidden = clip.text_model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).last_hidden_state
    count = len(cases)
    right, swap = text[:count], text[count:]
    return {"prefers": ((image * right).sum(-1) > (image * swap).sum(-1)).float(),
            "text_cos": (right * swap).sum(-1),
            "condition_cos": F.cosine_similarity(hidden[:count].flatten(1), hidden[count:].flatten(1), dim=-1)}


def report(clip, tokenizer) -> list[str]:
    """Markdown: a row per held-out pairing, then all held-out cases and all seen ones."""
    lines = ["| cases | n | image prefers it | text cos | condition cos |", "|---|---|---|---|---|"]

    def row(label: str, values: dict[str, torch.Tensor]) -> str:
        return (f"| {label} | {len(values['prefers'])} | {values['prefers'].mean():.2f} | "
                f"{values['text_cos'].mean():.3f} | {values['condition_cos'].mean():.3f} |")

    held_cases = role_cases("held")
    held = readings(clip, tokenizer, held_cases)
    for colour in dict.fromkeys(case.colour for case in held_cases):
        index = torch.tensor([case.colour == colour for case in held_cases])
        example = next(case for case in held_cases if case.colour == colour)
        lines.append(row(f"held out: {colour} on {example.background}", {k: v[index] for k, v in held.items()}))
    lines.append(row("**every held-out pairing**", held))
    lines.append(row("**seen pairings**", readings(clip, tokenizer, role_cases("seen"))))
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clip", default="models:/kosmos-g-mini-text-clip/latest",
                        help="a CLIPModel folder: local path, storage URI, or models:/ or runs:/ URI")
    args = parser.parse_args(argv)
    from transformers import CLIPModel, CLIPTokenizer

    from kosmos_g.platform import weights

    if args.clip.startswith(weights.REGISTRY_SCHEMES):
        from reproduce_mini import stack_env_missing

        if stack_env_missing():
            return 2
    directory = str(weights.local_dir(args.clip))
    clip = CLIPModel.from_pretrained(directory).eval()
    print(f"{args.clip}: role swaps of world captions (one object in the middle of each scene)\n")
    print("\n".join(report(clip, CLIPTokenizer.from_pretrained(directory))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
