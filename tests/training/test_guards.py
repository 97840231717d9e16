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
