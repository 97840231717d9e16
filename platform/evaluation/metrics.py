"""The scores of the paper's tables, computed as the official release computes them.

- DINO: CLS embedding of DINO ViT-S/16 (a transformers `ViTModel` folder); images resized to
  256 (bicubic), centre-cropped to 224, ImageNet mean/std.
- CLIP-I / CLIP-T: CLIP ViT-B/32 (a transformers `CLIPModel` folder) image embeddings against
  the reference image's / the prompt's embedding.
- Each score is 100 x cosine between a generated image and the ONE reference it was generated
  from (not every image of its subject); the reported value is the mean, floored at 0.
- FID: torchmetrics' FrechetInceptionDistance(normalize=True) with the real set resized to 256
  and centre-cropped. The feature network is injected: the release's default (torch-fidelity's
  Inception) needs torchvision, which does not install beside the CPU torch here, so real
  weights come as the FID Inception TorchScript file (`InceptionFeatures`). torchmetrics still
  keeps the statistics and computes the distance.

Backbones load from local folders or `s3://` (made local first); nothing is downloaded.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _to_pil(image) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    return Image.fromarray(np.asarray(image, dtype=np.uint8)).convert("RGB")


def resize_center_crop(image: Image.Image, resize: int, crop: int) -> Image.Image:
    """Short side to `resize` (bicubic), then the central `crop` x `crop` square."""
    w, h = image.size
    scale = resize / min(w, h)
    image = image.resize((max(crop, round(w * scale)), max(crop, round(h * scale))), Image.BICUBIC)
    w, h = image.size
    left, top = (w - crop) // 2, (h - crop) // 2
    return image.crop((left, top, left + crop, top + crop))


def _tensor(images: Sequence, resize: int, crop: int, mean, std) -> torch.Tensor:
    arrays = [np.asarray(resize_center_crop(_to_pil(i), resize, crop), np.float32) / 255.0 for i in images]
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def mean_score(scores: Sequence[float]) -> float:
    """The reported value: mean of per-pair scores, floored at 0 (as released)."""
    return max(float(np.mean(scores)), 0.0) if len(scores) else float("nan")


class DinoScorer:
    """100 x cosine of DINO CLS embeddings, pair by pair."""

    def __init__(self, path: str, device: str = "cpu"):
        from transformers import ViTModel

        self.model = ViTModel.from_pretrained(path, add_pooling_layer=False).to(device).eval()
        self.size = self.model.config.image_size
        self.device = device

    @torch.no_grad()
    def embed(self, images: Sequence) -> torch.Tensor:
        # Resize 256 / crop 224 at ViT-S/16's size; a smaller test backbone keeps the ratio.
        x = _tensor(images, round(self.size * 256 / 224), self.size, IMAGENET_MEAN, IMAGENET_STD)
        return self.model(pixel_values=x.to(self.device)).last_hidden_state[:, 0].float()

    def pair_scores(self, generated: Sequence, references: Sequence) -> list[float]:
        if len(generated) != len(references):
            raise ValueError(f"{len(generated)} generated images for {len(references)} references")
        a, b = self.embed(generated), self.embed(references)
        return (100 * F.cosine_similarity(a, b, dim=-1)).tolist()


def projected(output) -> torch.Tensor:
    """transformers 5 returns the projected embedding as the output's `pooler_output`."""
    return (output if isinstance(output, torch.Tensor) else output.pooler_output).float()


