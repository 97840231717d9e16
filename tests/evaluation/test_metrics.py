"""DreamBench scores and FID on backbones the tests save in their usual folder layouts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kosmos_g.platform.evaluation import dreambench
from kosmos_g.platform.evaluation.metrics import ClipScorer, DinoScorer, fid, mean_score


@pytest.fixture(scope="module")
def photos() -> list[np.ndarray]:
    from skimage import data

    return [data.astronaut(), data.chelsea(), data.coffee(), data.rocket()]


def test_identical_images_score_100_and_a_shuffled_pairing_lower(photos, dino_dir, clip_dir):
    dino, clip = DinoScorer(dino_dir), ClipScorer(clip_dir)
    for scores in (dino.pair_scores(photos, photos), clip.image_scores(photos, photos)):
        assert np.allclose(scores, 100.0, atol=1e-3)
    shuffled = photos[1:] + photos[:1]
    assert mean_score(dino.pair_scores(photos, shuffled)) < 99.0
    assert mean_score(clip.image_scores(photos, shuffled)) < 99.0


def test_clip_t_compares_with_the_prompt_and_is_floored_at_zero(photos, clip_dir):
    clip = ClipScorer(clip_dir)
    scores = clip.text_scores(photos[:2], ["a photo of a woman", "a photo of a cat"])
    assert len(scores) == 2 and all(-100.0 <= s <= 100.0 for s in scores)
    assert mean_score([-5.0, -1.0]) == 0.0 and mean_score([10.0, 20.0]) == 15.0
    with pytest.raises(ValueError, match="prompts"):
        clip.text_scores(photos[:2], ["one prompt"])


class _TinyFeatures(torch.nn.Module):
    """A fixed random conv net standing in for Inception ([0, 1] floats in, 64 features out)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 5, stride=4), torch.nn.ReLU(),
                                       torch.nn.AdaptiveAvgPool2d(4), torch.nn.Flatten(), torch.nn.Linear(256, 64))

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images.float())


def test_fid_of_a_set_with_itself_is_zero_and_of_a_shifted_set_positive():
    rng = np.random.default_rng(0)
    real = [rng.integers(0, 256, (256, 256, 3), dtype=np.uint8) for _ in range(80)]  # already 256²
    shifted = [np.clip(image.astype(int) + 90, 0, 255).astype(np.uint8) for image in real]
    feature = _TinyFeatures()
    same = fid(real, real, feature, feature_dim_input=64)
    shifted_fid = fid(real, shifted, feature, feature_dim_input=64)
    assert abs(same) < 1e-4 and shifted_fid > 1e-2 and shifted_fid > 100 * abs(same), (same, shifted_fid)


def test_dreambench_protocol_tables():
    assert len(dreambench.SUBJECTS) == 30
    assert dreambench.subject_class("dog2") == ("dog", True)
    cases = dreambench.cases("backpack", ["s3://b/backpack/02.jpg", "s3://b/backpack/00.jpg"])
    assert len(cases) == 50 and cases[0].reference.endswith("00.jpg")  # sorted references
    first = cases[0]
    assert first.kosmos_prompt == "backpack <image> in the jungle" and first.text_prompt == "a backpack in the jungle"
    assert dreambench.cases("cat", ["x.jpg"], drop_class=True)[20].kosmos_prompt.count("<image>") == 1
    with pytest.raises(ValueError, match="unknown DreamBench subject"):
        dreambench.cases("unicorn", ["x.jpg"])


def test_fid_from_features_uses_torchmetrics_statistics():
    from kosmos_g.platform.evaluation.metrics import fid_from_features

    rng = np.random.default_rng(0)
    real = rng.normal(size=(64, 8))
    assert abs(fid_from_features(real, real)) < 1e-6
    shifted = fid_from_features(real, real + 1.0)
    assert abs(shifted - 8.0) < 1e-3  # a mean shift of 1 in each of 8 dims, same covariance
    try:
        fid_from_features(real, real[:, :4])
    except ValueError as error:
        assert "feature sizes differ" in str(error)
    else:
        raise AssertionError("mismatched feature sizes must fail")
