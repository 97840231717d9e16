"""Classifier-free-guidance sampling for several requests at once, sharing U-Net passes.

Requests with the same group key (size, steps, scheduler, ControlNet or not) denoise
together: each step runs the U-Net (and ControlNet) once on [uncond; cond] rows of every
request. Everything that makes an image depend on its seed stays per request: each has
its own `torch.Generator` (initial latents and any scheduler noise) and its own scheduler
instance, and guidance/control scales are per row. This is the loop of diffusers'
StableDiffusion(ControlNet)Pipeline, step for step, so one request alone gives the
pipeline's image; in a batch it can differ only by float reduction order (~1e-6).

Plain PyTorch/diffusers on the frozen ImageDecoder; the Ray deployment is serve/denoiser.py.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace

import torch
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from kosmos_g.models.generation import make_scheduler


@dataclass
class SampleJob:
    cond: torch.Tensor  # (condition_length, condition_dim)
    uncond: torch.Tensor
    num_images: int
    steps: int
    guidance_scale: float
    scheduler: str
    seed: int
    height: int
    width: int
    control: Image.Image | None = None
    control_scale: float = 1.0
    # Called as on_step(done, total) after each denoising step (from the compute thread).
    on_step: Callable[[int, int], None] | None = None


def group_key(job: SampleJob) -> tuple:
    """Jobs with equal keys can share every U-Net forward pass."""
    return (job.height, job.width, job.steps, job.scheduler, job.control is not None)


def _rows(jobs: list[SampleJob], counts: list[int], field: str) -> torch.Tensor:
    """One condition row per image: each job's `field` repeated num_images times."""
    return torch.cat([getattr(job, field)[None].expand(n, -1, -1) for job, n in zip(jobs, counts)])


class Sampler:
    def __init__(self, decoder, controlnet=None):
        self.decoder = decoder
        self.unet = decoder.unet
        self.vae = decoder.vae
        self.controlnet = controlnet
        self.vae_scale_factor = decoder.vae_scale_factor
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)
        self.control_processor = VaeImageProcessor(
            vae_scale_factor=self.vae_scale_factor, do_convert_rgb=True, do_normalize=False)
        # make_scheduler reads the training noise schedule from `model.image_decoder`.
        self._scheduler_source = SimpleNamespace(image_decoder=decoder)

    @property
    def native_size(self) -> int:
        return self.vae_scale_factor * self.unet.config.sample_size

    def scheduler(self, name: str):
        return make_scheduler(self._scheduler_source, name)

    @torch.no_grad()
    def sample(self, jobs: list[SampleJob]) -> list[list[Image.Image]]:
        """Images for every job (all with one group key), job order kept."""
        if len({group_key(job) for job in jobs}) != 1:
            raise ValueError("jobs in one sampling group must share size, steps, scheduler and control")
        latents = self.denoise(jobs)
        images = self.decode(torch.cat(latents))
        out, start = [], 0
        for job in jobs:
            out.append(images[start:start + job.num_images])
            start += job.num_images
        return out

    @torch.no_grad()
    def denoise(self, jobs: list[SampleJob]) -> list[torch.Tensor]:
        """Final latents per job."""
        first = jobs[0]
        device, dtype = self.unet.device, self.unet.dtype
        counts = [job.num_images for job in jobs]
        generators = [torch.Generator("cpu").manual_seed(job.seed) for job in jobs]
        schedulers = [self.scheduler(job.scheduler) for job in jobs]
        for scheduler in schedulers:
            scheduler.set_timesteps(first.steps, device=device)
        latents = [self._initial_latents(job, g, s) for job, g, s in zip(jobs, generators, schedulers)]
        hidden = torch.cat([_rows(jobs, counts, "uncond"), _rows(jobs, counts, "cond")]).to(device, dtype)
        guidance = torch.tensor([j.guidance_scale for j in jobs], device=device, dtype=dtype)
        guidance = guidance.repeat_interleave(torch.tensor(counts, device=device)).view(-1, 1, 1, 1)
        control = self._control_rows(jobs, counts, device, dtype) if first.control is not None else None
        step_kwargs = [self._step_kwargs(s, g) for s, g in zip(schedulers, generators)]
        timesteps = schedulers[0].timesteps
        for done, t in enumerate(timesteps, start=1):
            scaled = torch.cat([s.scale_model_input(x, t) for s, x in zip(schedulers, latents)])
            noise = self._guided_noise(torch.cat([scaled, scaled]), t, hidden, guidance, control)
            latents = [
                s.step(eps, t, x, return_dict=False, **kw)[0]
                for s, eps, x, kw in zip(schedulers, noise.split(counts), latents, step_kwargs)
            ]
            for job in jobs:
                if job.on_step is not None:
                    job.on_step(done, len(timesteps))
        return latents

    def _initial_latents(self, job: SampleJob, generator: torch.Generator, scheduler) -> torch.Tensor:
        # As the pipeline's prepare_latents: one draw of all this request's images from its generator.
        f = self.vae_scale_factor
        shape = (job.num_images, self.unet.config.in_channels, job.height // f, job.width // f)
        noise = randn_tensor(shape, generator=generator, device=self.unet.device, dtype=self.unet.dtype)
        return noise * scheduler.init_noise_sigma

    @staticmethod
    def _step_kwargs(scheduler, generator) -> dict:
        accepted = inspect.signature(scheduler.step).parameters
        kwargs = {}
        if "eta" in accepted:
            kwargs["eta"] = 0.0
        if "generator" in accepted:
            kwargs["generator"] = generator
        return kwargs

    def _control_rows(self, jobs, counts, device, dtype):
        """(control images for [uncond; cond] rows, per-row conditioning scales)."""
        if self.controlnet is None:
            raise ValueError("a control image needs a ControlNet")
        images = [
            self.control_processor.preprocess(job.control, height=job.height, width=job.width)
            .to(torch.float32).repeat_interleave(n, dim=0)
            for job, n in zip(jobs, counts)
        ]
        image = torch.cat(images).to(device, dtype)
        scales = torch.tensor([j.control_scale for j in jobs], device=device, dtype=dtype)
        scales = scales.repeat_interleave(torch.tensor(counts, device=device)).view(-1, 1, 1, 1)
        return torch.cat([image, image]), torch.cat([scales, scales])

    def _guided_noise(self, model_input, t, hidden, guidance, control) -> torch.Tensor:
        residuals = {}
        if control is not None:
            image, scales = control
            # Scale 1 here and per row below: requests in one pass may ask for different scales.
            down, mid = self.controlnet(model_input, t, encoder_hidden_states=hidden, controlnet_cond=image,
                                        conditioning_scale=1.0, guess_mode=False, return_dict=False)
            residuals = dict(down_block_additional_residuals=[d * scales for d in down],
                             mid_block_additional_residual=mid * scales)
        eps = self.unet(model_input, t, encoder_hidden_states=hidden, return_dict=False, **residuals)[0]
        uncond, cond = eps.chunk(2)
        # The pipeline skips guidance at scale <= 1 and uses the conditional prediction alone.
        return torch.where(guidance > 1, uncond + guidance * (cond - uncond), cond)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> list[Image.Image]:
        pixels = self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False)[0]
        return self.image_processor.postprocess(pixels, output_type="pil", do_denormalize=[True] * len(pixels))
