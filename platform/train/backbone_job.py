"""The driver of the mini-backbone jobs (pipelines/mini_clip.py, mini_text_clip.py, mini_decoder.py):
the miniature world's CLIP and Stable-Diffusion pretraining in small.

    ray job submit -- python pipelines/mini_clip.py --preset mini        # -> kosmos-g-mini-clip
    ray job submit -- python pipelines/mini_text_clip.py --preset mini   # -> kosmos-g-mini-text-clip
    ray job submit -- python pipelines/mini_decoder.py --preset mini     # -> kosmos-g-mini-decoder

Two CLIPs where the paper has one (CLIP ViT-L/14 is both SD's text encoder and the MLLM's image
encoder): the MLLM's vision tower needs close-ups (an entity crop must look like its scene's
object), and close-ups hold a text tower's composition back (a decoder on it draws held-out
backgrounds 0.65, on a scenes-only CLIP 0.99; docs/REPRODUCTION.md). Kosmos-G needs no shared
CLIP: stage 2 aligns to whichever text encoder the decoder reads.

Each streams the world's caption shards (written on first use) with Ray Data into the shared Ray
Train + DeepSpeed loop, logs to MLflow and registers the result, tagged with a fingerprint of its
config: a later run of the same config reuses that version unless `--set force=true`. The decoder
job trains the VAE (its own MLflow run, `<name>-vae`), then the U-Net on the frozen text CLIP;
its run name carries that CLIP (`mini-decoder-textclip3`), so a newer CLIP gets a fresh run. Between
the two it writes what the frozen VAE and text CLIP make of every record beside the caption shards
(decoder_inputs.py), which the U-Net's steps read (`data.precomputed=off`: computed in the step).
"""

from __future__ import annotations

import copy
import sys

from kosmos_g.models.mini import MiniClipConfig, MiniDecoderConfig
from kosmos_g.platform import storage, tracking
from kosmos_g.platform.config import Presets, fingerprint, job_main
from kosmos_g.platform.data.datastream import DataConfig
from kosmos_g.platform.stack import cluster
from kosmos_g.platform.train.backbones import (BackboneConfig, ClipTask, UnetTask, VaeTask, backbone_dataset,
                                               to_tensors)
from kosmos_g.platform.train.config import OptimConfig, TrainConfig, world_root
from kosmos_g.platform.train.decoder_inputs import ensure_decoder_inputs
from kosmos_g.platform.train.job import RESUMABLE, check_cpu_room, check_resumable, checkpoint_uri, run_trainer
from kosmos_g.platform.train.loop import BUNDLE_DIR



def world_captions(part: str = "captions") -> str:
    """The world's scene captions (the text CLIP's and the decoder's data), or its `clip` pairs
    (scenes and close-ups)."""
    return f"{world_root()}/{part}"


def _data(captions: str) -> DataConfig:
    # Preprocessing and reads share the second core with nothing else: one worker, small reservations.
    return DataConfig(captions=captions, num_cpus=0.25, workers=1, samples_per_epoch=0, shuffle="blocks")


