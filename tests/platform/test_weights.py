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


def _decoder_state(model) -> dict[str, torch.Tensor]:
    return model.image_decoder.unet.state_dict()


def test_a_trained_bundle_names_its_decoder_where_the_job_got_it(tmp_path, s3_prefix, monkeypatch):
    """A stage's bundle must load on another machine: it names the decoder by its `s3://` URI, not
    by the worker's cached copy, and a random decoder carried by the starting bundle is carried on."""
    import json
    import shutil

    from kosmos_g.models.checkpoint import CONFIG_NAME, DECODER_DIR
    from kosmos_g.platform.train.config import stage_presets
    from kosmos_g.platform.train.task import StageTask
    from kosmos_g.platform.weights import load_bundle

    monkeypatch.setenv("KOSMOS_CACHE_DIR", str(tmp_path / "cache"))
    reference = KosmosG.from_config(model_preset("tiny"))
    save_sd_folder(tmp_path / "sd", reference.image_decoder)
    storage.upload_dir(tmp_path / "sd", f"{s3_prefix}/sd15")

    cfg = stage_presets(1).get("tiny")
    cfg.model.image_decoder.pretrained_path = f"{s3_prefix}/sd15"
    task = StageTask(1)
    task.save_bundle(task.build(cfg, None, torch.device("cpu")), tmp_path / "from-s3")
    written = json.loads((tmp_path / "from-s3" / CONFIG_NAME).read_text())["image_decoder"]
    assert written["pretrained_path"] == f"{s3_prefix}/sd15" and not (tmp_path / "from-s3" / DECODER_DIR).exists()
    shutil.rmtree(tmp_path / "cache")  # another machine: nothing cached
    loaded = load_bundle(tmp_path / "from-s3")
    assert all(torch.equal(value, _decoder_state(reference)[key]) for key, value in _decoder_state(loaded).items())

    # Stage 1 on a random decoder carries it; stage 2 started from that bundle carries it again.
    task = StageTask(1)
    task.save_bundle(task.build(stage_presets(1).get("tiny"), None, torch.device("cpu")), tmp_path / "stage1")
    storage.upload_dir(tmp_path / "stage1", f"{s3_prefix}/stage1")
    stage1 = load_bundle(tmp_path / "stage1")
    task = StageTask(2)
    task.save_bundle(task.build(stage_presets(2).get("tiny"), f"{s3_prefix}/stage1", torch.device("cpu")),
                     tmp_path / "stage2")
    shutil.rmtree(tmp_path / "cache")
    written = json.loads((tmp_path / "stage2" / CONFIG_NAME).read_text())["image_decoder"]
    assert written["pretrained_path"] == DECODER_DIR and (tmp_path / "stage2" / DECODER_DIR).is_dir()
    loaded = load_bundle(tmp_path / "stage2")
    assert all(torch.equal(value, _decoder_state(stage1)[key]) for key, value in _decoder_state(loaded).items())

    # What the precomputed latents are keyed by names the decoder the same way on every machine.
    from kosmos_g.platform.train.job import decoder_identity, model_config_for

    storage.upload_dir(tmp_path / "stage2", f"{s3_prefix}/stage2")
    storage.upload_dir(tmp_path / "from-s3", f"{s3_prefix}/from-s3")
    for init, identity in ((f"{s3_prefix}/stage2", f"{s3_prefix}/stage2#image_decoder"),
                           (f"{s3_prefix}/from-s3", f"{s3_prefix}/sd15")):
        assert decoder_identity(model_config_for(stage_presets(3).get("tiny"), init), init) == identity


def test_a_stage_trains_on_the_decoder_its_config_names_not_the_starting_bundles(tmp_path, s3_prefix, monkeypatch):
    """Stage 3 started from a stage-2 bundle on decoder A, its config naming decoder B (a retrained
    or cheaper one): the model is built on B, its bundle names B, and the precomputed latents are
    keyed by B, as the job's fingerprint (which records the config) says; naming A changes nothing."""
    import json

    from kosmos_g.models.checkpoint import CONFIG_NAME
    from kosmos_g.platform.train.config import stage_presets
    from kosmos_g.platform.train.job import decoder_identity, model_config_for
    from kosmos_g.platform.train.task import StageTask
    from kosmos_g.platform.weights import decoder_override

    monkeypatch.setenv("KOSMOS_CACHE_DIR", str(tmp_path / "cache"))
    decoders = {}
    for name, seed in (("a", 1), ("b", 2)):
        torch.manual_seed(seed)
        decoders[name] = KosmosG.from_config(model_preset("tiny"))
        save_sd_folder(tmp_path / name, decoders[name].image_decoder)
        storage.upload_dir(tmp_path / name, f"{s3_prefix}/{name}")
    on_a = stage_presets(2).get("tiny")
    on_a.model.image_decoder.pretrained_path = f"{s3_prefix}/a"
    task = StageTask(2)
    task.save_bundle(task.build(on_a, None, torch.device("cpu")), tmp_path / "stage2")
    storage.upload_dir(tmp_path / "stage2", f"{s3_prefix}/stage2")

    assert decoder_override(tmp_path / "stage2", f"{s3_prefix}/a") == {}
    assert decoder_override(tmp_path / "stage2", None) == {}
    on_b = stage_presets(3).get("tiny")
    on_b.model.image_decoder.pretrained_path = f"{s3_prefix}/b"
    task = StageTask(3)
    model = task.build(on_b, f"{s3_prefix}/stage2", torch.device("cpu"))
    reference = _decoder_state(decoders["b"])
    assert all(torch.equal(value, reference[key]) for key, value in _decoder_state(model).items())
    task.save_bundle(model, tmp_path / "stage3")
    assert json.loads((tmp_path / "stage3" / CONFIG_NAME).read_text())["image_decoder"]["pretrained_path"] == \
        f"{s3_prefix}/b"
    init = f"{s3_prefix}/stage2"
    assert decoder_identity(model_config_for(on_b, init), init) == f"{s3_prefix}/b"
    on_a = stage_presets(3).get("tiny")
    on_a.model.image_decoder.pretrained_path = f"{s3_prefix}/a"
    assert decoder_identity(model_config_for(on_a, init), init) == f"{s3_prefix}/a"
