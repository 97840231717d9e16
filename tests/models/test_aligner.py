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
    cfg = AlignerConfig(dim=D, num_layers=2, encoder_layers=2, num_heads=4, ffn_dim=64, max_source_length=64)
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
    # As released: the reconstruction MSE is scaled by condition_length / L (L = 6 here).
    expected_rec = torch.cat([((rebuilt[0] - source[0]) ** 2).mean(-1), ((rebuilt[1, :4] - source[1, :4]) ** 2).mean(-1)]).mean()
    expected_rec = expected_rec * L_COND / 6
    assert torch.allclose(out["rec"], expected_rec, atol=1e-6)
    assert torch.allclose(out["loss"], out["mse"] + out["rec"])


def test_training_reduces_both_losses():
    torch.manual_seed(0)
    cfg = AlignerConfig(dim=D, num_layers=1, encoder_layers=1, num_heads=4, ffn_dim=64, max_source_length=16)
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


def test_released_structure_encoder_then_query_decoder(aligner):
    """M = projection + positions -> non-causal encoder -> 77-query decoder; N mirrors it."""
    m, n = aligner.encoder, aligner.decoder
    assert m.source.in_proj.in_features == SRC and len(m.source.layers) == 2
    assert all(layer.cross_attn is None for layer in m.source.layers)  # encoder: self-attention only
    assert m.source.final_norm is not None
    assert m.queries.shape == (L_COND, D) and all(layer.cross_attn is not None for layer in m.query.layers)
    # Sub-LN inner norm in self-attention only, as torchscale builds it (no norm in cross-attention).
    assert all(isinstance(layer.self_attn.inner_norm, torch.nn.LayerNorm) for layer in m.query.layers)
    assert all(isinstance(layer.cross_attn.inner_norm, torch.nn.Identity) for layer in m.query.layers)
    assert len(n.target.layers) == 2 and n.target.out_proj.out_features == SRC
    assert n.query.queries.shape[0] == 64  # one learned query per source position


def test_encoder_attends_across_the_source():
    """The encoder is non-causal: changing the last source token changes what the first
    position holds after the encoder stack (a decoder-only M has no such stack)."""
    torch.manual_seed(0)
    cfg = AlignerConfig(dim=D, num_layers=1, encoder_layers=1, num_heads=4, ffn_dim=64, max_source_length=8)
    net = AlignerNet(cfg, SRC, L_COND).eval()
    source = torch.randn(1, 4, SRC)
    changed = source.clone()
    changed[0, -1] += 5.0
    with torch.no_grad():
        first_a = net.encoder.source(source)[0, 0]
        first_b = net.encoder.source(changed)[0, 0]
    assert not torch.allclose(first_a, first_b)


def test_encoder_layers_zero_is_the_decoder_only_ablation():
    torch.manual_seed(0)
    full = AlignerNet(AlignerConfig(dim=D, num_layers=2, encoder_layers=2, num_heads=4, ffn_dim=64,
                                    max_source_length=16), SRC, L_COND)
    ablated = AlignerNet(AlignerConfig(dim=D, num_layers=2, encoder_layers=0, num_heads=4, ffn_dim=64,
                                       max_source_length=16), SRC, L_COND)
    assert len(ablated.encoder.source.layers) == 0 and ablated.encoder.source.final_norm is None
    assert sum(p.numel() for p in ablated.parameters()) < sum(p.numel() for p in full.parameters())
    source, mask = torch.randn(2, 5, SRC), torch.ones(2, 5, dtype=torch.bool)
    out = ablated.losses(source, mask, torch.randn(2, L_COND, D))
    assert out["loss"].isfinite() and ablated.encode(source, mask).shape == (2, L_COND, D)


def test_default_dropout_is_zero():
    assert AlignerConfig().dropout == 0.0
    from kosmos_g.models.config import model_preset

    for name in ("tiny", "paper"):
        assert model_preset(name).aligner.dropout == 0.0
    assert model_preset("paper").aligner.encoder_layers == 12
