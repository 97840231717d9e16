"""Prompts -> U-Net conditions, batched, with image encodings cached by content hash.

An image's encoding (CLIP vision tower + resampler: `image_tokens` embeddings) depends only
on its pixels, so it is computed once per distinct upload and reused when a subject comes
back in later requests. The rest of the path (decoder over the interleaved sequence, then
AlignerNet M) runs for the whole batch at once.

Plain PyTorch on a loaded `KosmosG`; the Ray deployment lives in serve/encoder.py.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
import torch

from kosmos_g.serve.inputs import decode_image
from kosmos_g.serve.messages import Conditioning, EncodeRequest, ImageInput


class LRUCache:
    def __init__(self, capacity: int):
        self.capacity = capacity
        self._items: OrderedDict[str, torch.Tensor] = OrderedDict()

    def get(self, key: str) -> torch.Tensor | None:
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    def put(self, key: str, value: torch.Tensor) -> None:
        if self.capacity <= 0:
            return
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)


class ConditionEncoder:
    """Wraps a KosmosG (eval mode) for serving; not thread-safe (one batch at a time)."""

    def __init__(self, model, cache_size: int = 256, max_image_pixels: int | None = None):
        self.model = model.eval()
        self.tokenizer = model.tokenizer
        self.cache = LRUCache(cache_size)
        self.max_image_pixels = max_image_pixels
        with torch.no_grad():
            # The bare `<s>` encoding: the unconditional branch when no negative prompt is given.
            self.empty = model.empty_condition(1)[0].float().cpu().numpy()
        # Stand-in pixels for images whose encoding is cached: the tokenizer only needs the shape.
        size = self.tokenizer.image_size
        self._stand_in = torch.zeros(3, size, size)

    @property
    def condition_shape(self) -> tuple[int, int]:
        return tuple(self.empty.shape)

    @torch.no_grad()
    def encode(self, requests: Sequence[EncodeRequest]) -> list[Conditioning]:
        start = time.perf_counter()
        hits, misses, table = self._image_table(requests)
        prompts = [list(r.segments) for r in requests]
        negatives = [i for i, r in enumerate(requests) if r.negative_prompt]
        prompts += [[requests[i].negative_prompt] for i in negatives]
        conditions = self._encode_prompts(prompts, table).float().cpu().numpy()
        uncond = {i: conditions[len(requests) + k] for k, i in enumerate(negatives)}
        elapsed = time.perf_counter() - start
        return [
            Conditioning(cond=conditions[i], uncond=uncond.get(i, self.empty), batch_size=len(requests),
                         cache_hits=hits[i], cache_misses=misses[i], compute_s=elapsed)
            for i in range(len(requests))
        ]

    def _image_table(self, requests: Sequence[EncodeRequest]):
        """(hits, misses, {digest: embedding}) for every image in the batch: cached ones looked
        up, the others encoded (each distinct one once) and cached. The table, not the cache,
        feeds the prompts, so a batch with more images than the cache holds still works."""
        hits, misses = [0] * len(requests), [0] * len(requests)
        table: dict[str, torch.Tensor] = {}
        pending: dict[str, bytes] = {}
        for i, request in enumerate(requests):
            for segment in request.segments:
                if not isinstance(segment, ImageInput):
                    continue
                if segment.digest in table or segment.digest in pending:
                    hits[i] += 1
                    continue
                cached = self.cache.get(segment.digest)
                if cached is not None:
                    hits[i] += 1
                    table[segment.digest] = cached
                else:
                    misses[i] += 1
                    pending[segment.digest] = segment.data
        if pending:
            pixels = np.stack([
                self.tokenizer.preprocess_image(decode_image(data, self.max_image_pixels))
                for data in pending.values()
            ])
            embeds = self._image_embeddings(torch.from_numpy(pixels))
            for digest, embed in zip(pending, embeds):
                self.cache.put(digest, embed)
                table[digest] = embed
        return hits, misses, table

    def _image_embeddings(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) CLIP pixels -> (N, image_tokens, dim), as MLLM.embed computes them."""
        mllm = self.model.mllm
        dtype = next(mllm.vision.parameters()).dtype
        return mllm.resampler(mllm.vision(pixels.to(self.model.device, dtype)))

    def _encode_prompts(self, prompts: list[list], table: dict[str, torch.Tensor]) -> torch.Tensor:
        """Like KosmosG.encode_prompts, with image slots filled from `table`."""
        keys: list[list[str]] = []
        examples = []
        for segments in prompts:
            digests = [s.digest for s in segments if isinstance(s, ImageInput)]
            tokens = [self._stand_in if isinstance(s, ImageInput) else s for s in segments]
            example = self.tokenizer.encode(tokens)
            # The tokenizer drops trailing images that do not fit max_length: keep the same ones.
            keys.append(digests[: example["pixel_values"].shape[0]])
            examples.append(example)
        batch = self.tokenizer.collate(examples)
        device = self.model.device
        ids = batch["input_ids"].to(device)
        attention = batch["attention_mask"].to(device)
        image_mask = batch["image_mask"].to(device)
        decoder = self.model.mllm.decoder
        embeds = decoder.embed_tokens(ids)
        digests = [d for row in keys for d in row]
        if digests:
            image_embeds = torch.cat([table[d] for d in digests]).to(device, embeds.dtype)
            # masked_scatter fills slots row-major: images in order of appearance, as in MLLM.embed.
            embeds = embeds.masked_scatter(image_mask[..., None], image_embeds)
        hidden = decoder(embeds, attention)
        return self.model.aligner.encode(hidden, self.tokenizer.condition_mask(ids, attention))
