"""Magneto (Sub-LN) Transformer building blocks shared by the MLLM and AlignerNet.

Magneto (Wang et al., 2022) adds a LayerNorm inside each sublayer (before the attention
output projection and before the second FFN matrix) on top of Pre-LN, and scales the
initialisation of v/out/fc1/fc2 by sqrt(log(2N)); this is what keeps deep stacks stable
without warm-up tricks. The MLLM uses xPos relative positions (rotary with exponential
decay), as Kosmos-1 does.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class XPos(nn.Module):
    """xPos rotary embedding: queries scaled by zeta^n, keys by zeta^-n (Sun et al., 2022)."""

    def __init__(self, head_dim: int, scale_base: int = 512):
        super().__init__()
        half = head_dim // 2
        self.scale_base = scale_base
        self.register_buffer(
            "inv_freq", 1.0 / (10000 ** (torch.arange(half, dtype=torch.float32) / half)), persistent=False
        )
        self.register_buffer(
            "zeta", (torch.arange(half, dtype=torch.float32) * 2 + 0.4 * head_dim) / (1.4 * head_dim),
            persistent=False,
        )

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate (B, H, L, D) queries and keys of one sequence (positions 0..L-1)."""
        length = q.shape[-2]
        # Centred positions keep zeta^(+-n) within float range for long sequences;
        # attention only depends on position differences.
        pos = torch.arange(length, device=q.device, dtype=torch.float32) - length // 2
        angles = pos[:, None] * self.inv_freq[None, :]
        cos, sin = angles.cos(), angles.sin()
        scale = self.zeta[None, :] ** (pos[:, None] / self.scale_base)
        return self._rotate(q, cos * scale, sin * scale), self._rotate(k, cos / scale, sin / scale)

    @staticmethod
    def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        # The released layout (torchscale's rotate_every_two): adjacent channels (2i, 2i+1)
        # form the pair rotated by angle i, not channels (i, i + D/2). Weights trained with one
        # layout do not work with the other.
        x = x.float()
        x1, x2 = x[..., 0::2], x[..., 1::2]
        out = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)
        return out.to(x.dtype)


class SubLNAttention(nn.Module):
    """Multi-head attention with Magneto's inner LayerNorm before the output projection
    (`sub_ln=False`: plain multi-head attention, as fairseq's, with no such norm)."""

    def __init__(self, dim: int, num_heads: int, kv_dim: int | None = None, dropout: float = 0.0,
                 xpos_scale_base: int | None = None, sub_ln: bool = True):
        super().__init__()
        kv_dim = kv_dim or dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(kv_dim, dim)
        self.v_proj = nn.Linear(kv_dim, dim)
        self.inner_norm = nn.LayerNorm(dim) if sub_ln else nn.Identity()
        self.out_proj = nn.Linear(dim, dim)
        self.dropout = dropout
        self.xpos = XPos(self.head_dim, xpos_scale_base) if xpos_scale_base else None

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                attn_mask: torch.Tensor | None = None, causal: bool = False) -> torch.Tensor:
        """`attn_mask`: bool, True = may attend, broadcastable to (B, H, Lq, Lk)."""
        context = x if context is None else context
        b, lq, _ = x.shape
        lk = context.shape[1]
        q = self.q_proj(x).view(b, lq, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(context).view(b, lk, self.num_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(context).view(b, lk, self.num_heads, self.head_dim).transpose(1, 2)
        if self.xpos is not None:
            q, k = self.xpos(q, k)
        if causal:
            tri = torch.ones(lq, lk, dtype=torch.bool, device=x.device).tril()
            attn_mask = tri if attn_mask is None else attn_mask & tri
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0
        )
        out = out.transpose(1, 2).reshape(b, lq, -1)
        return self.out_proj(self.inner_norm(out))


class SubLNFeedForward(nn.Module):
    def __init__(self, dim: int, ffn_dim: int, activation: str = "gelu", dropout: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, ffn_dim)
        self.inner_norm = nn.LayerNorm(ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, dim)
        self.act = {"gelu": nn.GELU(), "relu": nn.ReLU(), "silu": nn.SiLU()}[activation]
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.inner_norm(self.dropout(self.act(self.fc1(x)))))


