"""Interleaved image-text prompts: one parser and one sequence builder for training and serving.

A prompt is a list of segments, each a text string or an image. Its token sequence is

    <s> text <image> [K image slots] </image> text ... </s>

where the K slots (K = the resampler's latent count, 64 in the paper) are filled by the MLLM
with the resampler's image embeddings. Users type prompts as text with one placeholder per
image (`<image>` or `<i>`), images given separately in order: see `parse_prompt`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, Union

import numpy as np
import torch
from PIL import Image

from .config import ModelConfig, TokenizerConfig
from .images import clip_preprocess, is_image
from .tokenizers import build_text_tokenizer

Segment = Union[str, Image.Image, np.ndarray, torch.Tensor]
PLACEHOLDER = re.compile(r"<image>|<i>")
BATCH_KEYS = ("input_ids", "attention_mask", "image_mask", "loss_mask", "pixel_values")


def parse_prompt(text: str, images: Sequence[Any] = ()) -> list[Segment]:
    """Split `text` at `<image>`/`<i>` placeholders and put `images` there, in order.

    >>> parse_prompt("a photo of <i> wearing <i>", [dog, hat])
    ['a photo of', dog, 'wearing', hat]
    """
    images = list(images)
    pieces = PLACEHOLDER.split(text)
    placeholders = len(pieces) - 1
    if placeholders != len(images):
        raise ValueError(
            f"prompt has {placeholders} image placeholder(s) (<image> or <i>) "
            f"but {len(images)} image(s) were given"
        )
    segments: list[Segment] = []
    for i, piece in enumerate(pieces):
        piece = piece.strip()
        if piece:
            segments.append(piece)
        if i < len(images):
            segments.append(images[i])
    return segments


def _is_segment_image(segment: Any) -> bool:
    return is_image(segment) or isinstance(segment, torch.Tensor)


class InterleavedTokenizer:
    """Turns prompts (segment lists) into model batches.

    `encode` gives one example as numpy arrays (cheap to ship through data pipelines);
    `collate` pads a list of examples into the batch dict the model consumes:
    input_ids (B,L) long, attention_mask/image_mask/loss_mask (B,L) bool,
    pixel_values (N,3,S,S) float with every image of the batch in order of appearance.
    """

    def __init__(self, config: TokenizerConfig, image_tokens: int = 64, image_size: int = 224):
        self.config = config
        self.text = build_text_tokenizer(config)
        self.max_length = config.max_length
        self.image_tokens = image_tokens
        self.image_size = image_size
        self.bos_id, self.eos_id = self.text.bos_id, self.text.eos_id
        self.boi_id, self.eoi_id, self.pad_id = self.text.boi_id, self.text.eoi_id, self.text.pad_id
        self.vocab_size = self.text.vocab_size
        if image_tokens + 4 > self.max_length:
            raise ValueError(f"max_length {self.max_length} cannot hold an image of {image_tokens} slots")

    @classmethod
    def from_model_config(cls, cfg: ModelConfig) -> "InterleavedTokenizer":
        return cls(cfg.tokenizer, cfg.mllm.image_tokens, cfg.mllm.vision.image_size)

    def preprocess_image(self, image: Any) -> np.ndarray:
        if isinstance(image, torch.Tensor):
            # Already CLIP-normalised (e.g. by a data pipeline); only the shape is checked.
            expected = (3, self.image_size, self.image_size)
            if tuple(image.shape) != expected:
                raise ValueError(f"image tensor must be {expected}, got {tuple(image.shape)}")
            return image.detach().float().cpu().numpy()
        return clip_preprocess(image, self.image_size).numpy()

    def encode(self, segments: str | Sequence[Segment], add_eos: bool = True) -> dict[str, np.ndarray]:
        """One example: input_ids, image_mask, loss_mask (L,), pixel_values (n,3,S,S).

        Sequences longer than max_length are cut at the end; an image that would be cut
        is dropped whole (with all later content), and `</s>` is kept.
        """
        if isinstance(segments, str):
            segments = [segments]
        elif not isinstance(segments, (list, tuple)):
            raise TypeError(
                f"a prompt is text or a list of segments, got {type(segments).__name__}; "
                "wrap a single image as [image]"
            )
        ids, image_mask, loss_mask = [self.bos_id], [False], [False]
        pixels: list[np.ndarray] = []
        budget = self.max_length - (1 if add_eos else 0)
        for segment in segments:
            if _is_segment_image(segment):
                if len(ids) + self.image_tokens + 2 > budget:
                    break
                pixels.append(self.preprocess_image(segment))
                ids += [self.boi_id] + [self.pad_id] * self.image_tokens + [self.eoi_id]
                image_mask += [False] + [True] * self.image_tokens + [False]
                loss_mask += [False] * (self.image_tokens + 2)
            elif isinstance(segment, str):
                tokens = self.text.encode(segment.strip()) if segment.strip() else []
                tokens = tokens[: max(0, budget - len(ids))]
                ids += tokens
                image_mask += [False] * len(tokens)
                loss_mask += [True] * len(tokens)
                if len(ids) >= budget:
                    break
            else:
                raise TypeError(f"prompt segments are str or images, got {type(segment).__name__}")
        if add_eos:
            ids.append(self.eos_id)
            image_mask.append(False)
            loss_mask.append(True)
        size = self.image_size
        return {
            "input_ids": np.asarray(ids, dtype=np.int64),
            "image_mask": np.asarray(image_mask, dtype=bool),
            "loss_mask": np.asarray(loss_mask, dtype=bool),
            "pixel_values": (
                np.stack(pixels).astype(np.float32) if pixels else np.zeros((0, 3, size, size), np.float32)
            ),
        }

    def collate(self, examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Right-pad examples from `encode` into one batch dict (keys: BATCH_KEYS)."""
        if not examples:
            raise ValueError("cannot collate an empty list of examples")
        rows = [{k: torch.as_tensor(np.asarray(ex[k])) for k in ex if k in BATCH_KEYS} for ex in examples]
        length = max(int(r["input_ids"].shape[0]) for r in rows)
        batch = len(rows)
        input_ids = torch.full((batch, length), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros(batch, length, dtype=torch.bool)
        image_mask = torch.zeros(batch, length, dtype=torch.bool)
        loss_mask = torch.zeros(batch, length, dtype=torch.bool)
        pixels = []
        for i, r in enumerate(rows):
            n = int(r["input_ids"].shape[0])
            input_ids[i, :n] = r["input_ids"].long()
            attention_mask[i, :n] = True
            image_mask[i, :n] = r["image_mask"].bool()
            loss_mask[i, :n] = r["loss_mask"].bool()
            pv = r.get("pixel_values")
            if pv is not None and pv.shape[0]:
                pixels.append(pv.float())
            if int(image_mask[i].sum()) != (0 if pv is None else int(pv.shape[0])) * self.image_tokens:
                raise ValueError(f"example {i}: image slots do not match its pixel_values")
        size = self.image_size
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "image_mask": image_mask,
            "loss_mask": loss_mask,
            "pixel_values": torch.cat(pixels) if pixels else torch.zeros(0, 3, size, size),
        }

    def __call__(self, prompts: Sequence[str | Sequence[Segment]]) -> dict[str, torch.Tensor]:
        """Batch dict for a list of prompts (each a text or a segment list)."""
        return self.collate([self.encode(p) for p in prompts])

    def condition_mask(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Positions whose final hidden states feed AlignerNet: every real token but `</s>`.

        As released, the conditioning input is the language-model input, i.e. the sequence
        without its closing `</s>`; in a causal decoder masking that last token is the same
        as removing it."""
        return attention_mask.bool() & (input_ids != self.eos_id)

    def bare_batch(self, batch_size: int = 1) -> dict[str, torch.Tensor]:
        """Batch of the bare `<s>` sequence: the unconditional / empty prompt."""
        return self.collate([self.encode([], add_eos=False)] * batch_size)

    def decode(self, ids: Sequence[int]) -> str:
        return self.text.decode(list(ids))
