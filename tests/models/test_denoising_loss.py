"""`image_decoder.denoising_loss`: the plain MSE by default, Min-SNR-γ weighting when asked, its
weights checked against SNRs computed here from the scheduler's cumulative alphas."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kosmos_g.models.image_decoder import denoising_loss
from kosmos_g.models.mini import MiniDecoderConfig, build_scheduler

TIMESTEPS = torch.tensor([0, 10, 250, 500, 900, 999])


def _draw(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    prediction = torch.randn(len(TIMESTEPS), 4, 8, 8, generator=generator)
    target = torch.randn(len(TIMESTEPS), 4, 8, 8, generator=generator)
    per_example = (prediction - target).pow(2).mean(dim=(1, 2, 3))
    return prediction, target, per_example


def _snr(scheduler) -> torch.Tensor:
    alphas = scheduler.alphas_cumprod[TIMESTEPS].double()
    return (alphas / (1 - alphas)).float()


def test_without_gamma_it_is_the_plain_mse():
    prediction, target, _ = _draw()
    scheduler = build_scheduler(MiniDecoderConfig())
    assert torch.equal(denoising_loss(prediction, target, scheduler, TIMESTEPS), F.mse_loss(prediction, target))


def test_velocity_examples_weigh_min_snr_over_snr_plus_one():
    prediction, target, per_example = _draw()
    scheduler = build_scheduler(MiniDecoderConfig())  # the preset's: v-prediction, zero terminal SNR
    snr = _snr(scheduler)
    assert snr[-1] == 0 and snr[0] > 5  # the timesteps lie on both sides of the cap
    expected = (per_example * snr.clamp(max=5.0) / (snr + 1)).mean()
    torch.testing.assert_close(denoising_loss(prediction, target, scheduler, TIMESTEPS, 5.0), expected)
    # The pure-noise timestep teaches nothing under this weighting; the capped ones weigh 5 / (SNR + 1).
    only_last = torch.zeros(len(TIMESTEPS), dtype=torch.bool)
    only_last[-1] = True
    moved = torch.where(only_last[:, None, None, None], prediction + 3, prediction)
    torch.testing.assert_close(denoising_loss(moved, target, scheduler, TIMESTEPS, 5.0), expected)


def test_noise_examples_weigh_min_snr_over_snr_and_stay_finite_at_zero_snr():
    prediction, target, per_example = _draw(1)
    plain = build_scheduler(MiniDecoderConfig(prediction_type="epsilon", zero_terminal_snr=False))
    snr = _snr(plain)
    expected = (per_example * snr.clamp(max=5.0) / snr).mean()
    torch.testing.assert_close(denoising_loss(prediction, target, plain, TIMESTEPS, 5.0), expected)

    zero_terminal = build_scheduler(MiniDecoderConfig(prediction_type="epsilon", zero_terminal_snr=True))
    loss = denoising_loss(prediction, target, zero_terminal, TIMESTEPS, 5.0)
    snr = _snr(zero_terminal)
    weight = torch.cat([snr[:-1].clamp(max=5.0) / snr[:-1], torch.zeros(1)])
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, (per_example * weight).mean())
