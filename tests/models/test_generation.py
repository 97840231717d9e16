"""Kosmos-G conditions drive stock diffusers pipelines: plain, ControlNet, and LoRA-adapted U-Nets."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from kosmos_g.models.generation import SCHEDULERS, add_lora, build_pipeline, generate
from kosmos_g.models.prompt import parse_prompt

STEPS = 3


def _arrays(images: list[Image.Image]) -> list[np.ndarray]:
    return [np.asarray(im, dtype=np.int16) for im in images]


def _same(a: list[Image.Image], b: list[Image.Image]) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(_arrays(a), _arrays(b)))


def test_pipeline_is_stock_diffusers_without_text_encoder(tiny_model):
    from diffusers import StableDiffusionPipeline

    pipe = build_pipeline(tiny_model, "ddim")
    assert isinstance(pipe, StableDiffusionPipeline)
    assert pipe.text_encoder is None and pipe.tokenizer is None and pipe.safety_checker is None
    assert pipe.unet is tiny_model.image_decoder.unet
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"
    with pytest.raises(ValueError, match="unknown scheduler"):
        build_pipeline(tiny_model, "plms")


def test_generate_images_from_interleaved_prompts(tiny_model, photos):
    prompts = [parse_prompt("<i> wearing <i>", photos[:2]), "a red bicycle"]
    images = generate(tiny_model, prompts, steps=STEPS, seed=0, num_images=2)
    assert len(images) == 4 and all(isinstance(im, Image.Image) and im.size == (32, 32) for im in images)
    again = generate(tiny_model, prompts, steps=STEPS, seed=0, num_images=2)
    assert _same(images, again)
    other_negative = generate(tiny_model, prompts, negative_prompt="blurry", steps=STEPS, seed=0, num_images=2)
    assert not _same(images, other_negative)
    with pytest.raises(TypeError, match="list of segments"):
        generate(tiny_model, ["a cat", photos[0]], steps=STEPS)  # a bare image is not a prompt


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_every_scheduler_samples(tiny_model, name):
    images = generate(tiny_model, ["a cat"], steps=STEPS, seed=1, scheduler=name)
    assert len(images) == 1 and images[0].size == (32, 32)


def test_controlnet_pipeline(tiny_model):
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    torch.manual_seed(0)
    # The conditioning embedding must downsample as much as the tiny VAE (x2).
    controlnet = ControlNetModel.from_unet(tiny_model.image_decoder.unet, conditioning_embedding_out_channels=(16, 32))
    with torch.no_grad():  # zero-initialised convolutions would make any control image a no-op
        for name, p in controlnet.named_parameters():
            if "zero_conv" in name or "controlnet_mid_block" in name or "conv_out" in name:
                p.normal_(0, 0.3)
    pipe = build_pipeline(tiny_model, controlnet=controlnet)
    assert isinstance(pipe, StableDiffusionControlNetPipeline)
    edges = Image.fromarray((np.indices((32, 32)).sum(0) % 8 < 4).astype(np.uint8) * 255).convert("RGB")
    blank = Image.new("RGB", (32, 32))
    with_edges = generate(tiny_model, ["a house"], steps=STEPS, seed=0, controlnet=controlnet, control_image=edges)
    with_blank = generate(tiny_model, ["a house"], steps=STEPS, seed=0, pipeline=pipe, control_image=blank)
    assert with_edges[0].size == (32, 32)
    assert not _same(with_edges, with_blank)
    with pytest.raises(ValueError, match="controlnet"):
        generate(tiny_model, ["a house"], steps=STEPS, control_image=edges)


def test_lora_adapter_on_the_unet(fresh_tiny, tmp_path):
    from peft.utils import get_peft_model_state_dict

    from diffusers import StableDiffusionPipeline

    model = fresh_tiny.eval()
    base = generate(model, ["a cat"], steps=STEPS, seed=0)
    unet = add_lora(model.image_decoder.unet, rank=4)
    lora = {n: p for n, p in unet.named_parameters() if "lora_" in n}
    assert lora and any("lora_B" in n for n in lora)
    assert _same(base, generate(model, ["a cat"], steps=STEPS, seed=0))  # lora_B starts at zero
    with torch.no_grad():
        for n, p in lora.items():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    adapted = generate(model, ["a cat"], steps=STEPS, seed=0)
    assert not _same(base, adapted)
    # A LoRA file in the community (diffusers) format loads into a pipeline over a fresh U-Net.
    StableDiffusionPipeline.save_lora_weights(tmp_path / "lora", unet_lora_layers=get_peft_model_state_dict(unet))
    from tests.models.conftest import make_tiny

    other = make_tiny().eval()
    pipe = build_pipeline(other)
    pipe.load_lora_weights(str(tmp_path / "lora"))
    assert _same(adapted, generate(other, ["a cat"], steps=STEPS, seed=0, pipeline=pipe))
