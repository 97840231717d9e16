"""KosmosG end to end: conditioning shapes, stage losses, what trains, and real-format SD loading."""

from __future__ import annotations

import pytest
import torch

from kosmos_g.models.config import model_preset
from kosmos_g.models.images import vae_preprocess_batch
from kosmos_g.models.kosmos_g import KosmosG
from kosmos_g.models.prompt import parse_prompt

COND = (77, 32)  # tiny preset: SD's 77 positions, tiny U-Net's cross-attention width


def _grad_state(module: torch.nn.Module) -> dict[str, bool]:
    return {n: p.grad is not None and bool(p.grad.abs().sum() > 0) for n, p in module.named_parameters()}


@pytest.mark.parametrize("n_images", [0, 1, 3])
def test_condition_shape(tiny_model, photos, n_images):
    text = " and ".join(["<i>"] * n_images) or "a red bicycle"
    cond = tiny_model.encode_prompts([parse_prompt(text, photos[:n_images])])
    assert cond.shape == (1, *COND)
    assert torch.isfinite(cond).all()


def test_mixed_batch_rows_match_single_encodings(tiny_model, photos):
    prompts = [parse_prompt("<i> wearing <i>", photos[:2]), ["a cat"], parse_prompt("a dog in <i>", [photos[2]])]
    with torch.no_grad():
        together = tiny_model.encode_prompts(prompts)
        alone = torch.cat([tiny_model.encode_prompts([p]) for p in prompts])
    assert together.shape == (3, *COND)
    assert torch.allclose(together, alone, atol=1e-5)


def test_empty_condition_is_the_bare_bos_encoding(tiny_model):
    tok = tiny_model.tokenizer
    bos_only = {"input_ids": torch.tensor([[tok.bos_id]]), "attention_mask": torch.ones(1, 1, dtype=torch.bool),
                "image_mask": torch.zeros(1, 1, dtype=torch.bool), "loss_mask": torch.zeros(1, 1, dtype=torch.bool),
                "pixel_values": torch.zeros(0, 3, 32, 32)}
    with torch.no_grad():
        empty = tiny_model.empty_condition(3)
        assert empty.shape == (3, *COND)
        assert torch.allclose(empty[2], tiny_model.encode(bos_only)[0])
        assert not torch.allclose(empty[0], tiny_model.encode_prompts(["a cat"])[0])


def test_stage3_gradients_reach_mllm_and_m_but_never_frozen_parts(fresh_tiny, photos):
    model = fresh_tiny.train()
    model.set_stage(3)
    batch = model.tokenizer([parse_prompt("a <i> next to <i>", photos[:2]), ["a cat on a mat"]])
    pixels = vae_preprocess_batch(photos[:2], 32)
    loss = model.diffusion_loss(batch, pixels, generator=torch.Generator().manual_seed(0), cond_dropout=0.0)
    loss.backward()
    mllm = _grad_state(model.mllm)
    assert mllm["decoder.embed_tokens.weight"] and mllm["decoder.layers.1.ffn.fc2.weight"]
    assert mllm["resampler.latents"] and mllm["resampler.proj.weight"]
    assert mllm["vision.model.encoder.layers.1.self_attn.q_proj.weight"] and mllm["vision.model.post_layernorm.weight"]
    assert not mllm["vision.model.encoder.layers.0.self_attn.q_proj.weight"]
    assert not mllm["vision.model.embeddings.patch_embedding.weight"]
    assert all(_grad_state(model.aligner.encoder).values())
    assert not any(_grad_state(model.aligner.decoder).values())
    frozen = model.image_decoder
    assert not any(p.requires_grad or p.grad is not None for p in frozen.parameters())
    assert not frozen.training and not frozen.unet.training


def test_stage2_trains_only_the_aligner(fresh_tiny):
    model = fresh_tiny.train()
    model.set_stage(2)
    assert not model.mllm.training  # the source must be deterministic
    captions = ["a photo of a cat", "a red car parked on the street"]
    out = model.align_loss(model.tokenizer(captions), captions)
    assert set(out) == {"loss", "mse", "rec"}
    out["loss"].backward()
    assert all(_grad_state(model.aligner).values())
    assert not any(p.grad is not None for p in model.mllm.parameters())
    assert not any(p.grad is not None for p in model.image_decoder.parameters())


def test_stage1_trains_only_the_mllm(fresh_tiny):
    model = fresh_tiny.train()
    model.set_stage(1)
    model.lm_loss(model.tokenizer(["a photo of a cat"])).backward()
    assert any(_grad_state(model.mllm.decoder).values())
    assert not any(p.requires_grad for p in model.aligner.parameters())
    names = {n for n, _ in model.named_trainable_parameters()}
    assert names and all(n.startswith("mllm.") for n in names)


