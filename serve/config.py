"""Typed configuration of the serving application, with named presets.

    tiny   a demo model built from `model_preset("tiny")` (no training needed),
           CPU-sized replicas that fit a 2-core laptop
    local  the newest registered `kosmos-g` model (falls back to the tiny demo
           while nothing is registered), CPU-sized replicas
    paper  the newest registered `kosmos-g` model, one GPU per replica when the
           cluster has GPUs, Stable Diffusion sized limits and defaults

Everything is overridable with `--set section.key=value` (platform.config).
Nothing here imports torch or Ray: the CLI reads it cheaply.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kosmos_g.platform.config import Presets
from kosmos_g.serve.messages import SCHEDULER_NAMES, canonical_scheduler

REGISTERED_MODEL = "kosmos-g"


@dataclass
class ModelSource:
    # models:/kosmos-g@current, models:/kosmos-g/latest, models:/kosmos-g/3, s3://… or a
    # local servable bundle (models.checkpoint.save_servable). Wins over `preset`.
    uri: str | None = None
    # Build a demo model from this model preset ("tiny") instead of loading one.
    preset: str | None = None
    # Used when neither uri nor preset is set and the registry has no version yet.
    fallback_preset: str | None = None
    registered_name: str = REGISTERED_MODEL
    # Seed of the demo model's random weights (identical in every replica).
    seed: int = 0
    # A diffusers ControlNetModel directory/URI matching the U-Net; None = no ControlNet.
    controlnet_uri: str | None = None
    # Storage prefix holding LoRA adapters as <prefix>/<name>/pytorch_lora_weights.safetensors.
    lora_prefix: str | None = None


@dataclass
class Limits:
    max_payload_bytes: int = 32 * 1024 * 1024
    # An oversized body is read and discarded up to this size so that clients which send
    # everything before reading (no Expect: 100-continue) still receive the 413.
    max_discard_bytes: int = 128 * 1024 * 1024
    max_prompt_chars: int = 4000
    max_prompt_images: int = 10  # the original demo accepts up to 10 images
    max_image_bytes: int = 8 * 1024 * 1024
    # Checked from the image header before decoding: guards against decompression bombs.
    max_image_pixels: int = 4096 * 4096
    max_num_images: int = 4
    min_steps: int = 1
    max_steps: int = 150
    min_side: int = 256
    max_side: int = 1024
    size_multiple: int = 8
    max_guidance_scale: float = 30.0
    max_seed: int = 2**63 - 1


@dataclass
class Defaults:
    steps: int = 50
    guidance_scale: float = 6.0
    scheduler: str = "dpm++"
    num_images: int = 1


@dataclass
class Batching:
    encoder_max_batch_size: int = 8
    encoder_batch_wait_s: float = 0.01
    denoiser_max_batch_size: int = 8
    denoiser_batch_wait_s: float = 0.01
    # Image encodings (resampler outputs) kept per encoder replica, keyed by content hash.
    encoder_cache_size: int = 256
    # Most images one shared U-Net pass may carry; larger groups are split.
    max_group_images: int = 32


@dataclass
class DeploymentOptions:
    num_replicas: int = 1
    # When set, Serve autoscales between min_replicas and max_replicas instead.
    max_replicas: int | None = None
    min_replicas: int = 1
    target_ongoing_requests: float = 8.0
    num_cpus: float = 1.0
    # GPUs per replica, requested only when the cluster has GPUs.
    num_gpus_when_present: float = 0.0
    # Serve's default (5) would cap a replica's batches at 5 requests.
    max_ongoing_requests: int = 64


@dataclass
class HttpConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    # When set, /v1/* requires `X-API-Key: <key>` or `Authorization: Bearer <key>`.
    # "env:NAME" reads the key from $NAME in the ingress replica instead.
    api_key: str | None = None


@dataclass
class ServeConfig:
    app_name: str = "kosmos-g"
    route_prefix: str = "/"
    model: ModelSource = field(default_factory=ModelSource)
    limits: Limits = field(default_factory=Limits)
    defaults: Defaults = field(default_factory=Defaults)
    batching: Batching = field(default_factory=Batching)
    ingress: DeploymentOptions = field(
        default_factory=lambda: DeploymentOptions(num_cpus=0.25, max_ongoing_requests=256))
    encoder: DeploymentOptions = field(default_factory=DeploymentOptions)
    denoiser: DeploymentOptions = field(default_factory=DeploymentOptions)
    http: HttpConfig = field(default_factory=HttpConfig)


def _cpu_sized(model: ModelSource) -> ServeConfig:
    """Fractional CPUs so ingress + encoder + denoiser fit on 2 cores beside other work."""
    return ServeConfig(
        model=model,
        limits=Limits(min_side=16, max_side=256, max_steps=50, max_image_pixels=2048 * 2048),
        defaults=Defaults(steps=10),
        encoder=DeploymentOptions(num_cpus=0.5),
        denoiser=DeploymentOptions(num_cpus=0.5),
    )


def _tiny() -> ServeConfig:
    return _cpu_sized(ModelSource(preset="tiny"))


def _local() -> ServeConfig:
    return _cpu_sized(ModelSource(fallback_preset="tiny"))


def _paper() -> ServeConfig:
    gpu = dict(num_cpus=2.0, num_gpus_when_present=1.0)
    return ServeConfig(
        model=ModelSource(),
        encoder=DeploymentOptions(**gpu),
        denoiser=DeploymentOptions(max_replicas=4, **gpu),
    )


PRESETS: Presets[ServeConfig] = Presets(ServeConfig)
PRESETS.register("tiny", _tiny)
PRESETS.register("local", _local)
PRESETS.register("paper", _paper)


def with_model_uri(config: ServeConfig, uri: str | None) -> ServeConfig:
    """`--model URI`: serve that model; the demo preset and fallback no longer apply."""
    if uri:
        config.model.uri = uri
        config.model.preset = None
        config.model.fallback_preset = None
    return config


def check(config: ServeConfig) -> None:
    """Raise ValueError for settings the service cannot run with."""
    limits, defaults = config.limits, config.defaults
    problems = []
    if not limits.min_steps <= defaults.steps <= limits.max_steps:
        problems.append(f"defaults.steps {defaults.steps} outside [{limits.min_steps}, {limits.max_steps}]")
    if not 1 <= defaults.num_images <= limits.max_num_images:
        problems.append(f"defaults.num_images {defaults.num_images} outside [1, {limits.max_num_images}]")
    if canonical_scheduler(defaults.scheduler) is None:
        problems.append(f"defaults.scheduler {defaults.scheduler!r} is not one of {', '.join(SCHEDULER_NAMES)}")
    if limits.min_side > limits.max_side or limits.size_multiple < 1:
        problems.append("limits: need min_side <= max_side and size_multiple >= 1")
    for name in ("encoder_max_batch_size", "denoiser_max_batch_size", "max_group_images"):
        if getattr(config.batching, name) < 1:
            problems.append(f"batching.{name} must be >= 1")
    for name in ("ingress", "encoder", "denoiser"):
        options: DeploymentOptions = getattr(config, name)
        if options.max_replicas is not None and options.max_replicas < options.min_replicas:
            problems.append(f"{name}.max_replicas < {name}.min_replicas")
    if problems:
        raise ValueError("invalid ServeConfig: " + "; ".join(problems))
