"""A small grid of sample generations from a servable bundle, logged by stage 3
so every registered model comes with a look at what it does."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

# Prompts with and without images; the photographs ship with scikit-image.
SAMPLE_PROMPTS = [
    ("a photo of a cat sitting on a sofa", []),
    ("a photo of <image> on the beach", ["chelsea"]),
    ("<image> in the style of <image>", ["coffee", "astronaut"]),
    ("a watercolor painting of <image>", ["rocket"]),
]


def _photo(name: str):
    from skimage import data

    return getattr(data, name)()


def sample_grid(bundle_dir: str | Path, steps: int = 10, seed: int = 0, columns: int = 2) -> Image.Image:
    from kosmos_g.models.generation import generate
    from kosmos_g.models.prompt import parse_prompt
    from kosmos_g.platform.weights import load_bundle

    model = load_bundle(bundle_dir).eval()
    size = model.config.image_decoder.image_size
    images = []
    for text, photo_names in SAMPLE_PROMPTS:
        prompt = parse_prompt(text, [_photo(name) for name in photo_names])
        images += generate(model, [prompt], steps=steps, seed=seed, height=size, width=size)
    rows = (len(images) + columns - 1) // columns
    grid = Image.new("RGB", (columns * size, rows * size), "white")
    for index, image in enumerate(images):
        grid.paste(image.convert("RGB").resize((size, size)), ((index % columns) * size, (index // columns) * size))
    return grid
