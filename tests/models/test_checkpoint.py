"""Checkpoints: safetensors + config.json round trip of the trainable parts, no pickle on load."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from kosmos_g.models.checkpoint import load_model, save_trainable
from kosmos_g.models.config import config_from_dict, model_preset
from kosmos_g.models.prompt import parse_prompt


@pytest.fixture
def trained(fresh_tiny, photos):
    """A tiny model nudged away from its initialisation by one stage-3 step."""
    from kosmos_g.models.images import vae_preprocess_batch

    model = fresh_tiny.train()
    opt = torch.optim.SGD(model.trainable_parameters(), lr=0.5)
    batch = model.tokenizer([parse_prompt("<i> on a beach", [photos[0]])])
    model.diffusion_loss(batch, vae_preprocess_batch(photos[:1], 32), torch.Generator().manual_seed(0)).backward()
    opt.step()
    return model.eval()


def test_round_trip_gives_identical_outputs(trained, tmp_path, photos, monkeypatch):
    directory = save_trainable(trained, tmp_path / "ckpt")
    assert sorted(p.name for p in directory.iterdir()) == ["config.json", "model.safetensors"]
    # Loading must never unpickle: make any torch.load call fail loudly.
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load (pickle) used"))
    loaded = load_model(directory).eval()
    prompts = [parse_prompt("<i> wearing <i>", photos[:2]), ["a cat in the snow"]]
    with torch.no_grad():
        assert torch.equal(trained.encode_prompts(prompts), loaded.encode_prompts(prompts))
        assert torch.equal(trained.empty_condition(1), loaded.empty_condition(1))
        batch = trained.tokenizer(["a cat"])
        assert torch.equal(trained.lm_loss(batch), loaded.lm_loss(batch))
    assert loaded.config == trained.config


def test_checkpoint_contents(trained, tmp_path):
    directory = save_trainable(trained, tmp_path / "ckpt")
    with safe_open(str(directory / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    assert {k.split(".")[0] for k in keys} == {"mllm", "aligner"}
    assert "mllm.resampler.latents" in keys and "aligner.encoder.query.queries" in keys
    assert "mllm.vision.model.encoder.layers.0.mlp.fc1.weight" in keys  # full MLLM incl. frozen CLIP
    assert not any(k.startswith("image_decoder") for k in keys)
    data = json.loads((directory / "config.json").read_text())
    assert data["name"] == "tiny" and data["mllm"]["vision"]["pretrained_path"] is None
    assert config_from_dict(data) == trained.config


def test_overrides_and_strict_loading(trained, tmp_path):
    directory = save_trainable(trained, tmp_path / "ckpt")
    loaded = load_model(directory, overrides={"image_decoder.frozen_dtype": "bfloat16", "aligner.dropout": "0.2"})
    assert loaded.image_decoder.unet.dtype == torch.bfloat16 and loaded.config.aligner.dropout == 0.2
    with pytest.raises(ValueError, match="no such field"):
        load_model(directory, overrides={"aligner.width": 3})
    config = json.loads((directory / "config.json").read_text())
    config["mllm"]["num_layers"] = 3
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(RuntimeError, match="Missing key"):
        load_model(directory)


def test_config_dict_round_trip_and_presets():
    from kosmos_g.models.config import apply_overrides, config_to_dict

    for name in ("tiny", "mini", "paper"):
        cfg = model_preset(name)
        assert config_from_dict(json.loads(json.dumps(config_to_dict(cfg)))) == cfg
    with pytest.raises(ValueError, match=r"\['mini', 'paper', 'tiny'\]"):
        model_preset("huge")
    with pytest.raises(ValueError, match="unknown field"):
        config_from_dict({"mllm": {"depth": 3}})
    cfg = apply_overrides(model_preset("tiny"), {"image_decoder.pretrained_path": "/sd", "tokenizer.max_length": "128",
                                                 "image_decoder.unet_block_out_channels": "32,64".split(",")})
    assert cfg.image_decoder.pretrained_path == "/sd" and cfg.tokenizer.max_length == 128
    assert cfg.image_decoder.unet_block_out_channels == (32, 64)
    assert apply_overrides(cfg, {"image_decoder.pretrained_path": "none"}).image_decoder.pretrained_path is None


def test_servable_bundle_carries_the_random_decoder(tmp_path):
    import torch

    from kosmos_g.models.checkpoint import load_model, save_servable
    from tests.models.conftest import make_tiny

    model = make_tiny().eval()
    save_servable(model, tmp_path / "bundle")
    assert (tmp_path / "bundle" / "image_decoder" / "unet" / "config.json").exists()
    torch.manual_seed(123)  # a different seed: the decoder must come from the bundle, not the RNG
    loaded = load_model(tmp_path / "bundle").eval()
    for name, tensor in model.image_decoder.unet.state_dict().items():
        assert torch.equal(tensor, loaded.image_decoder.unet.state_dict()[name]), name
    with torch.no_grad():
        assert torch.equal(model.encode_prompts(["a red cube"]), loaded.encode_prompts(["a red cube"]))


def test_a_folder_without_a_checkpoint_is_refused_saying_what_it_holds(tmp_path):
    """A registered mini decoder (a Stable Diffusion folder) given where a Kosmos-G model is
    asked for: refused at once, by name, before anything is built."""
    from diffusers import StableDiffusionPipeline

    from tests.models.conftest import make_tiny

    decoder = make_tiny().image_decoder
    sd_folder = tmp_path / "sd"
    StableDiffusionPipeline(
        vae=decoder.vae, text_encoder=decoder.text_encoder, tokenizer=decoder.clip_tokenizer, unet=decoder.unet,
        scheduler=decoder.noise_scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    ).save_pretrained(sd_folder)
    with pytest.raises(FileNotFoundError, match="diffusers pipeline folder"):
        load_model(sd_folder)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(tmp_path)
