"""The multimodal LLM (Kosmos-1 style): CLIP vision encoder, resampler, Magneto causal decoder.

Text tokens are looked up in an embedding table; each image becomes `image_tokens`
embeddings (CLIP ViT tokens pooled by the resampler) written into the sequence's image
slots. The decoder returns a hidden state for every position (the conditioning source for
AlignerNet) and, on request, next-token logits (stage-1 language modelling).
"""

from __future__ import annotations

import math

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import MLLMConfig, VisionConfig
from .layers import (SubLNAttention, SubLNBlock, document_mask, fairseq_positions, key_mask, magneto_init_,
                     sinusoidal_embeddings)


class VisionEncoder(nn.Module):
    """transformers `CLIPVisionModel` returning all (N, 1 + patches, width) tokens.

    As released (ClipVisualOnly): the final LayerNorm (`post_layernorm`) is applied to every
    token, not only the class token, and each token is then L2-normalised; there is no
    projection to CLIP's joint space. The trainable last block and final norm shape
    everything the resampler sees.
    """

    def __init__(self, config: VisionConfig, meta: bool = False):
        super().__init__()
        from transformers import CLIPVisionConfig, CLIPVisionModel

        if config.pretrained_path and not meta:
            self.model = CLIPVisionModel.from_pretrained(config.pretrained_path)
        else:
            hf_config = (
                CLIPVisionConfig.from_pretrained(config.pretrained_path)
                if config.pretrained_path
                else CLIPVisionConfig(
                    hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
                    num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
                    image_size=config.image_size, patch_size=config.patch_size, hidden_act=config.hidden_act,
                )
            )
            self.model = CLIPVisionModel(hf_config)
        self.trainable_layers = config.trainable_layers

    def architecture(self) -> dict:
        """VisionConfig fields describing the wrapped model (a loaded checkpoint's, if any)."""
        c = self.model.config
        return dict(image_size=c.image_size, patch_size=c.patch_size, hidden_size=c.hidden_size,
                    num_layers=c.num_hidden_layers, num_heads=c.num_attention_heads,
                    intermediate_size=c.intermediate_size, hidden_act=c.hidden_act)

    @property
    def width(self) -> int:
        return self.model.config.hidden_size

    def trainable_modules(self) -> list[nn.Module]:
        layers = list(self.model.encoder.layers)
        return layers[len(layers) - self.trainable_layers:] + [self.model.post_layernorm]

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden = self.model(pixel_values=pixel_values).last_hidden_state
        return F.normalize(self.model.post_layernorm(hidden), dim=-1)


class Resampler(nn.Module):
    """Attentive pooling: learned latent queries attend to [image tokens; latents] once
    (the release's XConnector: dense, then fairseq multi-head attention, latents ~ N(0, 1))."""

    def __init__(self, input_dim: int, dim: int, num_latents: int, num_heads: int, sub_ln: bool = False):
        super().__init__()
        self.proj = nn.Linear(input_dim, dim)
        self.latents = nn.Parameter(torch.randn(num_latents, dim))
        self.attn = SubLNAttention(dim, num_heads, sub_ln=sub_ln)
        # fairseq MultiheadAttention's initialisation.
        for projection in (self.attn.q_proj, self.attn.k_proj, self.attn.v_proj):
            nn.init.xavier_uniform_(projection.weight, gain=1 / math.sqrt(2))
        nn.init.xavier_uniform_(self.attn.out_proj.weight)
        nn.init.zeros_(self.attn.out_proj.bias)

    def forward(self, image_tokens: torch.Tensor) -> torch.Tensor:
        """(N, T, input_dim) -> (N, num_latents, dim)."""
        x = self.proj(image_tokens)
        latents = self.latents[None].expand(x.shape[0], -1, -1).to(x.dtype)
        return self.attn(latents, torch.cat([x, latents], dim=1))