def test_set_stage_trainable_sets(fresh_tiny):
    model = fresh_tiny
    count = lambda: sum(p.numel() for p in model.trainable_parameters())  # noqa: E731
    model.set_stage(2)
    assert count() == sum(p.numel() for p in model.aligner.parameters())
    model.set_stage(3)
    m = sum(p.numel() for p in model.aligner.encoder.parameters())
    mllm = sum(p.numel() for mod in model.mllm.trainable_modules() for p in mod.parameters())
    assert count() == m + mllm
    with pytest.raises(ValueError, match="stage"):
        model.set_stage(4)


def test_cfg_dropout_uses_the_empty_condition(tiny_model, photos):
    batch = tiny_model.tokenizer([parse_prompt("<i>", [photos[0]]), ["a cat"]])
    pixels = vae_preprocess_batch(photos[:2], 32)
    seed = lambda: torch.Generator().manual_seed(7)  # noqa: E731
    with torch.no_grad():
        dropped = tiny_model.diffusion_loss(batch, pixels, seed(), cond_dropout=1.0)
        bare = tiny_model.diffusion_loss(tiny_model.tokenizer.bare_batch(2), pixels, seed(), cond_dropout=0.0)
        kept = tiny_model.diffusion_loss(batch, pixels, seed(), cond_dropout=0.0)
        again = tiny_model.diffusion_loss(batch, pixels, seed(), cond_dropout=0.0)
        other = tiny_model.diffusion_loss(batch, pixels, torch.Generator().manual_seed(8), cond_dropout=0.0)
    assert torch.allclose(dropped, bare)
    assert torch.equal(kept, again) and not torch.allclose(kept, other)
    assert not torch.allclose(dropped, kept)


def test_v_prediction_target(photos):
    cfg = model_preset("tiny")
    cfg.image_decoder.prediction_type = "v_prediction"
    torch.manual_seed(0)
    model = KosmosG.from_config(cfg).eval()
    batch = model.tokenizer(["a cat"])
    pixels = vae_preprocess_batch(photos[:1], 32)
    with torch.no_grad():
        loss = model.diffusion_loss(batch, pixels, torch.Generator().manual_seed(3), cond_dropout=0.0)
        # The same draws, by hand: posterior sample, noise, timestep; target = velocity.
        g = torch.Generator().manual_seed(3)
        dec, sched = model.image_decoder, model.image_decoder.noise_scheduler
        latents = dec.encode_latents(pixels, g)
        noise = torch.randn(latents.shape, generator=g)
        t = torch.randint(0, 1000, (1,), generator=g)
        pred = dec.unet(sched.add_noise(latents, noise, t), t, encoder_hidden_states=model.encode(batch)).sample
        expected = ((pred - sched.get_velocity(latents, noise, t)) ** 2).mean()
    assert torch.allclose(loss, expected, atol=1e-6)


def test_forward_dispatches_on_stage(fresh_tiny, photos):
    model = fresh_tiny
    batch = model.tokenizer(["a cat", "a dog"])
    model.set_stage(1)
    assert set(model(batch)) == {"loss"}
    model.set_stage(2)
    assert set(model(batch, captions=["a cat", "a dog"])) == {"loss", "mse", "rec"}
    model.set_stage(3)
    out = model(batch, target_pixels=vae_preprocess_batch(photos[:2], 32))
    assert out["loss"].ndim == 0
    with pytest.raises(ValueError, match="target_pixels"):
        model(batch)


def test_pretrained_sd_layout_is_loaded(tmp_path, tiny_model):
    """A diffusers SD v1.5 directory (as written by save_pretrained) supplies the image decoder."""
    from diffusers import StableDiffusionPipeline

    dec = tiny_model.image_decoder
    StableDiffusionPipeline(
        vae=dec.vae, text_encoder=dec.text_encoder, tokenizer=dec.clip_tokenizer, unet=dec.unet,
        scheduler=dec.noise_scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    ).save_pretrained(tmp_path / "sd")
    cfg = model_preset("tiny")
    cfg.image_decoder.pretrained_path = str(tmp_path / "sd")
    cfg.image_decoder.image_size = 512  # a wrong shape field: the checkpoint's own wins
    model = KosmosG.from_config(cfg)
    loaded = model.image_decoder
    for name in ("unet", "vae", "text_encoder"):
        ours, theirs = getattr(loaded, name).state_dict(), getattr(dec, name).state_dict()
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), name
    assert model.config.image_decoder.image_size == 32
    assert loaded.clip_tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert not any(p.requires_grad for p in loaded.parameters())
    captions = ["a photo of a cat"]
    assert torch.allclose(loaded.text_condition(captions), dec.text_condition(captions))
    assert loaded.text_condition(captions).shape == (1, *COND)


def test_missing_pretrained_directory_is_clear():
    cfg = model_preset("tiny")
    cfg.image_decoder.pretrained_path = "/nonexistent/sd15"
    with pytest.raises(FileNotFoundError, match="pretrained_path"):
        KosmosG.from_config(cfg)


def test_condition_width_must_match_the_unet():
    cfg = model_preset("tiny")
    cfg.aligner.dim = 48
    with pytest.raises(ValueError, match="condition_dim"):
        KosmosG.from_config(cfg)
