"""A small random FID Inception saved as TorchScript (DINO and CLIP backbones: tests/conftest.py)."""

from __future__ import annotations

import pytest
import torch


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