def _train(steps: int, batch: int, checkpoint_every: int) -> TrainConfig:
    # Half a CPU reserved: Ray Data's file listing asks for a whole CPU of the two a laptop-sized Ray
    # head advertises, and must not wait for the worker. Two torch threads all the same: the reads and
    # the preprocessing take a fraction of a core, which one thread would leave mostly idle.
    return TrainConfig(steps=steps, batch_size=batch, num_workers=1, use_gpu=False, cpus_per_worker=0.5,
                       torch_threads=2,
                       zero_stage=0, checkpoint_every=checkpoint_every, log_every=max(1, min(50, steps // 4)),
                       max_failures=2)


def _mini(kind: str) -> BackboneConfig:
    if kind == "clip":
        return BackboneConfig(kind="clip", name="mini-clip", data=_data(world_captions("clip")),
                              optim=OptimConfig(lr=5e-4, warmup_steps=50), train=_train(600, 64, 200))
    if kind == "text-clip":
        # 1,500 steps: the decoder on it draws held-out backgrounds 0.99 (0.63 at 600 steps).
        return BackboneConfig(kind="text-clip", name="mini-text-clip", data=_data(world_captions()),
                              optim=OptimConfig(lr=5e-4, warmup_steps=50), train=_train(1500, 64, 500))
    # 800 VAE + 5,000 U-Net steps (an estimated 60-85 min here). Told the held-out cases in words,
    # the decoder draws the shape in 0.18 at 1,000 U-Net steps, 0.62 at 3,000 and 0.74 at 5,000, and
    # both of two objects in 0.02, 0.30 and 0.48 (docs/REPRODUCTION.md, 2026-12-03). The steps take
    # the chain past its 90-minute budget; the shapes and the two-subject scenes are what the method
    # is measured on.
    # SD's recipe: a constant rate after the warm-up, the U-Net saved as the moving average of its
    # weights. In bench/mini_sweep.py (two seeds) it composes held-out pairs better than the linear
    # decay to 0 (colour 0.55 / 0.76 against 0.48 / 0.51), which an average cannot improve on
    # (docs/REPRODUCTION.md, 2026-12-03). The schedule applies to the VAE's steps too.
    return BackboneConfig(kind="decoder", name="mini-decoder", vae_steps=800, data=_data(world_captions()),
                          decoder=MiniDecoderConfig(unet_ema_decay=0.9999),
                          optim=OptimConfig(lr=1e-3, warmup_steps=50, schedule="constant"),
                          train=_train(5000, 32, 500))


def _tiny(kind: str) -> BackboneConfig:
    cfg = _mini(kind)
    cfg.name = f"mini-{kind}-tiny"
    cfg.clip = MiniClipConfig(width=32, layers=1, heads=2, patch_size=8, projection_dim=32)
    cfg.decoder = MiniDecoderConfig(image_size=16, vae_channels=(8, 16), unet_channels=(32, 64), unet_head_dim=16,
                                    unet_ema_decay=cfg.decoder.unet_ema_decay)
    cfg.vae_steps = 12
    cfg.data.samples_per_epoch = 256
    cfg.optim = OptimConfig(lr=2e-3, warmup_steps=2)
    cfg.train = _train(16, 8, 8)
    return cfg


def backbone_presets(kind: str) -> Presets[BackboneConfig]:
    presets: Presets[BackboneConfig] = Presets(BackboneConfig)
    presets.register("mini", lambda: _mini(kind))
    presets.register("tiny", lambda: _tiny(kind))
    return presets


# What does not decide the trained weights: names, locations, switches and the CPUs reserved.
NOT_DECIDING = ("name", "storage_path", "register", "force", "train.cpus_per_worker",
                "train.torch_threads", "train.placement_strategy", "data.num_cpus")


def ensure_world(cfg: BackboneConfig) -> None:
    from kosmos_g.platform.data.world import ensure_world_shards

    if cfg.data.captions in (world_captions(), world_captions("clip")):
        ensure_world_shards(world_root())


TEXT_CLIP = "models:/kosmos-g-mini-text-clip/latest"


def resolve_clip(cfg: BackboneConfig) -> str:
    """A concrete URI of the decoder's frozen text CLIP (a fixed version, so every worker reads the same)."""
    uri = TEXT_CLIP if cfg.clip_model == "auto" else cfg.clip_model
    try:
        return tracking.pin_model_uri(uri)
    except ValueError as error:
        raise ValueError(f"{error}: run pipelines/mini_text_clip.py first (or --set clip_model=URI)") from None


def pinned_fingerprint(cfg: BackboneConfig) -> str:
    """What a registered version is tagged with. A decoder's names the CLIP version it is conditioned
    on (`auto` pinned first), so a newer mini CLIP is not silently served an older decoder."""
    if cfg.kind == "decoder":
        cfg.clip_model = resolve_clip(cfg)
    return fingerprint(cfg, NOT_DECIDING)


def decoder_run_name(name: str, clip_uri: str) -> str:
    """A decoder's run (its Ray Train checkpoints, its MLflow run key) carries the CLIP it is
    conditioned on: trained again on a newer mini CLIP, it starts a run of its own instead of
    refusing to resume checkpoints conditioned on another CLIP."""
    import hashlib
    import re

    registered = re.fullmatch(r"models:/kosmos-g-mini-(text-)?clip/(\d+)", clip_uri)
    if registered:
        tag = f"{'textclip' if registered.group(1) else 'clip'}{registered.group(2)}"
    else:
        tag = f"clip-{hashlib.sha1(clip_uri.encode()).hexdigest()[:8]}"
    return name if name.endswith(f"-{tag}") else f"{name}-{tag}"


def _fit(cfg: BackboneConfig, task, pixels: str, image_size: int, run_id: str, inputs: str | None = None):
    result = run_trainer(cfg, task, backbone_dataset(cfg, pixels, image_size, inputs), to_tensors, None, run_id)
    if result.error:
        raise result.error
    return result


def train_decoder(cfg: BackboneConfig, run_id: str):
    clip_uri = resolve_clip(cfg)
    tracking.client().set_tag(run_id, "clip_model", clip_uri)
    vae_cfg = copy.deepcopy(cfg)
    vae_cfg.name, vae_cfg.train.steps = f"{cfg.name}-vae", cfg.vae_steps
    vae_cfg.train.checkpoint_every = min(cfg.train.checkpoint_every, cfg.vae_steps)
    vae_run, _ = tracking.start_run(cfg.pipeline, vae_cfg.name, vae_cfg, tags={"part": "vae"})
    vae = _fit(vae_cfg, VaeTask(), "vae", cfg.decoder.image_size, vae_run)
    tracking.end_run(vae_run)
    vae_uri = storage.join(checkpoint_uri(vae_cfg, vae.checkpoint), BUNDLE_DIR)
    print(f"[{cfg.pipeline}] VAE trained ({vae_uri}); U-Net on the frozen {clip_uri}", flush=True)
    inputs = None
    if cfg.data.precomputed != "off":  # the frozen VAE's and text CLIP's outputs, once per record
        inputs = ensure_decoder_inputs(cfg.data.captions, vae_uri, clip_uri, cfg.decoder.image_size,
                                       f"[{cfg.pipeline}]")
    return _fit(cfg, UnetTask(vae_uri, clip_uri), "vae", cfg.decoder.image_size, run_id, inputs)


def log_binding(cfg: BackboneConfig, run_id: str, clip_dir: str) -> None:
    """The trained CLIP's zero-shot colour binding and shape choice on scenes and close-ups,
    logged to its run."""
    from kosmos_g.platform.evaluation.clip_binding import clip_binding

    binding = clip_binding(clip_dir)
    tracking.log_metrics(run_id, binding, cfg.train.steps)
    for check, says in (("binding_", "colour binding (own caption beats the colour-swapped one)"),
                        ("shape_", "shapes (own caption beats the three other shapes; chance 0.25)")):
        print(f"[{cfg.pipeline}] zero-shot {says}: " + ", ".join(
            f"{name.removeprefix(check)} {value:.2f}" for name, value in binding.items() if name.startswith(check)),
            flush=True)


def run_backbone(cfg: BackboneConfig) -> str | None:
    """Train (or reuse) and register one backbone; returns "name/version" when registered."""
    cfg.validate()
    cluster.connect()
    config_hash = pinned_fingerprint(cfg)
    existing = None if cfg.force else tracking.version_tagged(cfg.registered_name, "config_hash", config_hash)
    if existing:
        print(f"[{cfg.pipeline}] {cfg.registered_name}/{existing} was trained with this config: reused "
              "(--set force=true trains again)", flush=True)
        return f"{cfg.registered_name}/{existing}"
    check_cpu_room(cfg)
    if cfg.kind == "decoder":
        cfg.name = decoder_run_name(cfg.name, cfg.clip_model)  # clip_model is pinned by now
    resume_hash = fingerprint(cfg, NOT_DECIDING + RESUMABLE)
    check_resumable(cfg, None, resume_hash, config_hash)  # the job name's checkpoints must be this config's
    ensure_world(cfg)
    run_id, _ = tracking.start_run(cfg.pipeline, cfg.name, cfg)
    # A continued run (more steps) trains this config now.
    tracking.set_tags(run_id, {"config_hash": config_hash, "resume_hash": resume_hash})
    try:
        if cfg.trains_clip:
            result = _fit(cfg, ClipTask(), "clip", cfg.clip.image_size, run_id)
        else:
            result = train_decoder(cfg, run_id)
        with result.checkpoint.as_directory() as directory:
            tracking.log_dir(run_id, f"{directory}/{BUNDLE_DIR}", "model")
            if cfg.trains_clip:
                log_binding(cfg, run_id, f"{directory}/{BUNDLE_DIR}")
        registered = None
        if cfg.register:
            version = tracking.register_model(
                run_id, "model", cfg.registered_name,
                tags={"config_hash": config_hash, "kind": cfg.kind, "steps": str(cfg.train.steps)},
                description=f"Miniature-world {cfg.kind} backbone ({cfg.train.steps} steps), run {run_id}")
            registered = f"{cfg.registered_name}/{version}"
    except BaseException:
        tracking.end_run(run_id, "FAILED")
        raise
    tracking.end_run(run_id)
    print(f"[{cfg.pipeline}] done: registered {registered}; run {run_id}", flush=True)
    return registered


def main(kind: str, argv: list[str] | None = None) -> int:
    return job_main(argv, backbone_presets(kind), "mini", ("name",), run_backbone,
                    f"Train the miniature world's mini {kind} on Ray Train + DeepSpeed")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2:]))
