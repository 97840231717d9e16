"""Image preprocessing with PIL/numpy/torch only (no torchvision).

Two views of one picture: the CLIP view fed to the MLLM's vision encoder (CLIP mean/std
normalisation) and the VAE view used as the diffusion target (values in [-1, 1]).
Both resize the short side with bicubic filtering and take the centre square.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def is_image(obj: Any) -> bool:
    """True for the image types a prompt may contain (PIL images and numpy arrays)."""
    return isinstance(obj, (Image.Image, np.ndarray))


def to_pil(image: Any) -> Image.Image:
    """RGB PIL image from a PIL image or a uint8 array shaped (H, W), (H, W, 3) or (H, W, 4)."""
    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise TypeError(f"numpy images must be uint8 (got {image.dtype}); scale to 0..255 first")
        if image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (1, 3, 4)):
            array = image[..., 0] if image.ndim == 3 and image.shape[2] == 1 else image
            return Image.fromarray(np.ascontiguousarray(array)).convert("RGB")
        raise ValueError(f"numpy image must be (H, W), (H, W, 1|3|4); got shape {image.shape}")
    raise TypeError(f"expected a PIL image or a uint8 numpy array, got {type(image).__name__}")


def resize_center_crop(image: Any, size: int) -> Image.Image:
    """Resize so the short side is `size` (bicubic), then crop the centre `size`x`size`."""
    pil = to_pil(image)
    w, h = pil.size
    scale = size / min(w, h)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    if (new_w, new_h) != (w, h):
        pil = pil.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return pil.crop((left, top, left + size, top + size))


def _to_unit_tensor(pil: Image.Image) -> torch.Tensor:
    array = np.asarray(pil, dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def clip_preprocess(image: Any, size: int) -> torch.Tensor:
    """(3, size, size) float32, CLIP-normalised: the vision encoder's input."""
    x = _to_unit_tensor(resize_center_crop(image, size))
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    return (x - mean) / std


def vae_preprocess(image: Any, size: int) -> torch.Tensor:
    """(3, size, size) float32 in [-1, 1]: the VAE's input (diffusion target)."""
    return _to_unit_tensor(resize_center_crop(image, size)) * 2.0 - 1.0


def vae_preprocess_batch(images: list[Any], size: int) -> torch.Tensor:
    """(B, 3, size, size) stack of `vae_preprocess`."""
    if not images:
        return torch.zeros(0, 3, size, size)
    return torch.stack([vae_preprocess(image, size) for image in images])


def tensor_to_pil(x: torch.Tensor) -> Image.Image:
    """Inverse of `vae_preprocess` for one (3, H, W) tensor in [-1, 1]."""
    array = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte()
    return Image.fromarray(array.permute(1, 2, 0).cpu().numpy())
