"""The frozen image decoder: Stable Diffusion v1.5's U-Net, VAE and noise scheduler, plus the
CLIP text encoder and tokenizer that act as the stage-2 teacher.

With `pretrained_path` everything is read from a local diffusers-layout directory (`platform/`
fetches `s3://` URIs into a cache first); without it, components are built from the shape
fields of `ImageDecoderConfig` with random weights (the `tiny` preset, and the `paper` preset
on the meta device for counting).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .config import ImageDecoderConfig
from .tokenizers import build_clip_tokenizer

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _unet_kwargs(cfg: ImageDecoderConfig) -> dict:
    n = len(cfg.unet_block_out_channels)
    latent_side = cfg.image_size // 2 ** (len(cfg.vae_block_out_channels) - 1)
    return dict(
        sample_size=latent_side, in_channels=cfg.latent_channels, out_channels=cfg.latent_channels,
        block_out_channels=tuple(cfg.unet_block_out_channels), layers_per_block=cfg.unet_layers_per_block,
        down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
        cross_attention_dim=cfg.condition_dim, attention_head_dim=cfg.unet_attention_head_dim,
        norm_num_groups=cfg.unet_norm_num_groups,
    )


def _vae_kwargs(cfg: ImageDecoderConfig) -> dict:
    n = len(cfg.vae_block_out_channels)
    return dict(
        in_channels=3, out_channels=3, latent_channels=cfg.latent_channels, sample_size=cfg.image_size,
        block_out_channels=tuple(cfg.vae_block_out_channels), layers_per_block=cfg.vae_layers_per_block,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        norm_num_groups=cfg.vae_norm_num_groups, scaling_factor=cfg.vae_scaling_factor,
    )


def _text_config(cfg: ImageDecoderConfig):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=49408, hidden_size=cfg.condition_dim, intermediate_size=cfg.text_intermediate_size,
        num_hidden_layers=cfg.text_num_layers, num_attention_heads=cfg.text_num_heads,
        max_position_embeddings=cfg.condition_length, hidden_act="quick_gelu",
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
    )


def load_clip_tokenizer(config: ImageDecoderConfig):
    """The CLIP text teacher's tokenizer: the SD folder's `tokenizer/` when it has one, else
    CLIP's BPE merges (shipped with open-clip-torch unless `clip_bpe_path` is set)."""
    path = Path(config.pretrained_path) if config.pretrained_path else None
    tokenizer_dir = path / "tokenizer" if path is not None else None
    if tokenizer_dir is not None and any((tokenizer_dir / name).is_file() for name in ("vocab.json", "tokenizer.json")):
        from transformers import CLIPTokenizer

        return CLIPTokenizer.from_pretrained(tokenizer_dir)
    return build_clip_tokenizer(config.clip_bpe_path, config.condition_length)


