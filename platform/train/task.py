"""What a training job trains, as the shared loop (loop.py) sees it.

The loop (DeepSpeed engine, checkpoints, metrics, fault handling) is the same for the three
Kosmos-G stages and for the mini backbones of the miniature world; a `Task` supplies the part that
differs: its config type, the model each worker builds, the loss of a batch and the files of the
finished model. Tasks travel to Ray Train workers by pickling, so they hold plain data only.
"""

from __future__ import annotations

from typing import Any

import torch

MODEL_KEYS = ("input_ids", "attention_mask", "image_mask", "loss_mask", "pixel_values")


class Task:
    config_type: type

    def build(self, cfg, init_uri: str | None, device: torch.device) -> torch.nn.Module:
        """The model to train, with `trainable_parameters()`; identical on every rank."""
        raise NotImplementedError

    def losses(self, model, batch: dict[str, Any], cfg, generator: torch.Generator | None = None,
               training: bool = True) -> dict[str, torch.Tensor]:
        """{"loss": ..., other terms}. `model` is the DeepSpeed engine or the bare module;
        `training=False` (the fixed-batch eval loss) turns off random dropouts of conditions."""
        raise NotImplementedError

    def after_step(self, model) -> None:
        """Called with the bare module after every optimiser step (e.g. to update an average of
        the weights); nothing by default."""

    def save_bundle(self, model, directory) -> None:
        """The finished model's files (what gets logged and registered)."""
        raise NotImplementedError

    def count(self, batch: dict[str, Any]) -> tuple[int, int]:
        """(samples, tokens) in a batch, for throughput metrics."""
        return int(batch["input_ids"].shape[0]), int(batch["attention_mask"].sum())


class StageTask(Task):
    """A Kosmos-G training stage (1 pretrain, 2 align, 3 instruct) of `KosmosG`."""

    def __init__(self, stage: int):
        self.stage = stage
        self.sources = None  # the ModelConfig `build` built from, before its inputs were fetched

    @property
    def config_type(self):
        from kosmos_g.platform.train.config import StageConfig

        return StageConfig

    def build(self, cfg, init_uri, device):
        from kosmos_g.models.kosmos_g import KosmosG
        from kosmos_g.platform import tracking
        from kosmos_g.platform.weights import bundle_sources, decoder_override, load_bundle, localize

        torch.manual_seed(cfg.train.seed)
        if init_uri:
            bundle = tracking.resolve_artifacts(init_uri)
            aligner = self.fresh_aligner(cfg, bundle)
            overrides = {**(aligner or {}), **decoder_override(bundle, cfg.model.image_decoder.pretrained_path)}
            model = load_bundle(bundle, overrides or None, fresh_parts=("aligner",) if aligner else ())
            self.sources = bundle_sources(bundle, overrides)
        else:
            model = KosmosG.from_config(localize(cfg.model))
            self.sources = cfg.model
        model.set_stage(cfg.stage)
        return model.to(device).train()

    @staticmethod
    def fresh_aligner(cfg, bundle) -> dict | None:
        """Stage 2 is where the AlignerNet learns; asked for another AlignerNet than the starting
        bundle's (the encoder-less ablation after a stage-1 bundle), it starts fresh from the
        stage's own config: the overrides for that, else None (the bundle's is loaded)."""
        from dataclasses import asdict

        from kosmos_g.models.checkpoint import load_config

        if cfg.stage != 2 or load_config(bundle).aligner == cfg.model.aligner:
            return None
        print(f"[{cfg.pipeline}] AlignerNet built from the stage config ({cfg.model.aligner}), not loaded from the "
              "starting bundle", flush=True)
        return {f"aligner.{name}": value for name, value in asdict(cfg.model.aligner).items()}

    def losses(self, model, batch, cfg, generator=None, training=True):
        return model({k: batch[k] for k in MODEL_KEYS}, captions=batch.get("captions"),
                     target_pixels=batch.get("target_pixels"), generator=generator,
                     cond_dropout=cfg.train.cond_dropout if training else 0.0,
                     teacher=batch.get("teacher"), target_moments=batch.get("target_moments"))

    def save_bundle(self, model, directory):
        from kosmos_g.models.checkpoint import save_servable
        from kosmos_g.platform.weights import portable

        # The bundle names the decoder as the job was given it, not by this worker's cached copy.
        save_servable(model, directory, portable(model.config, self.sources) if self.sources else None)
