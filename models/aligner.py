"""AlignerNet: maps MLLM states into the CLIP text-condition space the U-Net expects.

The structure follows the released Kosmos-G code (paper section 2.2):

  M (encode):      source (B, L, d_src) -> Linear(d_src -> dim) + learned positions
                   -> `encoder_layers` non-causal Sub-LN encoder layers (padding-masked) -> LayerNorm
                   -> `num_layers` decoder layers whose `condition_length` learned queries
                      self-attend and cross-attend to the encoded source -> LayerNorm -> (B, 77, dim)
  N (reconstruct): the first L of N's learned queries cross-attend to M's output through
                   `num_layers` decoder layers -> LayerNorm -> + learned positions
                   -> `encoder_layers` encoder layers -> LayerNorm -> Linear(dim -> d_src)

`encoder_layers=0` gives the decoder-only variant (the paper's Table 2 ablation, reported there
as failing): M is then projection + positions + the query decoder, as in earlier versions here.
Only M is needed after stage 2.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import AlignerConfig
from .layers import SubLNBlock, key_mask, magneto_init_


def _encoder_decoder_gains(config: AlignerConfig) -> tuple[float, float]:
    """Sub-LN init gains of an encoder-decoder (torchscale's rule for the released AlignerNet)."""
    dec, enc = max(1, config.num_layers), max(1, config.encoder_layers)
    return math.sqrt(math.log(3 * dec) * math.log(2 * enc) / 3), math.sqrt(math.log(3 * dec))


class SourceEncoder(nn.Module):
    """Optional input projection + learned positions -> non-causal Sub-LN encoder stack."""

    def __init__(self, config: AlignerConfig, num_positions: int, in_dim: int | None = None,
                 out_dim: int | None = None):
        super().__init__()
        dim = config.dim
        self.in_proj = nn.Linear(in_dim, dim) if in_dim else None
        self.positions = nn.Parameter(torch.randn(num_positions, dim) * 0.02)
        self.layers = nn.ModuleList(
            SubLNBlock(dim, config.num_heads, config.ffn_dim, dropout=config.dropout)
            for _ in range(config.encoder_layers)
        )
        magneto_init_(self.layers, gain=_encoder_decoder_gains(config)[0])
        # With no layers there is nothing to normalise: the decoder-only ablation keeps its
        # projection + positions only.
        self.final_norm = nn.LayerNorm(dim) if config.encoder_layers else None
        self.out_proj = nn.Linear(dim, out_dim) if out_dim else None

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        length = x.shape[1]
        if length > self.positions.shape[0]:
            raise ValueError(f"source length {length} exceeds the {self.positions.shape[0]} learned positions")
        if self.in_proj is not None:
            x = self.in_proj(x.to(self.in_proj.weight.dtype))
        x = x + self.positions[:length]
        if mask is not None:
            x = x * mask[..., None].to(x.dtype)  # padded inputs carry nothing, as released
        attn_mask = key_mask(mask)
        for layer in self.layers:
            x = layer(x, attn_mask)
        if self.final_norm is not None:
            x = self.final_norm(x)
        return self.out_proj(x) if self.out_proj is not None else x


class QueryDecoder(nn.Module):
    """Learned queries that self-attend (non-causally) and cross-attend to a memory."""

    def __init__(self, config: AlignerConfig, num_queries: int):
        super().__init__()
        dim = config.dim
        self.queries = nn.Parameter(torch.randn(num_queries, dim) * 0.02)
        self.layers = nn.ModuleList(
            SubLNBlock(dim, config.num_heads, config.ffn_dim, cross_attention=True, dropout=config.dropout)
            for _ in range(config.num_layers)
        )
        magneto_init_(self.layers, gain=_encoder_decoder_gains(config)[1])
        self.final_norm = nn.LayerNorm(dim)

    def forward(self, memory: torch.Tensor, memory_mask: torch.Tensor | None = None,
                num_queries: int | None = None, query_mask: torch.Tensor | None = None) -> torch.Tensor:
        n = num_queries or self.queries.shape[0]
        if n > self.queries.shape[0]:
            raise ValueError(f"{n} queries requested but only {self.queries.shape[0]} are learned "
                             "(source length exceeds the learned positions)")
        x = self.queries[:n][None].expand(memory.shape[0], -1, -1).to(memory.dtype)
        self_mask, cross_mask = key_mask(query_mask), key_mask(memory_mask)
        for layer in self.layers:
            x = layer(x, self_mask, False, memory, cross_mask)
        return self.final_norm(x)


class AlignerEncoder(nn.Module):
    """M: MLLM states -> (B, condition_length, dim) U-Net condition."""

    def __init__(self, config: AlignerConfig, source_dim: int, condition_length: int):
        super().__init__()
        self.source = SourceEncoder(config, config.max_source_length, in_dim=source_dim)
        self.query = QueryDecoder(config, condition_length)

    @property
    def queries(self) -> nn.Parameter:
        return self.query.queries

    def forward(self, source: torch.Tensor, source_mask: torch.Tensor | None = None) -> torch.Tensor:
        mask = None if source_mask is None else source_mask.bool()
        return self.query(self.source(source, mask), mask)


class AlignerDecoder(nn.Module):
    """N: condition -> (B, L, d_src) reconstruction of the MLLM states (stage 2 only)."""

    def __init__(self, config: AlignerConfig, source_dim: int):
        super().__init__()
        self.query = QueryDecoder(config, config.max_source_length)
        self.target = SourceEncoder(config, config.max_source_length, out_dim=source_dim)

    def forward(self, condition: torch.Tensor, source_mask: torch.Tensor) -> torch.Tensor:
        # Deviation from the release, on purpose: N's self-attention ignores padded positions,
        # so a caption's reconstruction does not depend on how long its batch was padded.
        mask = source_mask.bool()
        rebuilt = self.query(condition, None, num_queries=mask.shape[1], query_mask=mask)
        return self.target(rebuilt, mask)


class AlignerNet(nn.Module):
    def __init__(self, config: AlignerConfig, source_dim: int, condition_length: int):
        super().__init__()
        self.config = config
        self.condition_length = condition_length
        self.encoder = AlignerEncoder(config, source_dim, condition_length)
        self.decoder = AlignerDecoder(config, source_dim)

    def encode(self, source: torch.Tensor, source_mask: torch.Tensor | None = None) -> torch.Tensor:
        """M: (B, L, d_src) + (B, L) validity mask -> (B, condition_length, dim)."""
        return self.encoder(source, source_mask)

    def reconstruct(self, condition: torch.Tensor, source_mask: torch.Tensor) -> torch.Tensor:
        """N: (B, condition_length, dim) -> (B, L, d_src), L = source_mask.shape[1]."""
        return self.decoder(condition, source_mask)

    def forward(self, source: torch.Tensor, source_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.encode(source, source_mask)

    def losses(self, source: torch.Tensor, source_mask: torch.Tensor,
               target: torch.Tensor) -> dict[str, torch.Tensor]:
        """Stage-2 losses as released: MSE(M(s), t) + MSE(N(M(s)), s) * condition_length / L.

        L is the (padded) source length; the reconstruction mean runs over valid positions only
        (the release averages over padding too; padded states carry no caption information)."""
        source_mask = source_mask.bool()
        condition = self.encode(source, source_mask)
        mse = (condition.float() - target.float()).pow(2).mean()
        rebuilt = self.reconstruct(condition, source_mask)
        err = (rebuilt.float() - source.float()).pow(2).mean(dim=-1)
        rec_mean = (err * source_mask).sum() / source_mask.sum().clamp(min=1)
        rec = rec_mean * (self.condition_length / source_mask.shape[1])
        return {"loss": mse + rec, "mse": mse, "rec": rec}