class SubLNBlock(nn.Module):
    """Pre-LN + Sub-LN layer: self-attention, optional cross-attention, FFN."""

    def __init__(self, dim: int, num_heads: int, ffn_dim: int, *, cross_attention: bool = False,
                 dropout: float = 0.0, activation: str = "gelu", xpos_scale_base: int | None = None):
        super().__init__()
        self.self_norm = nn.LayerNorm(dim)
        self.self_attn = SubLNAttention(dim, num_heads, dropout=dropout, xpos_scale_base=xpos_scale_base)
        self.cross_norm = nn.LayerNorm(dim) if cross_attention else None
        # torchscale gives only self-attention the Sub-LN inner norm (MultiheadAttention builds
        # inner_attn_ln when `subln and self_attention`): cross-attention has none.
        self.cross_attn = SubLNAttention(dim, num_heads, dropout=dropout, sub_ln=False) if cross_attention else None
        self.ffn_norm = nn.LayerNorm(dim)
        self.ffn = SubLNFeedForward(dim, ffn_dim, activation, dropout)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, self_mask: torch.Tensor | None = None, causal: bool = False,
                context: torch.Tensor | None = None, context_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.dropout(self.self_attn(self.self_norm(x), attn_mask=self_mask, causal=causal))
        if self.cross_attn is not None:
            x = x + self.dropout(self.cross_attn(self.cross_norm(x), context, attn_mask=context_mask))
        return x + self.dropout(self.ffn(self.ffn_norm(x)))


def magneto_init_(blocks: nn.ModuleList, gain: float | None = None) -> None:
    """Xavier init everywhere, then scale v/out/fc1/fc2 by `gain`, by default sqrt(log(2N))
    (Magneto's rule for a decoder- or encoder-only stack of N layers)."""
    gamma = gain if gain is not None else math.sqrt(math.log(2 * max(1, len(blocks))))
    for block in blocks:
        for name, module in block.named_modules():
            if not isinstance(module, nn.Linear):
                continue
            leaf = name.rsplit(".", 1)[-1]
            if leaf in ("q_proj", "k_proj", "v_proj"):
                nn.init.xavier_uniform_(module.weight, gain=1 / math.sqrt(2))
            else:
                nn.init.xavier_uniform_(module.weight)
            if leaf in ("v_proj", "out_proj", "fc1", "fc2"):
                with torch.no_grad():
                    module.weight.mul_(gamma)
            if module.bias is not None:
                nn.init.zeros_(module.bias)


def key_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
    """(B, Lk) bool validity mask -> (B, 1, 1, Lk) attention mask."""
    return None if mask is None else mask[:, None, None, :].bool()


def fairseq_positions(attention_mask: torch.Tensor, padding_idx: int = 1,
                      document_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Position ids as fairseq's make_positions: non-pad tokens count from padding_idx + 1,
    pads get padding_idx (whose embedding is zero). With `document_ids` (packed rows), the
    count restarts at every document, so a packed document is positioned as if alone."""
    mask = attention_mask.to(torch.long)
    counts = torch.cumsum(mask, dim=1)
    if document_ids is not None:
        # Tokens of earlier documents in the row, subtracted at every token of a document.
        starts = torch.ones_like(document_ids, dtype=torch.bool)
        starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
        before = torch.where(starts, counts - mask, torch.zeros_like(counts))
        counts = counts - torch.cummax(before, dim=1).values
    return counts * mask + padding_idx


def document_mask(attention_mask: torch.Tensor, document_ids: torch.Tensor) -> torch.Tensor:
    """(B, 1, L, L) attention mask of packed rows: a token sees valid tokens of its own
    document only (block-diagonal; the causal triangle is applied by the attention)."""
    same = document_ids[:, :, None] == document_ids[:, None, :]
    return (same & attention_mask.bool()[:, None, :])[:, None]


def sinusoidal_embeddings(positions: torch.Tensor, dim: int, padding_idx: int = 1) -> torch.Tensor:
    """fairseq's SinusoidalPositionalEmbedding for `positions` (B, L) -> (B, L, dim): [sin | cos]
    halves with frequencies 10000^(-i / (dim/2 - 1)), a zero row at padding_idx."""
    half = dim // 2
    frequencies = torch.exp(torch.arange(half, dtype=torch.float32, device=positions.device)
                            * -(math.log(10000.0) / (half - 1)))
    angles = positions.to(torch.float32)[..., None] * frequencies
    table = torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)
    if dim % 2:
        table = F.pad(table, (0, 1))
    return table.masked_fill((positions == padding_idx)[..., None], 0.0)
