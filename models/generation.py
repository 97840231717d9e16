"""Sampling: Kosmos-G conditions as `prompt_embeds` for stock diffusers pipelines.

Kosmos-G replaces only SD's CLIP text encoder, so the pipelines are built with
`text_encoder=None, tokenizer=None` and receive conditions (and the unconditional branch,
encoded through the same MLLM + AlignerNet path) directly. Anything that works on the U-Net
(ControlNet, LoRA adapters, `pipe.load_lora_weights(...)`) keeps working.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    StableDiffusionControlNetPipeline,
    StableDiffusionPipeline,
)
from PIL import Image

SCHEDULERS = {
    "dpm++": DPMSolverMultistepScheduler,
    "ddim": DDIMScheduler,
    "euler": EulerDiscreteScheduler,
    "ddpm": DDPMScheduler,
}
DEFAULT_STEPS = 50
DEFAULT_GUIDANCE = 6.0


def make_scheduler(model, name: str = "dpm++"):
    """A sampling scheduler sharing the training noise schedule (betas, prediction type)."""
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {sorted(SCHEDULERS)}")
    extra = {"algorithm_type": "dpmsolver++"} if name == "dpm++" else {}
    return SCHEDULERS[name].from_config(model.image_decoder.noise_scheduler.config, **extra)


def build_pipeline(model, scheduler: str = "dpm++", controlnet=None):
    """StableDiffusion(ControlNet)Pipeline over the model's frozen U-Net and VAE."""
    decoder = model.image_decoder
    parts = dict(
        vae=decoder.vae, text_encoder=None, tokenizer=None, unet=decoder.unet,
        scheduler=make_scheduler(model, scheduler), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    if controlnet is None:
        pipe = StableDiffusionPipeline(**parts)
    else:
        pipe = StableDiffusionControlNetPipeline(controlnet=controlnet, **parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def add_lora(unet, rank: int = 4, alpha: int | None = None,
             target_modules: Sequence[str] = ("to_q", "to_k", "to_v", "to_out.0"),
             adapter_name: str = "default"):
    """Attach a peft LoRA adapter to a U-Net (its `lora_B` starts at zero: no effect until trained)."""
    from peft import LoraConfig

    config = LoraConfig(r=rank, lora_alpha=alpha or rank, init_lora_weights="gaussian",
                        target_modules=list(target_modules))
    unet.add_adapter(config, adapter_name=adapter_name)
    return unet


def _as_prompt(prompt: Any) -> list:
    if isinstance(prompt, str):
        from .prompt import parse_prompt

        return parse_prompt(prompt, [])
    if not isinstance(prompt, (list, tuple)):
        raise TypeError(
            f"each prompt is text or a list of segments, got {type(prompt).__name__}; "
            "pass one interleaved prompt as [segments]"
        )
    return list(prompt)


def generate(model, prompts: Sequence[Any], negative_prompt: Any = None, steps: int = DEFAULT_STEPS,
             guidance_scale: float = DEFAULT_GUIDANCE, scheduler: str = "dpm++", seed: int | None = None,
             height: int | None = None, width: int | None = None, num_images: int = 1,
             control_image: Any = None, controlnet=None, pipeline=None) -> list[Image.Image]:
    """Images for interleaved prompts: `len(prompts) * num_images` PIL images, prompt-major.

    `prompts`: a list; each item is text (no placeholders) or a segment list from
    `parse_prompt`. `negative_prompt` (text or segments) replaces the bare `<s>` condition
    of the unconditional branch. Pass a `pipeline` from `build_pipeline` to reuse it.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = [_as_prompt(p) for p in prompts]
    if not prompts:
        raise ValueError("no prompts given")
    if control_image is not None and controlnet is None and not isinstance(pipeline, StableDiffusionControlNetPipeline):
        raise ValueError("control_image needs a controlnet")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            cond = model.encode_prompts(prompts)
            if negative_prompt is None:
                neg = model.empty_condition(len(prompts))
            else:
                neg = model.encode_prompts([_as_prompt(negative_prompt)] * len(prompts))
    finally:
        model.train(was_training)
    pipe = pipeline or build_pipeline(model, scheduler, controlnet)
    dtype = model.image_decoder.dtype
    generator = torch.Generator("cpu").manual_seed(seed) if seed is not None else None
    kwargs = dict(
        prompt_embeds=cond.to(dtype), negative_prompt_embeds=neg.to(dtype).contiguous(),
        num_inference_steps=steps, guidance_scale=guidance_scale, height=height, width=width,
        num_images_per_prompt=num_images, generator=generator, output_type="pil",
    )
    if control_image is not None:
        kwargs["image"] = control_image
    return pipe(**kwargs).images
