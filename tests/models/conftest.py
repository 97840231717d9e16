"""Shared tiny-preset fixtures for the models tests (CPU, seconds)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kosmos_g.models.config import model_preset
from kosmos_g.models.kosmos_g import KosmosG


def make_tiny(**overrides) -> KosmosG:
    torch.manual_seed(0)
    cfg = model_preset("tiny")
    for dotted, value in overrides.items():
        section, key = dotted.split("__")
        setattr(getattr(cfg, section), key, value)
    return KosmosG.from_config(cfg)


@pytest.fixture(scope="session")
def tiny_model() -> KosmosG:
    """One shared tiny model in eval mode; tests that mutate it must use `fresh_tiny`."""
    return make_tiny().eval()


@pytest.fixture
def fresh_tiny() -> KosmosG:
    return make_tiny()


@pytest.fixture(scope="session")
def photos() -> list[np.ndarray]:
    """Real photographs bundled with scikit-image, as uint8 arrays of different sizes."""
    from skimage import data

    return [data.astronaut(), data.chelsea(), data.coffee()]
