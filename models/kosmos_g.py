"""Kosmos-G: MLLM + AlignerNet encoder M produce a Stable Diffusion text condition from an
interleaved image-text prompt; the frozen image decoder turns it into pixels.

The three training stages of the paper are methods here (`lm_loss`, `align_loss`,
`diffusion_loss`) and `set_stage` decides what is trainable; `forward` dispatches to the
current stage's loss so DeepSpeed-style engines can call the module directly.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .aligner import AlignerNet
from .config import ModelConfig
from .image_decoder import ImageDecoder, denoising_loss, noised_latents
from .mllm import MLLM
from .prompt import BATCH_KEYS, InterleavedTokenizer, Segment

STAGES = (1, 2, 3)


class KosmosG(nn.Module):
    def __init__(self, config: ModelConfig, tokenizer: InterleavedTokenizer, mllm: MLLM,
                 aligner: AlignerNet, image_decoder: ImageDecoder):
        super().__init__()
        self.config = config
        self.tokenizer = tokenizer
        self.mllm = mllm
        self.aligner = aligner
        self.image_decoder = image_decoder
        self.stage = 3
        self.set_stage(3)

    @classmethod
    def from_config(cls, cfg: ModelConfig, device: str | torch.device | None = None) -> "KosmosG":
        """Build the model. Without pretrained paths weights are random; on `device="meta"`
        nothing is allocated (parameter counting) and pretrained paths only supply shapes."""
        cfg = copy.deepcopy(cfg)
        cfg.validate()
        meta = device is not None and torch.device(device).type == "meta"
        # Counting parameters of a preset whose vocabulary files are not at hand (the official
        # one) needs only its size, which the preset then fixes in mllm.vocab_size.
        without_vocab = meta and cfg.tokenizer.kind == "official" and not cfg.tokenizer.vocab_dir
        tokenizer = None if without_vocab and cfg.mllm.vocab_size else InterleavedTokenizer.from_model_config(cfg)
        with torch.device("meta") if meta else contextlib.nullcontext():
            mllm = MLLM(cfg.mllm, tokenizer.vocab_size if tokenizer else cfg.mllm.vocab_size, meta=meta)
            # A loaded CLIP decides the vision architecture; keep the config truthful so
            # checkpoints can rebuild it without the original weights.
            for key, value in mllm.vision.architecture().items():
                setattr(cfg.mllm.vision, key, value)
            image_decoder = ImageDecoder(cfg.image_decoder, meta=meta)
            if cfg.image_decoder.pretrained_path:
                for key, value in image_decoder.architecture().items():
                    setattr(cfg.image_decoder, key, value)
            if tokenizer is not None:
                tokenizer.image_size = cfg.mllm.vision.image_size
            aligner = AlignerNet(cfg.aligner, cfg.mllm.dim, cfg.image_decoder.condition_length)
        model = cls(cfg, tokenizer, mllm, aligner, image_decoder)
        if device is not None and not meta:
            model.to(device)
        return model

    # ------------------------------------------------------------------ plumbing
    @property
    def device(self) -> torch.device:
        return self.aligner.encoder.queries.device

    def set_stage(self, stage: int) -> None:
        """1: MLLM (last CLIP block + final norm, resampler, decoder); 2: AlignerNet M and N;
        3: the MLLM parts of stage 1 + M. The image decoder is always frozen."""
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
        self.stage = stage
        self.requires_grad_(False)
        if stage in (1, 3):
            for module in self.mllm.trainable_modules():
                module.requires_grad_(True)
        if stage == 2:
            self.aligner.requires_grad_(True)
        if stage == 3:
            self.aligner.encoder.requires_grad_(True)
        self.train(self.training)

    def train(self, mode: bool = True) -> "KosmosG":
        super().train(mode)
        if getattr(self, "stage", None) == 2:
            # Stage 2 treats the MLLM as a fixed feature extractor: no dropout noise.
            self.mllm.eval()
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters the current stage trains (never the image decoder's, even with LoRA)."""
        return [p for m in (self.mllm, self.aligner) for p in m.parameters() if p.requires_grad]

    def named_trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad and not n.startswith("image_decoder.")]

    def _batch(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        missing = [k for k in BATCH_KEYS if k not in batch]
        if missing:
            raise KeyError(f"batch lacks {missing}; build it with model.tokenizer.collate")
        tensors = {k: torch.as_tensor(batch[k]).to(self.device) for k in BATCH_KEYS}
        if batch.get("document_ids") is not None:  # packed stage-1 rows
            tensors["document_ids"] = torch.as_tensor(batch["document_ids"]).to(self.device)
        return tensors

    def _mllm(self, b: dict[str, torch.Tensor], return_logits: bool = False):
        return self.mllm(b["input_ids"], b["attention_mask"], b["image_mask"], b["pixel_values"],
                         return_logits=return_logits, document_ids=b.get("document_ids"))

    # ------------------------------------------------------------------ conditioning
    def encode(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """Batch dict -> (B, condition_length, condition_dim) U-Net condition: M(MLLM(prompt))."""
        b = self._batch(batch)
        mask = self.tokenizer.condition_mask(b["input_ids"], b["attention_mask"])
        return self.aligner.encode(self._mllm(b).hidden_states, mask)

    def encode_prompts(self, prompts: Sequence[str | Sequence[Segment]]) -> torch.Tensor:
        """Prompts (text, or lists of text segments and images) -> (B, 77, D) condition."""
        return self.encode(self.tokenizer(prompts))

    def empty_condition(self, batch_size: int = 1) -> torch.Tensor:
        """Encoding of the bare `<s>` sequence: unconditional branch and CFG-dropout value."""
        return self.encode(self.tokenizer.bare_batch(1)).expand(batch_size, -1, -1)

    # ------------------------------------------------------------------ losses
    def lm_loss(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """Stage 1: next-token cross-entropy on text targets (`loss_mask`) only. In packed rows
        no target crosses a document boundary: each document starts with `<s>`, never a target."""
        b = self._batch(batch)
        logits = self._mllm(b, return_logits=True).logits[:, :-1]
        targets = b["input_ids"][:, 1:]
        mask = b["loss_mask"][:, 1:] & b["attention_mask"][:, 1:]
        if not mask.any():
            return logits.sum() * 0.0
        return F.cross_entropy(logits[mask].float(), targets[mask])

    def align_loss(self, batch: Mapping[str, Any], captions: Sequence[str],
                   teacher: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Stage 2: AlignerNet against the CLIP text teacher; the MLLM is a fixed source.

        `batch` holds the MLLM tokenisation of `captions` (same order); `teacher`, when given, is
        the teacher's output for them computed beforehand (`pipelines/precompute.py`)."""
        b = self._batch(batch)
        if len(captions) != b["input_ids"].shape[0]:
            raise ValueError(f"{len(captions)} captions for a batch of {b['input_ids'].shape[0]}")
        with torch.no_grad():
            source = self._mllm(b).hidden_states
        if teacher is None:
            teacher = self.image_decoder.text_condition(list(captions))
        target = teacher.to(self.device)
        mask = self.tokenizer.condition_mask(b["input_ids"], b["attention_mask"])
        return self.aligner.losses(source, mask, target)

    def diffusion_loss(self, batch: Mapping[str, Any], target_pixels: torch.Tensor | None,
                       generator: torch.Generator | None = None, cond_dropout: float = 0.1,
                       target_moments: torch.Tensor | None = None) -> torch.Tensor:
        """Stage 3: denoising MSE through the frozen U-Net, gradients flowing into the condition.

        `target_pixels`: (B, 3, H, W) in [-1, 1] (see images.vae_preprocess); or instead
        `target_moments`, their VAE posterior computed beforehand (`ImageDecoder.latent_moments`)."""
        decoder = self.image_decoder
        if target_moments is not None:
            latents = decoder.sample_latents(target_moments, generator)
        elif target_pixels is not None:
            latents = decoder.encode_latents(target_pixels, generator)
        else:
            raise ValueError("stage 3 needs target_pixels or target_moments")
        n = latents.shape[0]
        rand_device = generator.device if generator is not None else latents.device
        noisy, timesteps, target = noised_latents(decoder.noise_scheduler, latents, generator)
        condition = self.encode(batch)
        if condition.shape[0] != n:
            raise ValueError(f"{condition.shape[0]} prompts for {n} target images")
        if cond_dropout > 0:
            drop = torch.rand(n, generator=generator, device=rand_device).to(latents.device) < cond_dropout
            if drop.any():
                empty = self.empty_condition(1).to(condition.dtype)
                condition = torch.where(drop[:, None, None], empty, condition)
        pred = decoder.unet(noisy, timesteps, encoder_hidden_states=condition.to(decoder.dtype)).sample
        return denoising_loss(pred, target, decoder.noise_scheduler, timesteps)  # SD's plain MSE, as released

    def forward(self, batch: Mapping[str, Any], captions: Sequence[str] | None = None,
                target_pixels: torch.Tensor | None = None, generator: torch.Generator | None = None,
                cond_dropout: float = 0.1, teacher: torch.Tensor | None = None,
                target_moments: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The current stage's loss as {"loss": ...} (stage 2 adds "mse" and "rec"). `teacher` and
        `target_moments` are the precomputed stand-ins of the teacher on `captions` and of the
        VAE on `target_pixels`."""
        if self.stage == 1:
            return {"loss": self.lm_loss(batch)}
        if self.stage == 2:
            if captions is None:
                raise ValueError("stage 2 needs captions")
            return self.align_loss(batch, captions, teacher)
        if target_pixels is None and target_moments is None:
            raise ValueError("stage 3 needs target_pixels")
        return {"loss": self.diffusion_loss(batch, target_pixels, generator, cond_dropout, target_moments)}

