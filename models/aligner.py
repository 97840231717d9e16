"""AlignerNet: maps MLLM states into the CLIP text-condition space the U-Net expects.

Encoder M: project the variable-length source (B, L, d_src) to the aligner width, add
learned positions, then a non-causal Sub-LN Transformer decoder whose `condition_length`
learned queries self-attend and cross-attend to the source -> (B, 77, 768).
Decoder N: the same architecture in reverse; its learned queries are cut to the source
length L, attend to M's output and are projected back to d_src (reconstruction loss).
Only M is needed after stage 2.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import AlignerConfig
from .layers import SubLNBlock, key_mask, magneto_init_


class QueryTransformer(nn.Module):
    """Learned queries reading a projected, position-embedded context through cross-attention."""

    def __init__(self, config: AlignerConfig, context_dim: int, context_length: int,
                 num_queries: int, out_dim: int | None = None):
        super().__init__()
        dim = config.dim
        self.in_proj = nn.Linear(context_dim, dim)
        self.context_pos = nn.Parameter(torch.randn(context_length, dim) * 0.02)
        self.queries = nn.Parameter(torch.randn(num_queries, dim) * 0.02)
        self.layers = nn.ModuleList(
            SubLNBlock(dim, config.num_heads, config.ffn_dim, cross_attention=True, dropout=config.dropout)
            for _ in range(config.num_layers)
        )
        magneto_init_(self.layers)
        self.final_norm = nn.LayerNorm(dim)
        self.out_proj = nn.Linear(dim, out_dim) if out_dim else None

    def forward(self, context: torch.Tensor, context_mask: torch.Tensor | None = None,
                num_queries: int | None = None, query_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, lc, _ = context.shape
        if lc > self.context_pos.shape[0]:
            raise ValueError(f"context length {lc} exceeds the {self.context_pos.shape[0]} learned positions")
        n = num_queries or self.queries.shape[0]
        if n > self.queries.shape[0]:
            raise ValueError(f"{n} queries requested but only {self.queries.shape[0]} are learned")
        dtype = self.in_proj.weight.dtype
        memory = self.in_proj(context.to(dtype)) + self.context_pos[:lc]
        x = self.queries[:n][None].expand(b, -1, -1)
        self_mask, cross_mask = key_mask(query_mask), key_mask(context_mask)
        for layer in self.layers:
            x = layer(x, self_mask, False, memory, cross_mask)
        x = self.final_norm(x)
        return self.out_proj(x) if self.out_proj is not None else x


class AlignerNet(nn.Module):
    def __init__(self, config: AlignerConfig, source_dim: int, condition_length: int):
        super().__init__()
        self.config = config
        self.condition_length = condition_length
        self.encoder = QueryTransformer(config, source_dim, config.max_source_length, condition_length)
        self.decoder = QueryTransformer(
            config, config.dim, condition_length, config.max_source_length, out_dim=source_dim
        )

    def encode(self, source: torch.Tensor, source_mask: torch.Tensor | None = None) -> torch.Tensor:
        """M: (B, L, d_src) + (B, L) validity mask -> (B, condition_length, dim)."""
        return self.encoder(source, source_mask)

    def reconstruct(self, condition: torch.Tensor, source_mask: torch.Tensor) -> torch.Tensor:
        """N: (B, condition_length, dim) -> (B, L, d_src), L = source_mask.shape[1]."""
        return self.decoder(condition, None, num_queries=source_mask.shape[1], query_mask=source_mask)

    def forward(self, source: torch.Tensor, source_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.encode(source, source_mask)

    def losses(self, source: torch.Tensor, source_mask: torch.Tensor,
               target: torch.Tensor) -> dict[str, torch.Tensor]:
        """Stage-2 losses: MSE(M(s), t) and masked reconstruction MSE(N(M(s)), s); loss = sum."""
        source_mask = source_mask.bool()
        condition = self.encode(source, source_mask)
        mse = (condition.float() - target.float()).pow(2).mean()
        rebuilt = self.reconstruct(condition, source_mask)
        err = (rebuilt.float() - source.float()).pow(2).mean(dim=-1)
        rec = (err * source_mask).sum() / source_mask.sum().clamp(min=1)
        return {"loss": mse + rec, "mse": mse, "rec": rec}
