"""Mini frozen backbones for the miniature world: stand-ins for CLIP ViT-L/14 and SD v1.5 that
train from scratch on a CPU, saved in exactly the layouts the real ones load from.

- Mini CLIP: transformers `CLIPModel` (text + vision towers, contrastive loss), trained on the
  world's captions and scenes; its vision tower is the MLLM's image encoder and its text tower
  the stage-2 teacher and the decoder's conditioning, as CLIP ViT-L/14 is for SD v1.5.
- Mini decoder: diffusers `AutoencoderKL` (2x: 32 px scenes, 16 x 16 latents) + `UNet2DConditionModel`
  conditioned on the frozen mini CLIP text encoder's 77 hidden states + `DDPMScheduler`.

The decoder recipe choices that decide whether colours are learned (prediction type, zero
terminal SNR, a pooled-text embedding added to the time embedding) are fields, measured by
`bench/mini_sweep.py`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

# SD's text length: the mini CLIP pads captions to it as SD's CLIP does.
from .config import SD_CONDITION_LENGTH as CONDITION_LENGTH


@dataclass
class MiniClipConfig:
    width: int = 128  # text and vision towers; the text width is the U-Net condition width
    layers: int = 4
    heads: int = 4
    image_size: int = 32
    patch_size: int = 4
    projection_dim: int = 128


@dataclass
class MiniDecoderConfig:
    image_size: int = 32
    latent_channels: int = 4
    vae_channels: tuple[int, ...] = (32, 64)  # two blocks: 2x downsampling, 32 px -> 16 x 16 latents
    # Half of these, (32, 64), trains and steps faster but draws the held-out shapes told in words
    # in 0.46 (0.31 with heads of 4) against 0.76 (docs/REPRODUCTION.md, 2026-12-07).
    unet_channels: tuple[int, ...] = (64, 128)
    # Handed to diffusers as `attention_head_dim`, which UNet2DConditionModel reads as the number
    # of heads (SD v1.5's config says 8 and means 8 heads): 32 heads of 4 channels at the 128-wide
    # level, not heads of 32 as the name says. Every mini decoder measured so far has it so; the
    # pooled-text embedding below divides by it as a head width (4 heads of 32). Heads of 32
    # (`unet_heads=4`) did not draw two subjects' colours better after 2,000 steps (0.17 against
    # 0.22 in words; docs/REPRODUCTION.md, 2026-12-05), so the preset keeps these.
    unet_head_dim: int = 32
    # Above 0: the cross-attention's head count, given to diffusers as such (4: heads of 32 channels
    # at the 128-wide level); 0 keeps `unet_head_dim` as it has always been read.
    unet_heads: int = 0
    prediction_type: str = "v_prediction"
    zero_terminal_snr: bool = True  # the last timestep is pure noise: no mean-colour leak
    pooled_text: bool = True  # diffusers "text" addition embedding: pooled condition + time
    # Cross-attention at the first (16 x 16) level too, as SD has it at all but its lowest
    # resolution; off, the text reaches the 16 x 16 features only through the 8 x 8 level.
    full_resolution_attention: bool = False
    vae_kl_weight: float = 1e-6
    # 0: the U-Net is saved as trained. Above 0: an exponential moving average of its weights is
    # kept and saved instead, decaying as diffusers' EMAModel does by default, (1 + t) / (10 + t)
    # after t updates (the last ~10% of training), capped at this value.
    unet_ema_decay: float = 0.0
    # 0: the U-Net's loss is the plain MSE, as SD's. Above 0: Min-SNR-γ weighting of its examples
    # (`image_decoder.denoising_loss`). With 5, 2,500 U-Net steps draw one subject in words nearly
    # as the preset's 5,000 do (shape 0.78 against 0.89) but two subjects' colours in 0.37 against
    # 0.57 (docs/REPRODUCTION.md, 2026-12-08), so the preset keeps the plain loss.
    min_snr_gamma: float = 0.0

    def inert_fields(self) -> list[str]:
        """Left out of job fingerprints at their defaults, so decoders registered before these
        options existed keep theirs."""
        defaults = {"full_resolution_attention": False, "unet_ema_decay": 0.0, "unet_heads": 0, "min_snr_gamma": 0.0}
        return [name for name, default in defaults.items() if getattr(self, name) == default]

    @property
    def latent_size(self) -> int:
        return self.image_size // 2 ** (len(self.vae_channels) - 1)


def build_clip(cfg: MiniClipConfig):
    from transformers import CLIPConfig, CLIPModel

    tower = dict(hidden_size=cfg.width, num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
                 intermediate_size=4 * cfg.width)
    return CLIPModel(CLIPConfig(
        text_config=dict(tower, max_position_embeddings=CONDITION_LENGTH),
        vision_config=dict(tower, image_size=cfg.image_size, patch_size=cfg.patch_size, hidden_act="quick_gelu"),
        projection_dim=cfg.projection_dim,
    ))


def clip_loss(clip, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric contrastive loss over the batch."""
    return clip(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values, return_loss=True).loss


def build_vae(cfg: MiniDecoderConfig):
    from diffusers import AutoencoderKL

    blocks = len(cfg.vae_channels)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * blocks,
                         up_block_types=("UpDecoderBlock2D",) * blocks, block_out_channels=tuple(cfg.vae_channels),
                         layers_per_block=1, latent_channels=cfg.latent_channels, norm_num_groups=8,
                         sample_size=cfg.image_size)


def vae_loss(vae, pixels: torch.Tensor, kl_weight: float,
             generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Reconstruction MSE + a small KL term (pixels in [-1, 1]); `latent_power` (the mean square
    of the posterior means) sets SD's latent `scaling_factor` once training ends."""
    posterior = vae.encode(pixels).latent_dist
    reconstruction = vae.decode(posterior.sample(generator)).sample
    rec = F.mse_loss(reconstruction, pixels)
    kl = posterior.kl().mean() / pixels[0].numel()
    return {"loss": rec + kl_weight * kl, "rec": rec, "kl": kl,
            "latent_power": posterior.mean.detach().pow(2).mean()}


def build_unet(cfg: MiniDecoderConfig, condition_dim: int):
    from diffusers import UNet2DConditionModel

    levels = len(cfg.unet_channels)
    plain = 0 if cfg.full_resolution_attention else 1  # levels without cross-attention, from the top
    # "text": attention-pooled encoder_hidden_states added to the time embedding, so the
    # condition steers every resolution (colours are global) without another input.
    extra = dict(addition_embed_type="text",
                 addition_embed_type_num_heads=max(1, condition_dim // cfg.unet_head_dim)) if cfg.pooled_text else {}
    return UNet2DConditionModel(
        sample_size=cfg.latent_size, in_channels=cfg.latent_channels, out_channels=cfg.latent_channels,
        down_block_types=("DownBlock2D",) * plain + ("CrossAttnDownBlock2D",) * (levels - plain),
        up_block_types=("CrossAttnUpBlock2D",) * (levels - plain) + ("UpBlock2D",) * plain,
        block_out_channels=tuple(cfg.unet_channels), layers_per_block=1, norm_num_groups=32,
        cross_attention_dim=condition_dim, attention_head_dim=cfg.unet_heads or cfg.unet_head_dim, **extra,
    )


def build_scheduler(cfg: MiniDecoderConfig):
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                         beta_end=0.012, prediction_type=cfg.prediction_type, clip_sample=False,
                         rescale_betas_zero_snr=cfg.zero_terminal_snr,
                         timestep_spacing="trailing" if cfg.zero_terminal_snr else "leading", steps_offset=1)
