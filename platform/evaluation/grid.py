"""A picture of what an evaluation generated: one row per prompt, its reference images (if
any) then its generated image, the prompt written under them. Logged to MLflow beside the
numbers, so a score can be checked by eye."""

from __future__ import annotations

import io
import textwrap
from typing import Sequence

from PIL import Image, ImageDraw

CELL = 128
TEXT_HEIGHT = 34


def _cell(image: Image.Image) -> Image.Image:
    return image.convert("RGB").resize((CELL, CELL), Image.BICUBIC)


def prompt_grid(rows: Sequence[dict], max_references: int = 1) -> Image.Image:
    """rows: {"text": prompt, "references": [PIL images], "generated": PIL image}."""
    if not rows:
        raise ValueError("no rows to draw")
    columns = max_references + 1
    grid = Image.new("RGB", (columns * CELL, len(rows) * (CELL + TEXT_HEIGHT)), "white")
    draw = ImageDraw.Draw(grid)
    for r, row in enumerate(rows):
        top = r * (CELL + TEXT_HEIGHT)
        references = list(row.get("references") or [])[:max_references]
        for c, reference in enumerate(references):
            grid.paste(_cell(reference), (c * CELL, top))
        grid.paste(_cell(row["generated"]), (max_references * CELL, top))
        lines = textwrap.wrap(str(row["text"]), width=columns * CELL // 6)[:2]
        draw.text((4, top + CELL + 2), "\n".join(lines), fill="black")
    return grid


def open_image(uri: str) -> Image.Image:
    from kosmos_g.platform import storage

    return Image.open(io.BytesIO(storage.read_bytes(uri))).convert("RGB")