class ClipScorer:
    """CLIP-I (image vs reference image) and CLIP-T (image vs prompt), pair by pair."""

    def __init__(self, path: str, device: str = "cpu"):
        from transformers import CLIPModel, CLIPTokenizer

        self._use(CLIPModel.from_pretrained(path).to(device).eval(), CLIPTokenizer.from_pretrained(path), device)

    @classmethod
    def of(cls, model, tokenizer, device: str = "cpu") -> "ClipScorer":
        """A scorer on a CLIPModel already in memory (one being trained: its mode is left as it is)."""
        scorer = cls.__new__(cls)
        scorer._use(model, tokenizer, device)
        return scorer

    def _use(self, model, tokenizer, device: str) -> None:
        self.model, self.tokenizer, self.device = model, tokenizer, device
        self.size = model.config.vision_config.image_size

    @torch.no_grad()
    def image_features(self, images: Sequence) -> torch.Tensor:
        from kosmos_g.models.images import CLIP_MEAN, CLIP_STD

        x = _tensor(images, self.size, self.size, CLIP_MEAN, CLIP_STD)
        return F.normalize(projected(self.model.get_image_features(pixel_values=x.to(self.device))), dim=-1)

    @torch.no_grad()
    def text_features(self, texts: Sequence[str]) -> torch.Tensor:
        tokens = self.tokenizer(list(texts), padding=True, truncation=True, max_length=77, return_tensors="pt")
        features = self.model.get_text_features(**{k: v.to(self.device) for k, v in tokens.items()})
        return F.normalize(projected(features), dim=-1)

    def image_scores(self, generated: Sequence, references: Sequence) -> list[float]:
        if len(generated) != len(references):
            raise ValueError(f"{len(generated)} generated images for {len(references)} references")
        return (100 * (self.image_features(generated) * self.image_features(references)).sum(-1)).tolist()

    def text_scores(self, generated: Sequence, prompts: Sequence[str]) -> list[float]:
        if len(generated) != len(prompts):
            raise ValueError(f"{len(generated)} generated images for {len(prompts)} prompts")
        return (100 * (self.image_features(generated) * self.text_features(prompts)).sum(-1)).tolist()


def fid_input(image, real: bool, size: int = 299) -> np.ndarray:
    """One image as the FID network takes it: float (3, size, size) in [0, 1]. Real images are
    first resized to 256 and centre-cropped (as released); generated ones are used whole."""
    pil = _to_pil(image)
    if real:
        pil = resize_center_crop(pil, 256, 256)
    pil = pil.resize((size, size), Image.BICUBIC)
    return (np.asarray(pil, np.float32) / 255.0).transpose(2, 0, 1)


class InceptionFeatures(torch.nn.Module):
    """The FID Inception as a TorchScript file (the `inception-2015-12-05.pt` layout of the
    StyleGAN/clean-fid metrics: `model(x, return_features=True)` with x in [0, 255], returning
    (N, 2048) pool features). Local path; `s3://` is made local by the caller."""

    def __init__(self, path: str):
        super().__init__()
        self.model = torch.jit.load(path, map_location="cpu").eval()

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:  # (N, 3, H, W) in [0, 1]
        return self.model(images * 255.0, return_features=True).reshape(len(images), -1)


class PrecomputedFeatures(torch.nn.Module):
    """Lets torchmetrics' FID take features computed elsewhere (by Ray Data actors): the
    metric keeps the running sums and does the Frechet distance; this passes features through."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def fid_from_features(real: np.ndarray, generated: np.ndarray) -> float:
    """FID of two (N, D) feature sets with torchmetrics' FrechetInceptionDistance."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    if real.shape[1] != generated.shape[1]:
        raise ValueError(f"feature sizes differ: {real.shape[1]} (real) vs {generated.shape[1]} (generated)")
    metric = FrechetInceptionDistance(feature=PrecomputedFeatures(real.shape[1]), normalize=True)
    metric.update(torch.from_numpy(np.asarray(real, np.float64)), real=True)
    metric.update(torch.from_numpy(np.asarray(generated, np.float64)), real=False)
    return float(metric.compute())


def fid(real: Sequence, generated: Sequence, feature: torch.nn.Module, feature_dim_input: int = 299) -> float:
    """FID as released: torchmetrics FrechetInceptionDistance(normalize=True), the real set resized
    to 256 and centre-cropped. `feature` maps (N, 3, H, W) float images in [0, 1] to (N, D)
    features (torchmetrics hands a custom extractor the images as given)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    metric = FrechetInceptionDistance(feature=feature, normalize=True)

    def batch(images, real_set: bool) -> torch.Tensor:
        return torch.from_numpy(np.stack([fid_input(i, real_set, feature_dim_input) for i in images]))

    metric.update(batch(real, True), real=True)
    metric.update(batch(generated, False), real=False)
    return float(metric.compute())
