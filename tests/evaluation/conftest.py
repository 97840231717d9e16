"""Small random DINO ViT and CLIP backbones saved in their usual transformers layouts."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def dino_dir(tmp_path_factory) -> str:
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("dino")
    ViTModel(ViTConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
                       image_size=32, patch_size=8), add_pooling_layer=False).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def clip_dir(tmp_path_factory) -> str:
    from transformers import CLIPConfig, CLIPModel

    from kosmos_g.models.tokenizers import build_clip_tokenizer

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("clip")
    CLIPModel(CLIPConfig(
        text_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37),
        vision_config=dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
                           image_size=32, patch_size=8),
        projection_dim=24,
    )).save_pretrained(path)
    build_clip_tokenizer().save_pretrained(path)
    return str(path)


class _TinyInception(torch.nn.Module):
    """The calling convention of the FID Inception TorchScript file: model(x, return_features=True)
    with x in [0, 255], (N, D) features out. Random and small, D = 16."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 16, kernel_size=7, stride=4)

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        features = torch.relu(self.conv(x / 255.0 - 0.5)).mean(dim=(2, 3))
        return features if return_features else features.softmax(-1)


@pytest.fixture(scope="session")
def inception_file(tmp_path_factory) -> str:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("inception") / "inception-2015-12-05.pt"
    torch.jit.save(torch.jit.script(_TinyInception()), str(path))
    return str(path)