class ImageDecoder(nn.Module):
    """Holds `unet`, `vae`, `noise_scheduler` (DDPM), `text_encoder`, `clip_tokenizer`; all frozen."""

    def __init__(self, config: ImageDecoderConfig, meta: bool = False):
        super().__init__()
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel

        self.config = config
        path = Path(config.pretrained_path) if config.pretrained_path else None
        if path is not None and not path.is_dir():
            raise FileNotFoundError(f"image_decoder.pretrained_path {path} is not a local directory")
        if path is not None and not meta:
            self.unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet")
            self.vae = AutoencoderKL.from_pretrained(path, subfolder="vae")
            self.text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder")
        elif path is not None:
            from transformers import CLIPTextConfig

            self.unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(path / "unet"))
            self.vae = AutoencoderKL.from_config(AutoencoderKL.load_config(path / "vae"))
            self.text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(path / "text_encoder"))
        else:
            self.unet = UNet2DConditionModel(**_unet_kwargs(config))
            self.vae = AutoencoderKL(**_vae_kwargs(config))
            self.text_encoder = CLIPTextModel(_text_config(config))
        if path is not None and (path / "scheduler").is_dir():
            self.noise_scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler")
        else:
            self.noise_scheduler = DDPMScheduler(
                num_train_timesteps=config.num_train_timesteps, beta_schedule=config.beta_schedule,
                beta_start=config.beta_start, beta_end=config.beta_end,
                prediction_type=config.prediction_type, clip_sample=False,
                # As in SD v1.5: DDIM/DPM-Solver derived from this config expect the offset.
                steps_offset=1,
            )
        self.clip_tokenizer = load_clip_tokenizer(config)
        self._check_shapes()
        self.requires_grad_(False)
        if not meta:
            self.to(DTYPES[config.frozen_dtype])
        self.eval()

    def _check_shapes(self) -> None:
        cross = self.unet.config.cross_attention_dim
        text = self.text_encoder.config.hidden_size
        if cross != self.config.condition_dim or text != self.config.condition_dim:
            raise ValueError(
                f"image decoder condition width mismatch: U-Net cross_attention_dim={cross}, "
                f"CLIP text width={text}, config condition_dim={self.config.condition_dim}"
            )

    def architecture(self) -> dict:
        """ImageDecoderConfig fields as read from the loaded components."""
        vae_blocks = tuple(self.vae.config.block_out_channels)
        return dict(
            image_size=self.vae_scale_factor * self.unet.config.sample_size,
            latent_channels=self.unet.config.in_channels,
            prediction_type=self.noise_scheduler.config.prediction_type,
            vae_scaling_factor=float(self.vae.config.scaling_factor),
            num_train_timesteps=self.noise_scheduler.config.num_train_timesteps,
            vae_block_out_channels=vae_blocks,
        )

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write the diffusers layout (unet/, vae/, scheduler/, text_encoder/, tokenizer/)
        that `pretrained_path` loads: how a randomly initialised (tiny) decoder travels
        with a servable model."""
        directory = Path(directory)
        self.unet.save_pretrained(directory / "unet")
        self.vae.save_pretrained(directory / "vae")
        self.noise_scheduler.save_pretrained(directory / "scheduler")
        self.text_encoder.save_pretrained(directory / "text_encoder")
        self.clip_tokenizer.save_pretrained(directory / "tokenizer")
        return directory

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    def train(self, mode: bool = True) -> "ImageDecoder":
        # Frozen teacher and decoder: dropout/batch statistics must never switch on.
        return super().train(False)

    @torch.no_grad()
    def text_condition(self, captions: list[str]) -> torch.Tensor:
        """CLIP text teacher: (B, condition_length, condition_dim), captions padded to 77."""
        tokens = self.clip_tokenizer(
            list(captions), padding="max_length", max_length=self.config.condition_length,
            truncation=True, return_tensors="pt",
        )
        ids = tokens.input_ids.to(self.text_encoder.device)
        return self.text_encoder(input_ids=ids).last_hidden_state

    @torch.no_grad()
    def encode_latents(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """VAE posterior sample x scaling factor, for (B, 3, H, W) pixels in [-1, 1]."""
        return self.sample_latents(self.latent_moments(pixels), generator)

    @torch.no_grad()
    def latent_moments(self, pixels: torch.Tensor) -> torch.Tensor:
        """The VAE posterior's parameters (mean and log-variance, (B, 2C, h, w)): what
        `pipelines/precompute.py` stores, so that training still draws a fresh sample."""
        return self.vae.encode(pixels.to(self.vae.device, self.vae.dtype)).latent_dist.parameters

    def sample_latents(self, moments: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """A posterior sample x scaling factor from `latent_moments` (the same draw as encoding
        the pixels would give with the same generator)."""
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        posterior = DiagonalGaussianDistribution(moments.to(self.vae.device, self.vae.dtype))
        return posterior.sample(generator) * self.vae.config.scaling_factor


def noised_latents(scheduler, latents: torch.Tensor, generator: torch.Generator | None = None):
    """One draw of the denoising objective: (noisy latents, timesteps, regression target), the
    target being the noise or the velocity as `scheduler.config.prediction_type` says."""
    from diffusers.utils.torch_utils import randn_tensor

    rand_device = generator.device if generator is not None else latents.device
    noise = randn_tensor(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator,
                              device=rand_device).to(latents.device)
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise ValueError(f"unsupported prediction_type {prediction_type!r}")
    return scheduler.add_noise(latents, noise, timesteps), timesteps, target


def denoising_loss(prediction: torch.Tensor, target: torch.Tensor, scheduler, timesteps: torch.Tensor,
                   min_snr_gamma: float = 0.0) -> torch.Tensor:
    """The regression loss of `noised_latents`' draw: the plain MSE (SD's and the release's), or
    with `min_snr_gamma` > 0 Min-SNR-γ weighting (Hang et al. 2023), each example's weight in terms
    of the clean latents capped at γ: min(SNR, γ) / (SNR + 1) for a velocity target, / SNR for noise
    (diffusers' training scripts weigh so). Only the mini decoder's recipe may use it: the method's
    stage 3 keeps the plain MSE."""
    if min_snr_gamma <= 0:
        return F.mse_loss(prediction.float(), target.float())
    from diffusers.training_utils import compute_snr

    snr = compute_snr(scheduler, timesteps)
    weight = snr.clamp(max=min_snr_gamma)
    if scheduler.config.prediction_type == "v_prediction":
        weight = weight / (snr + 1)
    else:  # a zero terminal SNR gives 0 / 0 here: that timestep teaches a noise target nothing
        weight = torch.where(snr > 0, weight / snr.clamp(min=torch.finfo(snr.dtype).tiny), torch.zeros_like(snr))
    per_example = F.mse_loss(prediction.float(), target.float(), reduction="none").flatten(1).mean(1)
    return (per_example * weight.to(per_example.device)).mean()
