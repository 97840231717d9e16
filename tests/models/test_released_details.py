"""Decoder and conditioning details that released weights depend on (checked against the
formulas of the official torchscale/fairseq code, re-derived here independently)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kosmos_g.models.layers import XPos
from kosmos_g.models.prompt import parse_prompt


def _reference_xpos(x: torch.Tensor, scale_base: int, upscale: bool) -> torch.Tensor:
    """xPos with the released layout: angle i rotates channels (2i, 2i+1); positions centred."""
    length, dim = x.shape[-2], x.shape[-1]
    half = dim // 2
    pos = torch.arange(length, dtype=torch.float32) - length // 2
    inv_freq = 1.0 / (10000 ** (torch.arange(half, dtype=torch.float32) / half))
    zeta = (torch.arange(0, dim, 2, dtype=torch.float32) + 0.4 * dim) / (1.4 * dim)
    scale = zeta[None] ** (pos[:, None] / scale_base)
    scale = scale if upscale else 1 / scale
    angles = pos[:, None] * inv_freq[None]
    sin = (angles.sin() * scale).repeat_interleave(2, dim=-1)
    cos = (angles.cos() * scale).repeat_interleave(2, dim=-1)
    rotated = torch.stack([-x[..., 1::2], x[..., 0::2]], dim=-1).flatten(-2)  # rotate_every_two
    return x * cos + rotated * sin


def test_xpos_rotates_adjacent_channel_pairs():
    torch.manual_seed(0)
    q, k = torch.randn(2, 3, 7, 16), torch.randn(2, 3, 7, 16)
    got_q, got_k = XPos(16, scale_base=512)(q, k)
    assert torch.allclose(got_q, _reference_xpos(q, 512, upscale=True), atol=1e-5)
    assert torch.allclose(got_k, _reference_xpos(k, 512, upscale=False), atol=1e-5)
    # A vector living in channels 0 and 1 stays there (a halves layout would move it to 8).
    only_first_pair = torch.zeros(1, 1, 5, 16)
    only_first_pair[..., 0], only_first_pair[..., 1] = 1.0, 0.5
    out, _ = XPos(16)(only_first_pair, only_first_pair)
    assert out[..., 2:].abs().max() == 0 and out[..., :2].abs().sum() > 0


def test_input_embeddings_are_scaled_by_sqrt_dim(tiny_model):
    decoder = tiny_model.mllm.decoder
    assert decoder.embed_scale == math.sqrt(tiny_model.config.mllm.dim)
    embeds = torch.randn(1, 6, tiny_model.config.mllm.dim)
    mask = torch.ones(1, 6, dtype=torch.bool)
    with torch.no_grad():
        scaled = decoder(embeds, mask)
        decoder.embed_scale = 1.0
        try:
            unscaled = decoder(embeds * math.sqrt(tiny_model.config.mllm.dim), mask)
        finally:
            decoder.embed_scale = math.sqrt(tiny_model.config.mllm.dim)
    assert torch.allclose(scaled, unscaled, atol=1e-5)


def test_condition_is_computed_without_the_closing_eos(tiny_model, photos):
    tok = tiny_model.tokenizer
    prompt = parse_prompt("a photo of <i> on the beach", [photos[0]])
    with_eos = tok([prompt])
    assert with_eos["input_ids"][0, -1] == tok.eos_id
    without_eos = tok.collate([tok.encode(prompt, add_eos=False)])
    with torch.no_grad():
        condition = tiny_model.encode(with_eos)
        hidden = tiny_model.mllm(without_eos["input_ids"], without_eos["attention_mask"],
                                 without_eos["image_mask"], without_eos["pixel_values"]).hidden_states
        expected = tiny_model.aligner.encode(hidden, without_eos["attention_mask"])
    assert torch.allclose(condition, expected, atol=1e-5)


def test_clip_tokens_are_layer_normed_and_l2_normalised_before_the_resampler(tiny_model):
    """As released (ClipVisualOnly.forward): ln_post on every CLIP output token (class +
    patches), then F.normalize per token; no projection."""
    vision = tiny_model.mllm.vision
    with torch.no_grad():
        pixels = torch.randn(2, 3, 32, 32)
        tokens = vision(pixels)
        raw = vision.model(pixel_values=pixels).last_hidden_state
    assert tokens.shape == raw.shape  # no projection to the joint embedding space
    assert torch.allclose(tokens, F.normalize(vision.model.post_layernorm(raw), dim=-1), atol=1e-6)
    assert torch.allclose(tokens.norm(dim=-1), torch.ones(tokens.shape[:2]), atol=1e-5)


def _reference_fairseq_sinusoid(num_positions: int, dim: int, padding_idx: int = 1) -> torch.Tensor:
    """fairseq SinusoidalPositionalEmbedding.get_embedding, re-derived: row p = [sin(p w) | cos(p w)]."""
    half = dim // 2
    w = torch.exp(torch.arange(half, dtype=torch.float32) * -(math.log(10000) / (half - 1)))
    angles = torch.arange(num_positions, dtype=torch.float32)[:, None] * w[None]
    table = torch.cat([angles.sin(), angles.cos()], dim=1)
    table[padding_idx] = 0
    return table


def test_decoder_adds_fairseq_sinusoidal_positions_counted_from_two(tiny_model):
    from kosmos_g.models.layers import fairseq_positions, sinusoidal_embeddings

    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    positions = fairseq_positions(mask)
    assert positions.tolist() == [[2, 3, 4, 5, 1, 1], [2, 3, 4, 5, 6, 7]]  # pads at padding_idx 1
    got = sinusoidal_embeddings(positions, 32)
    table = _reference_fairseq_sinusoid(8, 32)
    assert torch.allclose(got, table[positions], atol=1e-6)
    assert got[0, 4:].abs().max() == 0

    decoder = tiny_model.mllm.decoder
    dim = tiny_model.config.mllm.dim
    embeds = torch.randn(1, 5, dim)
    ones = torch.ones(1, 5, dtype=torch.bool)
    with torch.no_grad():
        with_positions = decoder(embeds, ones)
        decoder.absolute_positions = False
        try:
            # The same input with the positions added by hand, before the sqrt(dim) scale is undone.
            by_hand = decoder(embeds + _reference_fairseq_sinusoid(7, dim)[2:7][None] / decoder.embed_scale, ones)
        finally:
            decoder.absolute_positions = True
    assert torch.allclose(with_positions, by_hand, atol=1e-4)


def test_resampler_is_the_released_xconnector_layout(tiny_model):
    """dense -> latent queries attending to [image tokens; latents] with fairseq's plain
    multi-head attention: no Sub-LN norm inside (the official checkpoint has none)."""
    resampler = tiny_model.mllm.resampler
    names = sorted(name for name, _ in resampler.named_parameters())
    assert names == sorted(["proj.weight", "proj.bias", "latents"] + [
        f"attn.{p}_proj.{kind}" for p in ("q", "k", "v", "out") for kind in ("weight", "bias")])
    # Latent queries ~ N(0, 1) as torch.randn in the release (not scaled down).
    big = type(resampler)(16, 64, 256, 4)
    assert 0.9 < big.latents.std().item() < 1.1
