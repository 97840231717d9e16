"""Non-tiny presets refuse random backbones and the bundled sample shards unless asked."""

from __future__ import annotations

import pytest

from kosmos_g.platform.config import ConfigError
from kosmos_g.platform.train.config import check_real_inputs, missing_real_inputs, stage_presets
from kosmos_g.platform.train.job import main


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_paper_preset_names_every_random_or_toy_input(stage, capsys):
    assert main(stage, ["--preset", "paper"]) == 2
    err = capsys.readouterr().err
    assert "model.mllm.vision.pretrained_path" in err and "allow_random=true" in err
    assert ("model.image_decoder.pretrained_path" in err) == (stage != 1)
    assert "bundled sample set" in err


def test_real_paths_or_allow_random_pass(tmp_path):
    cfg = stage_presets(3).get("paper")
    assert len(missing_real_inputs(cfg)) == 5  # CLIP, SD, three sample-set prefixes
    cfg.model.mllm.vision.pretrained_path = "s3://weights/clip-vit-large-patch14"
    cfg.model.image_decoder.pretrained_path = str(tmp_path / "stable-diffusion-v1-5")
    for source in ("captions", "compositional", "editing"):
        setattr(cfg.data, source, f"s3://data/{source}")
    check_real_inputs(cfg)  # nothing missing
    cfg.model.image_decoder.pretrained_path = None
    with pytest.raises(ConfigError, match="image_decoder.pretrained_path"):
        check_real_inputs(cfg)
    cfg.allow_random = True
    check_real_inputs(cfg)


def test_tiny_preset_is_exempt():
    assert missing_real_inputs(stage_presets(3).get("tiny")) == []


def test_paper_stage3_drops_small_images():
    assert stage_presets(3).get("paper").data.min_image_side == 384
    assert stage_presets(3).get("tiny").data.min_image_side == 0


def test_removed_background_fill_is_checked_before_anything_runs(capsys):
    for preset in ("mini", "paper"):
        assert stage_presets(3).get(preset).data.removed_background == "white"  # as released
    assert main(3, ["--preset", "tiny", "--set", "data.removed_background=grey"]) == 2
    assert "data.removed_background must be 'white', 'random' or 'colours'" in capsys.readouterr().err
    assert main(3, ["--preset", "tiny", "--set", "data.removed_background=colours"]) == 2
    assert "needs data.fill_colours" in capsys.readouterr().err


def test_stage2_ablation_builds_a_fresh_aligner_and_keeps_the_mllm(tmp_path):
    """`--set model.aligner.encoder_layers=0` after a stage-1 bundle (whose AlignerNet has an
    encoder) is not silently replaced by the bundle's AlignerNet: stage 2 builds the asked one."""
    import torch

    from kosmos_g.models.checkpoint import save_servable
    from kosmos_g.models.config import model_preset
    from kosmos_g.models.kosmos_g import KosmosG
    from kosmos_g.platform.train.task import StageTask

    torch.manual_seed(0)
    stage1 = KosmosG.from_config(model_preset("tiny"))
    assert stage1.config.aligner.encoder_layers > 0
    bundle = save_servable(stage1, tmp_path / "stage1")
    cpu = torch.device("cpu")

    ablation = StageTask(2).build(stage_presets(2).get("tiny", ["model.aligner.encoder_layers=0"]), str(bundle), cpu)
    assert ablation.config.aligner.encoder_layers == 0
    assert sum(p.numel() for p in ablation.aligner.parameters()) < sum(p.numel() for p in stage1.aligner.parameters())
    for name, value in stage1.mllm.state_dict().items():
        assert torch.equal(ablation.mllm.state_dict()[name], value), name

    same = StageTask(2).build(stage_presets(2).get("tiny"), str(bundle), cpu)
    for name, value in stage1.aligner.state_dict().items():
        assert torch.equal(same.aligner.state_dict()[name], value), name


@pytest.mark.parametrize("override, message", [("data.precomputed=maybe", "'auto' or 'off'"),
                                                ("train.eval_every=-1", "eval_every")])
def test_bad_precompute_and_eval_settings_are_refused_before_anything_runs(override, message):
    cfg = stage_presets(3).get("tiny", [override])
    with pytest.raises(ConfigError, match=message):
        cfg.validate()
