"""Training tasks of the miniature world's frozen backbones (models/mini.py), run by the shared
loop: the mini CLIP (contrastive), the mini VAE and the mini U-Net (denoising, conditioned on the
frozen mini CLIP text encoder's 77 hidden states, as SD v1.5 is on CLIP ViT-L/14's).

Each task's bundle is the layout the real model loads from: a transformers `CLIPModel` folder with
its tokenizer; a diffusers Stable Diffusion folder (unet/, vae/, scheduler/, text_encoder/,
tokenizer/, model_index.json). The job driver is backbone_job.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from kosmos_g.models.mini import CONDITION_LENGTH, MiniClipConfig, MiniDecoderConfig
from kosmos_g.platform import storage
from kosmos_g.platform.data.datastream import DataConfig
from kosmos_g.platform.train.config import OptimConfig, TrainConfig
from kosmos_g.platform.train.task import Task

KINDS = ("clip", "text-clip", "decoder")


@dataclass
class BackboneConfig:
    # "clip": the MLLM's vision tower (scenes and close-ups); "text-clip": the decoder's text
    # encoder (scenes only); "decoder": VAE, then U-Net on the frozen text-clip.
    kind: str = "clip"
    name: str = "mini-clip"  # Ray Train run directory and MLflow run key
    storage_path: str | None = None  # checkpoints; None: $KOSMOS_STORAGE_ROOT/ray-train
    register: bool = True
    force: bool = False  # train even when a version for this exact config is registered
    # decoder: the frozen mini CLIP whose text encoder conditions the U-Net ("auto": the newest
    # registered kosmos-g-mini-text-clip; or a models:/, runs:/ or storage URI of a CLIP folder).
    clip_model: str = "auto"
    vae_steps: int = 800  # decoder: VAE steps, before the U-Net's train.steps
    clip: MiniClipConfig = field(default_factory=MiniClipConfig)
    decoder: MiniDecoderConfig = field(default_factory=MiniDecoderConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    @property
    def pipeline(self) -> str:
        return f"mini-{self.kind}"

    @property
    def trains_clip(self) -> bool:
        return self.kind in ("clip", "text-clip")

    @property
    def registered_name(self) -> str:
        return f"kosmos-g-mini-{self.kind}"

    def resolved_storage_path(self) -> str:
        return self.storage_path or storage.default_root("ray-train")

    def validate(self) -> None:
        from kosmos_g.platform.config import ConfigError

        self.optim.validate()
        self.train.validate()
        if self.kind not in KINDS:
            raise ConfigError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if not self.data.captions:
            raise ConfigError("data.captions is unset: the world's caption shards (kosmos-g data world)")
        if self.data.precomputed not in ("auto", "off"):
            raise ConfigError(f"data.precomputed must be 'auto' or 'off', got {self.data.precomputed!r}")


# ------------------------------------------------------------------ data


class BackbonePreprocessor:
    """Ray Data UDF: caption records -> CLIP tokens (padded to 77, as SD's CLIP) and pixels at the
    backbone's size (`clip`: CLIP-normalised; `vae`: in [-1, 1])."""

    def __init__(self, image_size: int, pixels: str):
        from kosmos_g.models.tokenizers import build_clip_tokenizer

        self.tokenizer = build_clip_tokenizer()
        self.image_size, self.pixels = image_size, pixels

    def __call__(self, table: pa.Table) -> dict[str, np.ndarray]:
        from kosmos_g.models.images import clip_preprocess, to_pil, vae_preprocess
        from kosmos_g.platform.data import imaging
        from kosmos_g.platform.data.precomputed import stack_npy

        if "condition" in table.column_names and table.column("condition").null_count == 0:
            # the decoder's precomputed inputs (decoder_inputs.py)
            return {name: stack_npy(table.column(name).to_pylist()) for name in ("latent_moments", "condition")}
        captions = table.column("caption").to_pylist()
        tokens = self.tokenizer(captions, padding="max_length", max_length=CONDITION_LENGTH, truncation=True,
                                return_tensors="np")
        prepare = clip_preprocess if self.pixels == "clip" else vae_preprocess
        images = [prepare(to_pil(imaging.decode_image(data)), self.image_size).numpy()
                  for data in table.column("image").to_pylist()]
        return {"input_ids": tokens["input_ids"].astype(np.int64),
                "attention_mask": tokens["attention_mask"].astype(np.int64),
                "pixel_values": np.stack(images).astype(np.float32)}


def to_tensors(batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Collate: the preprocessed columns are already fixed-size arrays."""
    return {key: torch.as_tensor(value) for key, value in batch.items()}


def backbone_dataset(cfg: BackboneConfig, pixels: str, image_size: int, inputs: str | None = None):
    """The caption shards preprocessed for a backbone; with `inputs` (the prefix of the decoder's
    precomputed inputs beside them), those read instead of tokenising and decoding."""
    from kosmos_g.platform.data.datastream import preprocessed_stream

    return preprocessed_stream(2, cfg.data, BackbonePreprocessor, {"image_size": image_size, "pixels": pixels},
                               {"captions": ["key"] if inputs else ["key", "caption", "image"]},
                               siblings={"captions": inputs} if inputs else None)


# ------------------------------------------------------------------ tasks


class _Trainee(nn.Module):
    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]


class ClipTrainee(_Trainee):
    def __init__(self, cfg: MiniClipConfig):
        super().__init__()
        from kosmos_g.models.mini import build_clip

        self.clip = build_clip(cfg)
        # DeepSpeed's start-up broadcast cannot send 0-d tensors; CLIP's temperature is one. It
        # trains as shape (1,) and is saved as CLIP's 0-d parameter again (`clip_for_saving`).
        self.clip.logit_scale = nn.Parameter(self.clip.logit_scale.detach().reshape(1))

    def clip_for_saving(self):
        import copy

        clip = copy.deepcopy(self.clip)
        clip.logit_scale = nn.Parameter(clip.logit_scale.detach().reshape(()))
        return clip

    def forward(self, input_ids, attention_mask, pixel_values, generator=None, cond_dropout=0.0):
        from kosmos_g.models.mini import clip_loss

        return {"loss": clip_loss(self.clip, input_ids, attention_mask, pixel_values)}


class ClipTask(Task):
    config_type = BackboneConfig

    def build(self, cfg, init_uri, device):
        torch.manual_seed(cfg.train.seed)
        return ClipTrainee(cfg.clip).to(device).train()

    def losses(self, model, batch, cfg, generator=None, training=True):
        return model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"])

    def save_bundle(self, model, directory):
        from kosmos_g.models.tokenizers import build_clip_tokenizer

        model.clip_for_saving().save_pretrained(directory)
        build_clip_tokenizer().save_pretrained(directory)


class VaeTrainee(_Trainee):
    """The autoencoder, plus a running estimate of its latents' second moment: SD's
    `scaling_factor` (1 / latent std) is read off it when the VAE is saved."""

    def __init__(self, cfg: MiniDecoderConfig):
        super().__init__()
        from kosmos_g.models.mini import build_vae

        self.vae = build_vae(cfg)
        self.kl_weight = cfg.vae_kl_weight
        self.register_buffer("latent_power", torch.ones(1))  # (1,): DeepSpeed broadcasts no 0-d tensors

    def forward(self, pixel_values, generator=None):
        from kosmos_g.models.mini import vae_loss

        losses = vae_loss(self.vae, pixel_values, self.kl_weight, generator)
        if self.training:
            with torch.no_grad():
                self.latent_power.lerp_(losses.pop("latent_power"), 0.05)
        else:
            losses.pop("latent_power")
        return losses


class VaeTask(Task):
    config_type = BackboneConfig

    def build(self, cfg, init_uri, device):
        torch.manual_seed(cfg.train.seed)
        return VaeTrainee(cfg.decoder).to(device).train()

    def losses(self, model, batch, cfg, generator=None, training=True):
        return model(batch["pixel_values"], generator)

    def count(self, batch):
        return int(batch["pixel_values"].shape[0]), 0

    def save_bundle(self, model, directory):
        model.vae.register_to_config(scaling_factor=float(model.latent_power.clamp(min=1e-8).rsqrt().item()))
        model.vae.save_pretrained(Path(directory) / "vae")


class UnetTrainee(_Trainee):
    """U-Net trained on the frozen VAE's latents, conditioned on the frozen CLIP text encoder;
    the condition of `cond_dropout` of the examples is the empty caption's (guidance)."""

    def __init__(self, cfg: MiniDecoderConfig, vae_dir: Path, clip_dir: Path):
        super().__init__()
        from diffusers import AutoencoderKL
        from transformers import CLIPTextModel

        from kosmos_g.models.mini import build_scheduler, build_unet
        from kosmos_g.models.tokenizers import build_clip_tokenizer

        self.text_encoder = CLIPTextModel.from_pretrained(clip_dir).requires_grad_(False).eval()
        self.vae = AutoencoderKL.from_pretrained(vae_dir / "vae").requires_grad_(False).eval()
        self.unet = build_unet(cfg, self.text_encoder.config.hidden_size)
        # The average lives in the module (frozen), so checkpoints carry it and a resumed run goes on averaging.
        self.ema_decay = cfg.unet_ema_decay
        if self.ema_decay > 0:
            import copy

            self.ema_unet = copy.deepcopy(self.unet).requires_grad_(False).eval()
            self.register_buffer("ema_updates", torch.zeros(1))
        self.scheduler = build_scheduler(cfg)
        self.min_snr_gamma = cfg.min_snr_gamma
        self.tokenizer = build_clip_tokenizer()
        empty = self.tokenizer([""], padding="max_length", max_length=CONDITION_LENGTH, return_tensors="pt")
        self.register_buffer("empty_ids", empty.input_ids, persistent=False)

    def train(self, mode: bool = True):
        super().train(mode)
        self.text_encoder.eval()
        self.vae.eval()
        if self.ema_decay > 0:
            self.ema_unet.eval()
        return self

    @torch.no_grad()
    def update_ema(self) -> None:
        """One step of the U-Net's moving average (diffusers EMAModel's default warm-up)."""
        if self.ema_decay <= 0:
            return
        self.ema_updates += 1
        past = float(self.ema_updates.item()) - 1  # EMAModel.get_decay: the first update copies
        decay = min(self.ema_decay, (1 + past) / (10 + past)) if past > 0 else 0.0
        torch._foreach_lerp_(list(self.ema_unet.parameters()), list(self.unet.parameters()), 1 - decay)

    def unet_for_saving(self):
        """The averaged U-Net when one is kept, else the trained one."""
        return self.ema_unet if self.ema_decay > 0 else self.unet

    def forward(self, input_ids=None, pixel_values=None, generator=None, cond_dropout=0.1, latent_moments=None,
                condition=None):
        """The denoising loss of captioned scenes: `input_ids` and `pixel_values`, or what the frozen
        text encoder and VAE make of them, precomputed (`condition`, `latent_moments`)."""
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        from kosmos_g.models.image_decoder import denoising_loss, noised_latents

        with torch.no_grad():
            if latent_moments is None:
                latent_moments = self.vae.encode(pixel_values).latent_dist.parameters
            posterior = DiagonalGaussianDistribution(latent_moments)
            latents = posterior.sample(generator) * self.vae.config.scaling_factor
            if condition is None:
                condition = self.text_encoder(input_ids=input_ids).last_hidden_state
            if cond_dropout > 0:
                rand_device = generator.device if generator is not None else latents.device
                drop = torch.rand(len(latents), generator=generator, device=rand_device).to(latents.device)
                empty = self.text_encoder(input_ids=self.empty_ids).last_hidden_state
                condition = torch.where((drop < cond_dropout)[:, None, None], empty, condition)
        noisy, timesteps, target = noised_latents(self.scheduler, latents, generator)
        prediction = self.unet(noisy, timesteps, encoder_hidden_states=condition).sample
        return {"loss": denoising_loss(prediction, target, self.scheduler, timesteps, self.min_snr_gamma)}


class UnetTask(Task):
    config_type = BackboneConfig

    def __init__(self, vae_uri: str, clip_uri: str):
        self.vae_uri, self.clip_uri = vae_uri, clip_uri

    def build(self, cfg, init_uri, device):
        from kosmos_g.platform import tracking

        torch.manual_seed(cfg.train.seed)
        vae_dir, clip_dir = tracking.resolve_artifacts(self.vae_uri), tracking.resolve_artifacts(self.clip_uri)
        return UnetTrainee(cfg.decoder, vae_dir, clip_dir).to(device).train()

    def losses(self, model, batch, cfg, generator=None, training=True):
        return model(batch.get("input_ids"), batch.get("pixel_values"), generator,
                     cfg.train.cond_dropout if training else 0.0, batch.get("latent_moments"), batch.get("condition"))

    def count(self, batch):
        return int(next(iter(batch.values())).shape[0]), 0

    def after_step(self, model):
        model.update_ema()

    def save_bundle(self, model, directory):
        """Stable Diffusion's diffusers layout: what `image_decoder.pretrained_path` loads."""
        from diffusers import StableDiffusionPipeline

        StableDiffusionPipeline(
            vae=model.vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer, unet=model.unet_for_saving(),
            scheduler=model.scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        ).save_pretrained(directory)
