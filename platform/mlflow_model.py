"""Registered versions are real MLflow models: a `pyfunc` flavour wrapping our bundle.

    model = mlflow.pyfunc.load_model("models:/kosmos-g@current")
    images = model.predict(pd.DataFrame({"prompt": ["a photo of <image> on the beach"],
                                         "images": [[base64_png]]}))["image"]   # base64 PNGs

The safetensors bundle (config.json, weights, the decoder in diffusers layout) is the model's
artifact `bundle`, so serving and training keep loading it directly
(`tracking.resolve_artifacts` returns that folder for a `models:/` URI). `kosmos_g` itself must
be installed where the model is loaded (as on every Ray node); the requirements pin the rest.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

import mlflow.pyfunc

from kosmos_g.platform.tracking import BUNDLE_ARTIFACT
# Optional per-row sampler fields and their defaults (the demo's, at a CPU-friendly size).
SAMPLER_FIELDS = {"negative_prompt": None, "steps": 20, "guidance_scale": 6.0, "scheduler": "dpm++",
                  "seed": None, "height": None, "width": None}
PINNED_REQUIREMENTS = ["torch==2.13.0", "diffusers==0.42.1", "transformers==5.23.0", "safetensors==0.8.0",
                       "sentencepiece", "mistral-common", "pillow", "pandas", "mlflow==3.17.2"]


def _image(value: str):
    """A base64 PNG/JPEG, or a URI/path (local, file:// or s3://)."""
    from PIL import Image

    from kosmos_g.platform import storage

    if not isinstance(value, str) or not value:
        raise ValueError("each image must be a base64 string or a URI")
    if "://" in value or value.startswith("/"):
        data = storage.read_bytes(value)
    else:
        try:
            data = base64.b64decode(value, validate=True)
        except ValueError:
            raise ValueError("an image is neither base64 nor a URI") from None
    return Image.open(io.BytesIO(data)).convert("RGB")


def _png_base64(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


class KosmosGModel(mlflow.pyfunc.PythonModel):
    """prompt (interleaved, `<image>`/`<i>` slots) + images -> one generated image per row."""

    def load_context(self, context) -> None:
        from kosmos_g.platform.weights import load_bundle

        self.model = load_bundle(context.artifacts[BUNDLE_ARTIFACT]).eval()

    def predict(self, context, model_input, params: dict[str, Any] | None = None):
        import math

        import pandas as pd

        from kosmos_g.models.generation import generate
        from kosmos_g.models.prompt import parse_prompt

        rows = model_input.to_dict(orient="records") if hasattr(model_input, "to_dict") else list(model_input)
        outputs = []
        for row in rows:
            images = row.get("images")
            images = [] if images is None or (isinstance(images, float) and math.isnan(images)) else list(images)
            sampler = {key: row.get(key, default) for key, default in SAMPLER_FIELDS.items()}
            sampler = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in sampler.items()}
            prompt = parse_prompt(str(row["prompt"]), [_image(value) for value in images])
            generated = generate(
                self.model, [prompt], negative_prompt=sampler["negative_prompt"], steps=int(sampler["steps"]),
                guidance_scale=float(sampler["guidance_scale"]), scheduler=str(sampler["scheduler"]),
                seed=None if sampler["seed"] is None else int(sampler["seed"]),
                height=None if sampler["height"] is None else int(sampler["height"]),
                width=None if sampler["width"] is None else int(sampler["width"]),
            )[0]
            outputs.append(_png_base64(generated))
        return pd.DataFrame({"image": outputs})


def input_example():
    import pandas as pd
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (220, 40, 40)).save(buffer, format="PNG")
    return pd.DataFrame({"prompt": ["<image> on a green background"],
                         "images": [[base64.b64encode(buffer.getvalue()).decode("ascii")]],
                         "steps": [2], "seed": [0]})


def signature():
    """prompt (required), images (list of base64 PNG or URIs) and the sampler fields (optional)."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, DataType, Schema

    inputs = Schema([
        ColSpec(DataType.string, "prompt"),
        ColSpec(Array(DataType.string), "images", required=False),
        ColSpec(DataType.string, "negative_prompt", required=False),
        ColSpec(DataType.long, "steps", required=False),
        ColSpec(DataType.double, "guidance_scale", required=False),
        ColSpec(DataType.string, "scheduler", required=False),
        ColSpec(DataType.long, "seed", required=False),
        ColSpec(DataType.long, "height", required=False),
        ColSpec(DataType.long, "width", required=False),
    ])
    return ModelSignature(inputs=inputs, outputs=Schema([ColSpec(DataType.string, "image")]))


def save_pyfunc(bundle: str | Path, path: str | Path) -> Path:
    """Write an MLflow model folder at `path` whose artifact `bundle` is a copy of `bundle`."""
    example = input_example()
    mlflow.pyfunc.save_model(
        path=str(path), python_model=KosmosGModel(), artifacts={BUNDLE_ARTIFACT: str(bundle)},
        signature=signature(), input_example=example, pip_requirements=PINNED_REQUIREMENTS,
    )
    return Path(path)
