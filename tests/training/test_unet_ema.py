"""The mini decoder job's U-Net options. Its moving average of U-Net weights
(`MiniDecoderConfig.unet_ema_decay`): updated after every optimiser step with diffusers
EMAModel's default decay, carried in the module's state (so checkpoints hold it), and the U-Net
the SD folder is saved with; off, a decoder's config fingerprint is what it was before the option
existed. Its loss weighting (`min_snr_gamma`): the job's loss is `denoising_loss` of its own draw."""

from __future__ import annotations

import torch
from diffusers.training_utils import EMAModel

from kosmos_g.models.mini import MiniClipConfig, MiniDecoderConfig, build_clip, build_vae
from kosmos_g.platform.config import fingerprint, inert_fields
from kosmos_g.platform.train.backbone_job import NOT_DECIDING, backbone_presets
from kosmos_g.platform.train.backbones import UnetTask, UnetTrainee

TINY = dict(image_size=16, vae_channels=(8, 16), unet_channels=(32, 64), unet_head_dim=16)


def _trainee(tmp_path, ema_decay: float, **decoder) -> UnetTrainee:
    torch.manual_seed(0)
    build_clip(MiniClipConfig(width=32, layers=1, heads=2, patch_size=8, projection_dim=32)).save_pretrained(
        tmp_path / "clip")
    cfg = MiniDecoderConfig(**TINY, unet_ema_decay=ema_decay, **decoder)
    build_vae(cfg).save_pretrained(tmp_path / "vae" / "vae")
    return UnetTrainee(cfg, tmp_path / "vae", tmp_path / "clip").train()


def _train_step(trainee: UnetTrainee, optimizer, task: UnetTask) -> None:
    ids = trainee.tokenizer(["a red star on a blue background"] * 2, padding="max_length", max_length=77,
                            return_tensors="pt").input_ids
    loss = trainee(ids, torch.rand(2, 3, 16, 16) * 2 - 1)["loss"]
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    task.after_step(trainee)


def test_unet_average_follows_diffusers_ema_and_is_what_gets_saved(tmp_path):
    from diffusers import UNet2DConditionModel

    trainee = _trainee(tmp_path, 0.9999)
    task = UnetTask("", "")
    assert not any(p.requires_grad for p in trainee.ema_unet.parameters())  # never trained, only averaged
    optimizer = torch.optim.AdamW(trainee.trainable_parameters(), lr=1e-2)
    assert {id(p) for p in trainee.trainable_parameters()} == {id(p) for p in trainee.unet.parameters()}
    reference = EMAModel(trainee.unet.parameters())  # the same updates, done by diffusers
    for _ in range(4):
        _train_step(trainee, optimizer, task)
        reference.step(trainee.unet.parameters())
    for averaged, expected in zip(trainee.ema_unet.parameters(), reference.shadow_params):
        torch.testing.assert_close(averaged, expected)
    assert not all(torch.equal(a, t) for a, t in zip(trainee.ema_unet.parameters(), trainee.unet.parameters()))

    # Checkpoints hold the average and its update count (a resumed run goes on averaging).
    state = trainee.state_dict()
    assert float(state["ema_updates"]) == 4 and any(key.startswith("ema_unet.") for key in state)

    task.save_bundle(trainee, tmp_path / "sd")
    saved = UNet2DConditionModel.from_pretrained(tmp_path / "sd", subfolder="unet")
    for name, value in saved.state_dict().items():
        torch.testing.assert_close(value, trainee.ema_unet.state_dict()[name], msg=name)


def test_without_average_nothing_changes(tmp_path):
    trainee = _trainee(tmp_path, 0.0)
    assert not hasattr(trainee, "ema_unet") and "ema_updates" not in trainee.state_dict()
    before = [p.detach().clone() for p in trainee.unet.parameters()]
    UnetTask("", "").after_step(trainee)  # no average kept: a no-op
    assert all(torch.equal(a, b) for a, b in zip(before, trainee.unet.parameters()))
    assert trainee.unet_for_saving() is trainee.unet

    # Off (the default), the option stays out of fingerprints: decoders registered before it keep theirs.
    cfg = backbone_presets("decoder").get("mini")
    assert cfg.decoder.unet_ema_decay > 0 and "decoder.unet_ema_decay" not in inert_fields(cfg)
    averaged = fingerprint(cfg, NOT_DECIDING)
    cfg.decoder.unet_ema_decay = 0.0
    assert "decoder.unet_ema_decay" in inert_fields(cfg) and fingerprint(cfg, NOT_DECIDING) != averaged


def test_min_snr_gamma_weighs_the_jobs_own_draw(tmp_path):
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    from kosmos_g.models.image_decoder import denoising_loss, noised_latents

    trainee = _trainee(tmp_path, 0.0, min_snr_gamma=5.0).eval()
    ids = trainee.tokenizer(["a red star on a blue background", "a green circle on a white background"],
                            padding="max_length", max_length=77, return_tensors="pt").input_ids
    pixels = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        loss = trainee(ids, pixels, torch.Generator().manual_seed(3), cond_dropout=0.0)["loss"]
        # The same draw by hand: the posterior sample, then the noised latents, from one generator.
        generator = torch.Generator().manual_seed(3)
        posterior = DiagonalGaussianDistribution(trainee.vae.encode(pixels).latent_dist.parameters)
        latents = posterior.sample(generator) * trainee.vae.config.scaling_factor
        noisy, timesteps, target = noised_latents(trainee.scheduler, latents, generator)
        condition = trainee.text_encoder(input_ids=ids).last_hidden_state
        prediction = trainee.unet(noisy, timesteps, encoder_hidden_states=condition).sample
    torch.testing.assert_close(loss, denoising_loss(prediction, target, trainee.scheduler, timesteps, 5.0))
    assert not torch.allclose(loss, denoising_loss(prediction, target, trainee.scheduler, timesteps))

    # Off (the default), the option stays out of fingerprints.
    cfg = backbone_presets("decoder").get("mini")
    assert cfg.decoder.min_snr_gamma == 0 and "decoder.min_snr_gamma" in inert_fields(cfg)
