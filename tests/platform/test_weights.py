"""Weights and vocabularies in object storage: CLIP in transformers layout, Stable Diffusion in
diffusers layout and the official vocabulary load from s3:// exactly as from a local folder."""

from __future__ import annotations

from pathlib import Path

import torch

from kosmos_g.models.config import model_preset
from kosmos_g.models.kosmos_g import KosmosG
from kosmos_g.platform import storage
from kosmos_g.platform.weights import localize
from tests.conftest import save_sd_folder

OFFICIAL = Path(__file__).resolve().parents[2].parent / "shared" / "reference" / "official"


def _save_tiny_clip(directory: Path):
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(3)
    clip = CLIPModel(CLIPConfig(
        text_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37),
        vision_config=dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
                           image_size=32, patch_size=8, hidden_act="quick_gelu"),
    ))
    clip.save_pretrained(directory)
    return clip


def test_s3_clip_and_sd_folders_build_the_model(tmp_path, s3_prefix, monkeypatch):
    monkeypatch.setenv("KOSMOS_CACHE_DIR", str(tmp_path / "cache"))
    clip = _save_tiny_clip(tmp_path / "clip")
    reference = KosmosG.from_config(model_preset("tiny"))
    save_sd_folder(tmp_path / "sd", reference.image_decoder)
    storage.upload_dir(tmp_path / "clip", f"{s3_prefix}/clip-vit")
    storage.upload_dir(tmp_path / "sd", f"{s3_prefix}/sd15")

    cfg = model_preset("tiny")
    cfg.mllm.vision.pretrained_path = f"{s3_prefix}/clip-vit"
    cfg.image_decoder.pretrained_path = f"{s3_prefix}/sd15"
    local = localize(cfg)
    assert cfg.mllm.vision.pretrained_path.startswith("s3://")  # the input config is untouched
    assert Path(local.mllm.vision.pretrained_path).is_dir() and Path(local.image_decoder.pretrained_path).is_dir()
    model = KosmosG.from_config(local)
    ours = model.mllm.vision.model.encoder.layers[1].mlp.fc1.weight
    assert torch.equal(ours, clip.vision_model.encoder.layers[1].mlp.fc1.weight)
    unet_a, unet_b = model.image_decoder.unet.state_dict(), reference.image_decoder.unet.state_dict()
    assert all(torch.equal(unet_a[k], unet_b[k]) for k in unet_a)
    assert localize(cfg).image_decoder.pretrained_path == local.image_decoder.pretrained_path  # cached


def test_s3_official_vocabulary_and_sentencepiece_file(tmp_path, s3_prefix, monkeypatch):
    import pytest

    if not (OFFICIAL / "dict.txt").is_file():
        pytest.skip(f"the release's vocabulary files are not at {OFFICIAL}")
    monkeypatch.setenv("KOSMOS_CACHE_DIR", str(tmp_path / "cache"))
    for name in ("dict.txt", "sentencepiece.bpe.model"):
        storage.write_bytes(f"{s3_prefix}/vocab/{name}", (OFFICIAL / name).read_bytes())
    cfg = model_preset("tiny")
    cfg.tokenizer.kind, cfg.tokenizer.vocab_dir = "official", f"{s3_prefix}/vocab"
    cfg.mllm.vocab_size = 0  # size from the tokenizer
    model = KosmosG.from_config(localize(cfg))
    assert model.tokenizer.vocab_size == 64_007 and model.mllm.decoder.embed_tokens.num_embeddings == 64_007

    spm = localize(model_preset("tiny")).tokenizer.sentencepiece_path
    assert spm is None  # None = the shipped Mistral model; nothing to fetch
    cfg = model_preset("tiny")
    cfg.tokenizer.sentencepiece_path = f"{s3_prefix}/vocab/sentencepiece.bpe.model"
    assert Path(localize(cfg).tokenizer.sentencepiece_path).read_bytes() == (OFFICIAL / "sentencepiece.bpe.model").read_bytes()
