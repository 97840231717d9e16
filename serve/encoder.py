"""Encoder deployment: MLLM + AlignerNet M turn prompts into U-Net conditions.

Concurrent requests are batched with `@serve.batch`, and batches that queue up while the
model is busy are merged into one model call (runtime.Coalescer). Image encodings are
cached by content hash (serve/encoding.py).
"""

from __future__ import annotations

import threading

from ray import serve

from kosmos_g.serve.messages import Conditioning, EncodeRequest
from kosmos_g.serve.runtime import MAX_WAITING_BATCHES, BatchStats, Coalescer, pick_device


@serve.deployment(name="Encoder")
class Encoder:
    def __init__(self, model_uri: str, max_batch_size: int, batch_wait_s: float, cache_size: int,
                 max_image_pixels: int):
        from kosmos_g.serve.encoding import ConditionEncoder
        from kosmos_g.platform.weights import load_bundle
        from kosmos_g.serve.model_source import local_model_dir

        self.device = pick_device()
        model = load_bundle(local_model_dir(model_uri), device=self.device)
        # This replica never denoises: drop the U-Net, VAE and CLIP text teacher.
        model.image_decoder = None
        self.encoder = ConditionEncoder(model, cache_size=cache_size, max_image_pixels=max_image_pixels)
        self.encode_batch.set_max_batch_size(max_batch_size)
        self.encode_batch.set_batch_wait_timeout_s(batch_wait_s)
        self.coalescer = Coalescer(self._compute, max_batch_size)
        self.lock = threading.Lock()  # the encoder and its cache are used by one thread at a time
        self.stats = BatchStats()

    async def encode(self, request: EncodeRequest) -> Conditioning:
        result = await self.encode_batch(request)
        if isinstance(result, BaseException):
            raise result
        return result

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01, max_concurrent_batches=MAX_WAITING_BATCHES)
    async def encode_batch(self, requests: list[EncodeRequest]) -> list:
        return await self.coalescer.submit(requests)

    def _compute(self, requests: list[EncodeRequest]) -> list:
        with self.lock:
            self.stats.record_batch(len(requests))
            try:
                results = self.encoder.encode(requests)
            except Exception as error:
                if len(requests) == 1:
                    return [error]
                # One bad request must not fail the others it was batched with.
                results = [self._encode_alone(request) for request in requests]
        for result in results:
            if isinstance(result, Conditioning):
                self.stats.add("cache_hits", result.cache_hits)
                self.stats.add("cache_misses", result.cache_misses)
        return results

    def _encode_alone(self, request: EncodeRequest):
        try:
            return self.encoder.encode([request])[0]
        except Exception as error:
            return error

    def info(self) -> dict:
        import torch

        return {"condition_shape": list(self.encoder.condition_shape), "device": self.device,
                "cache_capacity": self.encoder.cache.capacity, "torch_threads": torch.get_num_threads()}

    def get_stats(self) -> dict:
        return {**self.stats.snapshot(), "cache_entries": len(self.encoder.cache)}