class MagnetoDecoder(nn.Module):
    """Causal Sub-LN Transformer with xPos positions, a final LayerNorm and an LM head."""

    def __init__(self, config: MLLMConfig, vocab_size: int):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab_size, config.dim)
        nn.init.normal_(self.embed_tokens.weight, std=config.dim**-0.5)
        self.layers = nn.ModuleList(
            SubLNBlock(config.dim, config.num_heads, config.ffn_dim, dropout=config.dropout,
                       activation=config.activation, xpos_scale_base=config.xpos_scale_base)
            for _ in range(config.num_layers)
        )
        magneto_init_(self.layers)
        self.final_norm = nn.LayerNorm(config.dim)
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(config.dim, vocab_size, bias=False)
        if self.lm_head is not None:
            nn.init.normal_(self.lm_head.weight, std=config.dim**-0.5)
        self.dropout = nn.Dropout(config.dropout)
        self.gradient_checkpointing = config.gradient_checkpointing
        # As released (fairseq LM default): every input embedding, image slots included, is
        # scaled by sqrt(dim) before the first layer.
        self.embed_scale = math.sqrt(config.dim) if config.scale_embedding else 1.0
        self.absolute_positions = config.absolute_positions

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor,
                document_ids: torch.Tensor | None = None) -> torch.Tensor:
        """`document_ids` (B, L): packed rows (stage 1); each document attends only to itself
        and its absolute positions restart, so packing changes no document's computation."""
        x = inputs_embeds * self.embed_scale
        if self.absolute_positions:
            valid = attention_mask if attention_mask is not None else torch.ones(x.shape[:2], device=x.device)
            positions = sinusoidal_embeddings(fairseq_positions(valid, document_ids=document_ids), x.shape[-1])
            x = x + positions.to(x.dtype)
        x = self.dropout(x)
        if document_ids is not None:
            mask = document_mask(attention_mask, document_ids)
        else:
            mask = key_mask(attention_mask)
        for layer in self.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, mask, True, use_reentrant=False)
            else:
                x = layer(x, mask, True)
        return self.final_norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.lm_head is None:
            return F.linear(hidden, self.embed_tokens.weight)
        return self.lm_head(hidden)


@dataclass
class MLLMOutput:
    hidden_states: torch.Tensor  # (B, L, dim), final-norm output at every position
    logits: torch.Tensor | None  # (B, L, vocab) when requested


class MLLM(nn.Module):
    def __init__(self, config: MLLMConfig, vocab_size: int, meta: bool = False):
        super().__init__()
        if config.vocab_size and config.vocab_size < vocab_size:
            raise ValueError(f"mllm.vocab_size {config.vocab_size} < tokenizer size {vocab_size}")
        self.config = config
        self.vocab_size = config.vocab_size or vocab_size
        self.vision = VisionEncoder(config.vision, meta=meta)
        self.resampler = Resampler(self.vision.width, config.dim, config.image_tokens, config.resampler_heads,
                                   sub_ln=config.resampler_sub_ln)
        self.decoder = MagnetoDecoder(config, self.vocab_size)

    def trainable_modules(self) -> list[nn.Module]:
        """What stages 1 and 3 train: last CLIP block(s) + final norm, resampler, decoder."""
        return self.vision.trainable_modules() + [self.resampler, self.decoder]

    def embed(self, input_ids: torch.Tensor, image_mask: torch.Tensor,
              pixel_values: torch.Tensor | None) -> torch.Tensor:
        embeds = self.decoder.embed_tokens(input_ids)
        n_images = 0 if pixel_values is None else pixel_values.shape[0]
        n_slots = int(image_mask.sum())
        if n_slots != n_images * self.config.image_tokens:
            raise ValueError(
                f"batch has {n_slots} image slots but {n_images} images x "
                f"{self.config.image_tokens} embeddings each"
            )
        if n_images:
            vision_dtype = next(self.vision.parameters()).dtype
            image_embeds = self.resampler(self.vision(pixel_values.to(vision_dtype)))
            # masked_scatter fills slots in row-major order: images in order of appearance.
            embeds = embeds.masked_scatter(image_mask[..., None], image_embeds.to(embeds.dtype))
        return embeds

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, image_mask: torch.Tensor,
                pixel_values: torch.Tensor | None = None, return_logits: bool = False,
                document_ids: torch.Tensor | None = None) -> MLLMOutput:
        embeds = self.embed(input_ids, image_mask, pixel_values)
        hidden = self.decoder(embeds, attention_mask.bool(), document_ids)
        return MLLMOutput(hidden, self.decoder.logits(hidden) if return_logits else None)
