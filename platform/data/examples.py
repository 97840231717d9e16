"""Shard rows -> training examples (per stage), and examples -> model batches.

`Preprocessor` runs inside Ray Data (`map_batches` with an actor pool): it decodes the
images, applies the stage-3 augmentations, tokenises into the interleaved format and
resizes every image to its final size. Pixels travel as uint8 (a quarter of float32 in
the object store); `StreamCollator` turns them into the exact tensors of
`models.images.clip_preprocess` / `vae_preprocess` when it pads the batch.

Every random choice comes from a generator seeded by (seed, stage, source, key, draw),
so an example is the same whichever worker builds it and in whatever order.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from ray.data.collate_fn import NumpyBatchCollateFn

from kosmos_g.models.config import ModelConfig
from kosmos_g.models.images import CLIP_MEAN, CLIP_STD, resize_center_crop
from kosmos_g.models.prompt import InterleavedTokenizer
from kosmos_g.platform.data import imaging
from kosmos_g.platform.data.skips import SkipRecord, SkipRecorder
from kosmos_g.platform.weights import localize

SOURCE_IDS = {"compositional": 0, "editing": 1, "captions": 2}
FILL_MARGIN = 48  # a fill colour closer than this (per channel) to the entity's would hide it

OUTPUT_SCHEMA = pa.schema([
    ("source", pa.string()),
    ("key", pa.string()),
    ("draw", pa.int32()),
    ("input_ids", pa.list_(pa.int32())),
    ("image_mask", pa.list_(pa.bool_())),
    ("loss_mask", pa.list_(pa.bool_())),
    ("n_images", pa.int32()),
    ("clip_pixels", pa.binary()),  # uint8 (n_images, 3, S, S), S = mllm.vision.image_size
    ("caption", pa.string()),
    ("target_pixels", pa.binary()),  # uint8 (3, H, H), H = image_decoder.image_size; stage 3
    # Precomputed (pipelines/precompute.py), as .npy bytes: the teacher's output on `caption`
    # (stage 2) and the VAE posterior of the target (stage 3) instead of `target_pixels`.
    ("teacher", pa.binary()),
    ("target_latents", pa.binary()),
    # What the augmentations did (for monitoring and the probability tests).
    ("n_entities", pa.int32()),
    ("n_entity_text_dropped", pa.int32()),
    ("n_background_kept", pa.int32()),
    ("input_caption_dropped", pa.bool_()),
    # Token count of each document in the row: one entry, or several once packed (packing.py).
    ("doc_lengths", pa.list_(pa.int32())),
])


def key_hash(*parts: Any) -> int:
    """64-bit hash of the parts, stable across processes (unlike Python's hash())."""
    digest = hashlib.blake2b("\x1f".join(str(p) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def example_rng(seed: int, stage: int, source: str, key: str, draw: int) -> np.random.Generator:
    h = key_hash(key)
    return np.random.default_rng([seed & 0xFFFFFFFF, stage, SOURCE_IDS[source], h & 0xFFFFFFFF, h >> 32, draw])


class _LayoutTokenizer(InterleavedTokenizer):
    """Token layout only: images become slots; their pixels are prepared separately as
    uint8 here, so the float conversion in `encode` is skipped."""

    _PLACEHOLDER = np.zeros((1,), np.float32)

    def preprocess_image(self, image: Any) -> np.ndarray:
        return self._PLACEHOLDER


def _text(row: dict, name: str) -> str:
    value = row.get(name)
    if not isinstance(value, str) or not value.strip():
        raise SkipRecord("missing_field", name)
    return value


def _entity_span(caption: str, entity: dict) -> tuple[int, int, dict] | None:
    """(start, end, entity) of an entity in its caption; None for an unusable record.
    Spans that do not match the text (written by another tool) fall back to a search."""
    text = entity.get("text")
    if not isinstance(text, str) or not text:
        return None
    start, end = entity.get("start"), entity.get("end")
    if not (isinstance(start, int) and isinstance(end, int) and caption[start:end] == text):
        start = caption.find(text)
        end = start + len(text)
    return (start, end, entity) if start >= 0 else None


def decode(data: bytes | None, size: int, fast: bool = True) -> Any:
    """A record's image (PIL), decoded at reduced scale when `fast` and it is larger than
    `size`; a missing or broken one is a SkipRecord."""
    if data is None:
        raise SkipRecord("missing_field", "image")
    try:
        return imaging.decode_image(data, min_side=size if fast else None)
    except imaging.ImageDecodeError as error:
        raise SkipRecord("decode_error", str(error)) from error


def target_pixels(data: bytes | None, size: int, min_side: int = 0, fast: bool = True) -> bytes:
    """A stage-3 target as uint8 (3, size, size) bytes; shorter than `min_side` is a SkipRecord.
    The training stream and pipelines/precompute.py both make their targets here."""
    image = decode(data, max(size, min_side), fast)
    if min(image.size) < min_side:
        raise SkipRecord("too_small", f"{image.size}")
    return np.asarray(resize_center_crop(image, size)).transpose(2, 0, 1).tobytes()


class Preprocessor:
    """Ray Data UDF: blended shard rows (pyarrow) -> example rows (OUTPUT_SCHEMA)."""

    def __init__(self, stage: int, data: Any, model: ModelConfig):
        if stage not in (1, 2, 3):
            raise ValueError(f"stage must be 1, 2 or 3, got {stage}")
        self.stage, self.data, self.model = stage, data, model
        self.tokenizer = _LayoutTokenizer.from_model_config(localize(model, ("tokenizer",)))
        self.clip_size = model.mllm.vision.image_size
        self.vae_size = model.image_decoder.image_size
        self.skips = SkipRecorder(data.skip_counter)
        self.clip_tokenizer = None  # stage 2's caption filter builds it on first use

    # ---------------------------------------------------------------- images

    def _decode(self, data: bytes | None, size: int) -> Any:
        return decode(data, size, self.data.fast_decode)

    def _clip_image(self, data: bytes | None):
        return self._decode(data, self.clip_size)

    def _target(self, row: dict, column: str) -> tuple[bytes | None, bytes | None]:
        """(uint8 target pixels, None), or (None, precomputed VAE posterior) when the row has one."""
        if row.get("target_latents") is not None:
            return None, row["target_latents"]
        if row.get("target_skip"):  # precompute skipped it, for the reason it kept
            raise SkipRecord(row["target_skip"], "(precomputed)")
        return target_pixels(row.get(column), self.vae_size, self.data.min_image_side, self.data.fast_decode), None

    # -------------------------------------------------------------- segments

    def _compositional(self, row: dict, rng: np.random.Generator, drop_p: float, info: dict) -> list:
        caption = _text(row, "caption")
        entities = sorted((span for entity in row.get("entities") or []
                           if (span := _entity_span(caption, entity)) is not None), key=lambda s: s[:2])
        if not entities:
            raise SkipRecord("no_entities")
        segments: list = []
        position = 0
        # As released: one draw per example decides whether every entity's words are dropped
        # (the model then sees only the images where the words were), not one draw per entity.
        drop_text = rng.random() < drop_p
        for start, end, entity in entities[: self.data.max_entity_images]:
            # The draw happens for every entity so later choices never shift.
            keep_background = rng.random() < self.data.keep_background_p
            if start < position:
                continue  # overlaps the previous entity
            segments.append(caption[position:start] + ("" if drop_text else caption[start:end]))
            segments.append(self._entity_image(entity, keep_background, rng))
            info["n_entities"] += 1
            info["n_entity_text_dropped"] += int(drop_text)
            info["n_background_kept"] += int(keep_background)
            position = end
        segments.append(caption[position:])
        return segments

    def _entity_image(self, entity: dict, keep_background: bool, rng: np.random.Generator) -> Any:
        # Shards may hold only one variant (construct.py can switch either off).
        chosen, other = ("crop", "crop_nobg") if keep_background else ("crop_nobg", "crop")
        if entity.get(chosen) is None:
            chosen = other
        image = self._clip_image(entity.get(chosen))
        if chosen == "crop_nobg" and self.data.removed_background != "white" and entity.get("crop") is not None:
            removed = imaging.removed_pixels(self._clip_image(entity["crop"]), image)
            image = imaging.refill_background(image, removed, self._fill_colour(image, removed, rng))
        return image

    def _fill_colour(self, crop_nobg: Any, removed: np.ndarray, rng: np.random.Generator) -> tuple[int, ...]:
        """"random": any colour; "colours": one of `fill_colours` unlike the entity's own (its
        median kept pixel), so the entity never vanishes into its new background."""
        if self.data.removed_background == "random":
            return tuple(int(c) for c in rng.integers(0, 256, size=3))
        kept = np.asarray(crop_nobg.convert("RGB")).reshape(-1, 3)[~removed.reshape(-1)]
        entity = np.median(kept, axis=0) if len(kept) else np.full(3, -1000.0)
        unlike = [c for c in self.data.fill_colours if np.abs(np.asarray(c) - entity).max() > FILL_MARGIN]
        choices = unlike or list(self.data.fill_colours)
        return tuple(int(v) for v in choices[int(rng.integers(len(choices)))])

    def _check_caption_lengths(self, caption: str) -> None:
        if len(self.tokenizer.text.encode(caption)) > self.data.stage2_max_text_tokens:
            raise SkipRecord("caption_too_long", f"over {self.data.stage2_max_text_tokens} MLLM tokens")
        if self.clip_tokenizer is None:
            from kosmos_g.models.image_decoder import load_clip_tokenizer

            self.clip_tokenizer = load_clip_tokenizer(localize(self.model, ("image_decoder",)).image_decoder)
        if len(self.clip_tokenizer.tokenize(caption)) > self.data.stage2_max_clip_tokens:
            raise SkipRecord("caption_too_long_for_clip", f"over {self.data.stage2_max_clip_tokens} CLIP tokens")

    def _segments(self, source: str, row: dict, rng: np.random.Generator, info: dict) -> tuple[list, tuple, str]:
        """(prompt segments, (target pixels, target latents) as `_target` or (None, None), caption
        text) for one record."""
        stage, data = self.stage, self.data
        if stage == 2:
            caption = _text(row, "caption")
            self._check_caption_lengths(caption)
            return [caption], (None, None), caption
        if source == "captions":
            caption = _text(row, "caption")
            if stage == 1:
                if rng.random() < data.stage1_text_only_p:
                    return [caption], (None, None), caption
                return [self._clip_image(row.get("image")), caption], (None, None), caption
            return [caption], self._target(row, "image"), caption
        if source == "compositional":
            drop_p = data.drop_entity_text_p if stage == 3 else 0.0
            segments = self._compositional(row, rng, drop_p, info)
            target = self._target(row, "image") if stage == 3 else (None, None)
            return segments, target, row["caption"]
        # editing (stage 3 only): "<s> caption <image> input </image> instruction </s>"
        instruction = _text(row, "instruction")
        caption = row.get("input_caption") or ""
        info["input_caption_dropped"] = bool(rng.random() < data.drop_input_caption_p) or not caption.strip()
        segments = ([] if info["input_caption_dropped"] else [caption])
        segments += [self._clip_image(row.get("input_image")), instruction]
        return segments, self._target(row, "edited_image"), caption

    # ------------------------------------------------------------------ rows

    def example(self, row: dict) -> dict:
        source, key, draw = row["source"], row["key"], int(row["draw"])
        rng = example_rng(self.data.seed, self.stage, source, key, draw)
        info = {"n_entities": 0, "n_entity_text_dropped": 0, "n_background_kept": 0, "input_caption_dropped": False}
        segments, (target, latents), caption = self._segments(source, row, rng, info)
        encoded = self.tokenizer.encode(segments)
        n_images = int(encoded["image_mask"].sum()) // self.tokenizer.image_tokens
        images = [s for s in segments if not isinstance(s, str)][:n_images]
        pixels = b"".join(np.asarray(resize_center_crop(image, self.clip_size)).transpose(2, 0, 1).tobytes()
                          for image in images)
        return {
            "source": source, "key": key, "draw": draw,
            "input_ids": encoded["input_ids"].astype(np.int32), "image_mask": encoded["image_mask"],
            "loss_mask": encoded["loss_mask"], "n_images": n_images, "clip_pixels": pixels,
            "caption": caption, "target_pixels": target, "target_latents": latents,
            "teacher": row.get("teacher") if self.stage == 2 else None, **info,
            "doc_lengths": [len(encoded["input_ids"])],
        }

    def __call__(self, table: pa.Table) -> pa.Table:
        examples, skipped = [], {}
        for row in table.to_pylist():
            try:
                examples.append(self.example(row))
            except SkipRecord as skip:
                skipped[skip.reason] = skipped.get(skip.reason, 0) + 1
        self.skips.record(skipped)
        columns = {name: [e[name] for e in examples] for name in OUTPUT_SCHEMA.names}
        return pa.table({name: pa.array(values, type=OUTPUT_SCHEMA.field(name).type)
                         for name, values in columns.items()}, schema=OUTPUT_SCHEMA)


# ---------------------------------------------------------------- collation


class StreamCollator(NumpyBatchCollateFn):
    """`collate_fn` for `iter_torch_batches`: a numpy batch of example rows -> the model
    batch dict (input_ids, attention_mask, image_mask, loss_mask, pixel_values), plus
    `captions` (stage 2) and `target_pixels` (stage 3, (B, 3, H, H) in [-1, 1])."""

    def __init__(self, stage: int, model: ModelConfig):
        self.stage = stage
        self.model = model
        self.clip_size = model.mllm.vision.image_size
        self.vae_size = model.image_decoder.image_size
        self.mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
        self.std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
        self._layout = None  # the tokenizer, built in the process that collates

    def tokenizer(self) -> InterleavedTokenizer:
        # Once per process, from the vocabulary's paths alone: collation runs at every step, and
        # localizing the whole config there asked the registry each time and downloaded a
        # `runs:/` decoder's weights again at every step (docs/REPRODUCTION.md, 2026-12-07).
        if self._layout is None:
            self._layout = InterleavedTokenizer.from_model_config(localize(self.model, ("tokenizer",)))
        return self._layout

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_layout": None}  # travels to the workers without it

    def _clip(self, raw: bytes | None, count: int) -> torch.Tensor:
        size = self.clip_size
        if not count:
            return torch.zeros(0, 3, size, size)
        array = np.frombuffer(raw, dtype=np.uint8).reshape(count, 3, size, size)
        # Same operations, in the same order, as models.images.clip_preprocess.
        return (torch.from_numpy(array.copy()).float() / 255.0 - self.mean) / self.std

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        examples = []
        for i in range(len(batch["input_ids"])):
            examples.append({
                "input_ids": np.asarray(batch["input_ids"][i], dtype=np.int64),
                "image_mask": np.asarray(batch["image_mask"][i], dtype=bool),
                "loss_mask": np.asarray(batch["loss_mask"][i], dtype=bool),
                "pixel_values": self._clip(batch["clip_pixels"][i], int(batch["n_images"][i])),
            })
        out = self.tokenizer().collate(examples)
        if self.stage == 1 and any(len(lengths) > 1 for lengths in batch["doc_lengths"]):
            from kosmos_g.platform.data.packing import document_ids

            lengths = [list(map(int, lengths)) for lengths in batch["doc_lengths"]]
            out["document_ids"] = torch.from_numpy(document_ids(lengths, out["input_ids"].shape[1]))
        if self.stage == 2:
            out["captions"] = [str(caption) for caption in batch["caption"]]
            if _all_present(batch, "teacher"):
                out["teacher"] = _stacked(batch["teacher"])
        if self.stage == 3 and _all_present(batch, "target_latents"):
            out["target_moments"] = _stacked(batch["target_latents"])
        elif self.stage == 3:
            size = self.vae_size
            targets = np.stack([np.frombuffer(raw, dtype=np.uint8).reshape(3, size, size)
                                for raw in batch["target_pixels"]])
            out["target_pixels"] = torch.from_numpy(targets).float() / 255.0 * 2.0 - 1.0
        return out


def _all_present(batch: dict[str, np.ndarray], column: str) -> bool:
    return column in batch and all(value is not None for value in batch[column])


def _stacked(values) -> torch.Tensor:
    """.npy bytes per row (precompute.py) -> one (B, ...) tensor of their dtype."""
    from kosmos_g.platform.data.precomputed import stack_npy

    return torch.from_numpy(stack_npy(values))
