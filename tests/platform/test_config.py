from dataclasses import dataclass, field

import argparse
import pytest

from kosmos_g.platform.config import ConfigError, Presets, apply_overrides, flatten, from_yaml, to_yaml


@dataclass
class Optim:
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.98)


@dataclass
class Job:
    name: str = "job"
    steps: int = 10
    bf16: bool = False
    init: str | None = None
    optim: Optim = field(default_factory=Optim)


PRESETS = Presets(Job)
PRESETS.register("tiny", lambda: Job(steps=3))
PRESETS.register("paper", lambda: Job(steps=200_000, bf16=True, optim=Optim(lr=1e-3)))


def test_presets_and_overrides():
    cfg = PRESETS.get("tiny", ["optim.lr=2e-4", "bf16=true", "init=models:/kosmos-g@latest", "steps=7"])
    assert cfg == Job(steps=7, bf16=True, init="models:/kosmos-g@latest", optim=Optim(lr=2e-4))
    assert PRESETS.get("paper").steps == 200_000
    assert apply_overrides(cfg, ["init=null"]).init is None
    assert apply_overrides(cfg, ["optim.betas=[0.8, 0.9]"]).optim.betas == (0.8, 0.9)
    assert apply_overrides(cfg, ["name=007"]).name == "007"


@pytest.mark.parametrize("override, message", [
    ("optim.lrr=1", "unknown key 'optim.lrr'"),
    ("steps=ten", "steps: expected an integer"),
    ("bf16=3", "bf16: expected true/false"),
    ("optim=3", "optim: expected a mapping"),
    ("steps.x=1", "not a section"),
    ("steps", "must look like section.key=value"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        PRESETS.get("tiny", [override])


def test_unknown_preset_lists_choices():
    with pytest.raises(ConfigError, match="choose one of: tiny, paper"):
        PRESETS.get("huge")


def test_yaml_round_trip_and_flatten():
    cfg = PRESETS.get("paper")
    assert from_yaml(Job, to_yaml(cfg)) == cfg
    assert flatten(cfg)["optim.lr"] == 1e-3
    with pytest.raises(ConfigError, match="unknown key"):
        from_yaml(Job, "stepz: 3\n")


def test_argparse_integration(tmp_path):
    parser = argparse.ArgumentParser()
    PRESETS.add_arguments(parser)
    args = parser.parse_args(["--preset", "paper", "--set", "steps=5"])
    assert PRESETS.from_args(args).steps == 5
    path = tmp_path / "job.yaml"
    path.write_text(to_yaml(Job(steps=42)))
    args = parser.parse_args(["--config", str(path), "--set", "bf16=true"])
    assert PRESETS.from_args(args) == Job(steps=42, bf16=True)


def test_fingerprints_leave_out_options_the_config_does_not_use():
    """A shuffle window decides the order only under `shuffle="stream"`: elsewhere it stays out of
    the fingerprint, so configs that never used it keep their registered fingerprints."""
    from kosmos_g.platform.config import fingerprint, inert_fields
    from kosmos_g.platform.train.config import stage_presets

    # Never deciding a weight: reading precomputed latents (the same losses), how often the eval
    # loss is measured and the threads of a worker's other threads; added later, they must not
    # change registered fingerprints.
    always = {"data.precomputed", "train.eval_every", "train.torch_threads_others", "optim.schedule"}
    cfg = stage_presets(3).get("mini")
    assert cfg.data.shuffle == "global" and set(inert_fields(cfg)) == always | {"data.shuffle_window"}
    before = fingerprint(cfg)
    cfg.data.shuffle_window = 9
    cfg.data.precomputed, cfg.train.eval_every, cfg.train.torch_threads_others = "off", 7, 0
    assert fingerprint(cfg) == before
    cfg.data.shuffle = "stream"
    streamed = fingerprint(cfg)
    assert streamed != before and set(inert_fields(cfg)) == always
    cfg.data.shuffle_window = 4
    assert fingerprint(cfg) != streamed


def test_mini_decoder_attention_option_keeps_registered_fingerprints():
    """Cross-attention at the U-Net's first level too (as SD has it) is a decoder option added
    after decoders were registered: off, it stays out of the fingerprint; on, it decides it and the
    U-Net built from the config attends to the text at every level."""
    from kosmos_g.models.mini import build_unet
    from kosmos_g.platform.config import fingerprint, inert_fields
    from kosmos_g.platform.train.backbone_job import backbone_presets

    cfg = backbone_presets("decoder").get("tiny")
    assert "decoder.full_resolution_attention" in inert_fields(cfg)
    before = fingerprint(cfg)
    assert build_unet(cfg.decoder, 16).config.down_block_types == ("DownBlock2D", "CrossAttnDownBlock2D")
    cfg.decoder.full_resolution_attention = True
    assert fingerprint(cfg) != before and "decoder.full_resolution_attention" not in inert_fields(cfg)
    unet = build_unet(cfg.decoder, 16)
    assert unet.config.down_block_types == ("CrossAttnDownBlock2D",) * 2
    assert unet.config.up_block_types == ("CrossAttnUpBlock2D",) * 2


def test_mini_decoder_head_count_option_keeps_registered_fingerprints():
    """diffusers reads `attention_head_dim` as a head count: the mini U-Net as registered has
    `unet_head_dim` heads of width/`unet_head_dim` channels. `unet_heads` (added later) sets the
    count itself; at its default it stays out of the fingerprint."""
    from kosmos_g.models.mini import build_unet
    from kosmos_g.platform.config import fingerprint, inert_fields
    from kosmos_g.platform.train.backbone_job import backbone_presets

    def attention_heads(unet) -> tuple[int, int]:
        attention = unet.down_blocks[-1].attentions[0].transformer_blocks[0].attn2
        return attention.heads, attention.inner_dim // attention.heads

    cfg = backbone_presets("decoder").get("tiny")  # U-Net widths (32, 64), unet_head_dim 16
    assert "decoder.unet_heads" in inert_fields(cfg)
    before = fingerprint(cfg)
    assert attention_heads(build_unet(cfg.decoder, 16)) == (16, 4)
    cfg.decoder.unet_heads = 2
    assert fingerprint(cfg) != before and "decoder.unet_heads" not in inert_fields(cfg)
    assert attention_heads(build_unet(cfg.decoder, 16)) == (2, 32)


def test_learning_rate_schedules():
    """Warm-up, then linear decay to 0 (the stages, appendix A) or the peak to the end
    (`optim.schedule=constant`); the linear default stays out of fingerprints, and an unknown
    schedule is refused before anything runs."""
    from kosmos_g.platform.config import fingerprint, inert_fields
    from kosmos_g.platform.train.backbone_job import backbone_presets
    from kosmos_g.platform.train.config import OptimConfig, stage_presets
    from kosmos_g.platform.train.loop import lr_lambda

    linear = lr_lambda(OptimConfig(warmup_steps=10), 110)
    constant = lr_lambda(OptimConfig(warmup_steps=10, schedule="constant"), 110)
    assert [linear(s) for s in (0, 9, 10, 60, 110)] == [0.1, 1.0, 1.0, 0.5, 0.0]
    assert [constant(s) for s in (0, 9, 10, 60, 110)] == [0.1, 1.0, 1.0, 1.0, 1.0]

    cfg = stage_presets(3).get("mini")
    assert "optim.schedule" in inert_fields(cfg)
    before = fingerprint(cfg)
    cfg.optim.schedule = "constant"
    assert fingerprint(cfg) != before and "optim.schedule" not in inert_fields(cfg)
    cfg.optim.schedule = "cosine"
    with pytest.raises(ConfigError, match="optim.schedule must be one of linear, constant"):
        cfg.validate()  # what a job does with its config first
    decoder = backbone_presets("decoder").get("mini", ["optim.schedule=cosine"])
    with pytest.raises(ConfigError, match="optim.schedule must be one of"):
        decoder.validate()


def test_torch_threads_are_checked_and_do_not_decide_a_fingerprint():
    """`train.torch_threads` (and `torch_threads_others`) change how fast a CPU worker computes, not
    what it trains: jobs that differ only in them share a registered version; a negative count is
    refused before any work."""
    from kosmos_g.platform.config import fingerprint
    from kosmos_g.platform.train import backbone_job, job
    from kosmos_g.platform.train.config import stage_presets

    one, two = (stage_presets(3).get("mini", [f"train.torch_threads={n}"]) for n in (1, 2))
    assert fingerprint(one, job.NOT_DECIDING) == fingerprint(two, job.NOT_DECIDING)
    assert fingerprint(one) != fingerprint(two)
    one, two = (backbone_job.backbone_presets("decoder").get("mini", [f"train.torch_threads={n}"]) for n in (1, 2))
    assert fingerprint(one, backbone_job.NOT_DECIDING) == fingerprint(two, backbone_job.NOT_DECIDING)
    one, two = (stage_presets(3).get("mini", [f"train.torch_threads_others={n}"]) for n in (0, 1))
    assert fingerprint(one, job.NOT_DECIDING) == fingerprint(two, job.NOT_DECIDING)
    one, two = (backbone_job.backbone_presets("clip").get("mini", [f"train.torch_threads_others={n}"]) for n in (0, 1))
    assert fingerprint(one, backbone_job.NOT_DECIDING) == fingerprint(two, backbone_job.NOT_DECIDING)
    for field in ("torch_threads", "torch_threads_others"):
        for cfg in (stage_presets(2).get("tiny", [f"train.{field}=-1"]),
                    backbone_job.backbone_presets("clip").get("tiny", [f"train.{field}=-1"])):
            with pytest.raises(ConfigError, match=f"train.{field} must be 0"):
                cfg.validate()
