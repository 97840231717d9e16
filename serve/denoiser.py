"""Denoiser deployment: frozen U-Net + scheduler + VAE decode, with classifier-free guidance.

`@serve.batch` gathers concurrent requests, and batches that queue up while the model is busy
are merged into one model call (runtime.Coalescer). In that call, requests whose adapter,
size, step count, scheduler and ControlNet use match share every U-Net pass
(serve/sampling.py); the others run as separate groups. LoRA adapters are chosen per
request with `serve.multiplexed` (Serve routes a request to a replica that has its adapter).
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import threading
import time
import uuid
from collections import defaultdict

from ray import serve

from kosmos_g.serve.messages import DenoiseRequest, DenoiseResult, RequestError
from kosmos_g.serve.runtime import MAX_WAITING_BATCHES, BatchStats, Coalescer, pick_device

MAX_ADAPTERS_PER_REPLICA = 4


class _LoadedAdapter:
    """What the multiplex cache holds; eviction takes the adapter out of the U-Net."""

    def __init__(self, weights, owner: "Denoiser"):
        self.weights = weights
        self._owner = owner

    def __del__(self):
        # Called by Serve on eviction, and again by the garbage collector: act once.
        owner, self._owner = getattr(self, "_owner", None), None
        if owner is not None:
            owner.evict_adapter(self.weights.name)


def _key(job) -> tuple:
    from kosmos_g.serve.sampling import group_key

    return group_key(job)


def _chunks(members: list[int], jobs: dict, max_images: int) -> list[list[int]]:
    """Split a group so no shared pass carries more than `max_images` images."""
    chunks, current, count = [], [], 0
    for i in members:
        n = jobs[i].num_images
        if current and count + n > max_images:
            chunks.append(current)
            current, count = [], 0
        current.append(i)
        count += n
    if current:
        chunks.append(current)
    return chunks


def _png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _load_decoder(model_uri: str, device: str):
    """Only the frozen image decoder of the bundle: this replica never runs the MLLM."""
    from kosmos_g.models.image_decoder import ImageDecoder
    from kosmos_g.platform.weights import bundle_config
    from kosmos_g.serve.model_source import local_model_dir

    config = bundle_config(local_model_dir(model_uri))
    return ImageDecoder(config.image_decoder).to(device)


def _load_controlnet(uri: str, decoder):
    from diffusers import ControlNetModel

    from kosmos_g.platform import storage

    controlnet = ControlNetModel.from_pretrained(str(storage.local_dir(uri)))
    return controlnet.to(decoder.unet.device, decoder.unet.dtype).eval().requires_grad_(False)


# Serve pickles a deployment class when it is decorated: every helper it uses
# must already exist, so the class comes last in this module.
@serve.deployment(name="Denoiser")
class Denoiser:
    def __init__(self, model_uri: str, max_batch_size: int, batch_wait_s: float, max_group_images: int,
                 max_image_pixels: int, controlnet_uri: str | None = None, lora_prefix: str | None = None):
        from kosmos_g.serve.adapters import AdapterSlots
        from kosmos_g.serve.sampling import Sampler

        self.device = pick_device()
        decoder = _load_decoder(model_uri, self.device)
        controlnet = _load_controlnet(controlnet_uri, decoder) if controlnet_uri else None
        self.sampler = Sampler(decoder, controlnet)
        self.adapters = AdapterSlots(decoder.unet)
        self.lora_prefix = lora_prefix
        self.max_group_images = max_group_images
        self.max_image_pixels = max_image_pixels
        # One model call at a time; adapter installs/evictions wait for it.
        self.lock = threading.Lock()
        self.generate_batch.set_max_batch_size(max_batch_size)
        self.generate_batch.set_batch_wait_timeout_s(batch_wait_s)
        self.coalescer = Coalescer(self._run, max_batch_size)
        self.stats = BatchStats()
        # progress_id -> on_step callback of a streaming request waiting in this replica.
        self.step_listeners: dict = {}

    async def generate(self, request: DenoiseRequest) -> DenoiseResult:
        result = await self.generate_batch((request, time.perf_counter()))
        if isinstance(result, BaseException):
            raise result
        return result

    async def generate_stream(self, request: DenoiseRequest):
        """`generate`, yielding {"step": done, "steps": total} after every denoising step and
        then the DenoiseResult (call with `handle.options(stream=True)`)."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        progress_id = uuid.uuid4().hex
        self.step_listeners[progress_id] = lambda done, total: loop.call_soon_threadsafe(
            events.put_nowait, {"step": done, "steps": total})
        work = asyncio.ensure_future(self.generate(dataclasses.replace(request, progress_id=progress_id)))
        try:
            while not work.done():
                waiter = asyncio.ensure_future(events.get())
                await asyncio.wait([work, waiter], return_when=asyncio.FIRST_COMPLETED)
                if waiter.done():
                    yield waiter.result()
                else:
                    waiter.cancel()
            while not events.empty():
                yield events.get_nowait()
            yield work.result()
        finally:
            self.step_listeners.pop(progress_id, None)
            work.cancel()

    @serve.multiplexed(max_num_models_per_replica=MAX_ADAPTERS_PER_REPLICA)
    async def get_adapter(self, name: str) -> _LoadedAdapter:
        from kosmos_g.serve.adapters import fetch_adapter

        if not self.lora_prefix:
            raise RequestError(400, "lora: this server has no LoRA adapters configured")
        weights = await asyncio.to_thread(fetch_adapter, self.lora_prefix, name)
        return _LoadedAdapter(weights, self)

    def evict_adapter(self, name: str) -> None:
        with self.lock:
            self.adapters.remove(name)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01, max_concurrent_batches=MAX_WAITING_BATCHES)
    async def generate_batch(self, items: list[tuple[DenoiseRequest, float]]) -> list:
        # Serve splits batches by multiplexed model id: one adapter (or none) per Serve batch.
        name = serve.get_multiplexed_model_id()
        try:
            adapter = (await self.get_adapter(name)).weights if name else None
        except Exception as error:
            return [error] * len(items)
        return await self.coalescer.submit([(request, arrived, adapter) for request, arrived in items])

    def _run(self, items: list[tuple]) -> list:
        """One model call: group by adapter and shape, share U-Net passes within a group."""
        self.stats.record_batch(len(items))
        results: list = [None] * len(items)
        groups: dict[tuple, list[int]] = defaultdict(list)
        jobs, adapters = {}, {}
        for i, (request, _, adapter) in enumerate(items):
            try:
                jobs[i] = self._job(request)
            except Exception as error:
                results[i] = error
                continue
            name = adapter.name if adapter is not None else ""
            adapters[name] = adapter
            groups[(name, *_key(jobs[i]))].append(i)
        with self.lock:
            for key in sorted(groups, key=lambda k: k[0]):  # each adapter is switched on once
                members = groups[key]
                try:
                    self.adapters.activate(adapters[key[0]])
                except Exception as error:
                    for i in members:
                        results[i] = error
                    continue
                for chunk in _chunks(members, jobs, self.max_group_images):
                    self._run_group(chunk, jobs, items, results)
        return results

    def _run_group(self, members: list[int], jobs: dict, items: list, results: list) -> None:
        import torch

        self.stats.add("groups")
        self.stats.add(f"group_size_{len(members)}")
        try:
            t0 = time.perf_counter()
            latents = self.sampler.denoise([jobs[i] for i in members])
            t1 = time.perf_counter()
            images = iter(self.sampler.decode(torch.cat(latents)))  # one VAE pass for the group
            pngs = [[_png(next(images)) for _ in range(jobs[i].num_images)] for i in members]
            t2 = time.perf_counter()
        except Exception as error:
            for i in members:
                results[i] = error
            return
        for i, files in zip(members, pngs):
            job, arrived = jobs[i], items[i][1]
            results[i] = DenoiseResult(
                images=files, height=job.height, width=job.width, batch_size=len(items), group_size=len(members),
                queue_s=t0 - arrived, denoise_s=t1 - t0, decode_s=t2 - t1)
        self.stats.add("images", sum(len(files) for files in pngs))

    def _job(self, request: DenoiseRequest):
        import torch

        from kosmos_g.serve.inputs import decode_image
        from kosmos_g.serve.sampling import SampleJob

        native = self.sampler.native_size
        control = None
        if request.control_image is not None:
            if self.sampler.controlnet is None:
                raise RequestError(400, "control_image: this server has no ControlNet configured")
            control = decode_image(request.control_image, self.max_image_pixels)
        cond = request.conditioning
        return SampleJob(
            cond=torch.from_numpy(cond.cond), uncond=torch.from_numpy(cond.uncond),
            num_images=request.num_images, steps=request.steps, guidance_scale=request.guidance_scale,
            scheduler=request.scheduler, seed=request.seed, height=request.height or native,
            width=request.width or native, control=control, control_scale=request.control_scale,
            on_step=self.step_listeners.get(request.progress_id))

    def info(self) -> dict:
        import torch

        return {"native_size": self.sampler.native_size, "controlnet": self.sampler.controlnet is not None,
                "device": self.device, "adapters_installed": sorted(self.adapters.installed),
                "torch_threads": torch.get_num_threads()}

    def get_stats(self) -> dict:
        return self.stats.snapshot()
