"""AlignerNet M (source -> 77 x D condition) and N (back to the source length), and its losses."""

from __future__ import annotations

import pytest
import torch

from kosmos_g.models.aligner import AlignerNet
from kosmos_g.models.config import AlignerConfig

SRC, D, L_COND = 48, 32, 77


@pytest.fixture(scope="module")
def aligner() -> AlignerNet:
    torch.manual_seed(0)
    cfg = AlignerConfig(dim=D, num_layers=2, num_heads=4, ffn_dim=64, max_source_length=64, dropout=0.0)
    return AlignerNet(cfg, source_dim=SRC, condition_length=L_COND).eval()


@pytest.mark.parametrize("length", [1, 9, 64])
def test_shapes_for_any_source_length(aligner, length):
    source = torch.randn(2, length, SRC)
    mask = torch.ones(2, length, dtype=torch.bool)
    cond = aligner.encode(source, mask)
    assert cond.shape == (2, L_COND, D)
    assert aligner.reconstruct(cond, mask).shape == (2, length, SRC)


def test_source_longer_than_positions_is_an_error(aligner):
    with pytest.raises(ValueError, match="learned positions"):
        aligner.encode(torch.randn(1, 65, SRC), torch.ones(1, 65, dtype=torch.bool))


def test_padding_is_ignored(aligner):
    source = torch.randn(1, 5, SRC)
    padded = torch.cat([source, torch.randn(1, 3, SRC) * 100], dim=1)
    mask = torch.tensor([[True] * 5 + [False] * 3])
    with torch.no_grad():
        alone = aligner.encode(source, torch.ones(1, 5, dtype=torch.bool))
        with_pad = aligner.encode(padded, mask)
        assert torch.allclose(alone, with_pad, atol=1e-5)
        rebuilt_alone = aligner.reconstruct(alone, torch.ones(1, 5, dtype=torch.bool))
        rebuilt_pad = aligner.reconstruct(with_pad, mask)
        assert torch.allclose(rebuilt_alone, rebuilt_pad[:, :5], atol=1e-5)
        # Garbage in padded source positions never reaches the reconstruction loss.
        target = torch.randn(1, L_COND, D)
        loss_a = aligner.losses(padded, mask, target)
        loss_b = aligner.losses(torch.cat([source, torch.zeros(1, 3, SRC)], dim=1), mask, target)
    assert torch.allclose(loss_a["rec"], loss_b["rec"], atol=1e-5)
    assert torch.allclose(loss_a["mse"], loss_b["mse"], atol=1e-6)


def test_losses_match_their_definition(aligner):
    source, target = torch.randn(2, 6, SRC), torch.randn(2, L_COND, D)
    mask = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    with torch.no_grad():
        out = aligner.losses(source, mask, target)
        cond = aligner.encode(source, mask)
        rebuilt = aligner.reconstruct(cond, mask)
    assert set(out) == {"loss", "mse", "rec"}
    assert torch.allclose(out["mse"], ((cond - target) ** 2).mean())
    expected_rec = torch.cat([((rebuilt[0] - source[0]) ** 2).mean(-1), ((rebuilt[1, :4] - source[1, :4]) ** 2).mean(-1)]).mean()
    assert torch.allclose(out["rec"], expected_rec, atol=1e-6)
    assert torch.allclose(out["loss"], out["mse"] + out["rec"])


def test_training_reduces_both_losses():
    torch.manual_seed(0)
    cfg = AlignerConfig(dim=D, num_layers=1, num_heads=4, ffn_dim=64, max_source_length=16, dropout=0.0)
    net = AlignerNet(cfg, SRC, L_COND)
    source, target = torch.randn(4, 10, SRC), torch.randn(4, L_COND, D)
    mask = torch.ones(4, 10, dtype=torch.bool)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    first = net.losses(source, mask, target)
    for _ in range(60):
        out = net.losses(source, mask, target)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    assert out["mse"] < first["mse"] * 0.8 and out["rec"] < first["rec"] * 0.8
