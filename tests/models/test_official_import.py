"""`kosmos-g import official` on checkpoints in the release's key layout.

The real `checkpoint_final.pt` (≈ 9 GB) cannot be had here, so `official_state` writes a small
one from the official module definitions (torchscale Decoder/Encoder layers with Sub-LN, fairseq
sinusoid buffer, SoPE/xPos buffer, XConnector, open_clip's patched ResidualAttentionBlock with both
`attn` and `ts_attn`, `Aligner_encoder`/`Aligner`), names and shapes only. What this verifies:
every official tensor lands in a model slot of the right shape and strict loading succeeds; the
CLIP tower computes what open_clip computes with the same tensors (fused in_proj split in q, k, v
order); positions skip fairseq's offset of 2. What only the real file can verify: head counts
read from its arguments and the release's numerics end to end (its generated images).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from kosmos_g.models.config import model_preset
from kosmos_g.models.official import OfficialCheckpointError, convert, load_converted, read_checkpoint, read_clip

DIM, LAYERS, HEADS, FFN, LATENTS = 64, 2, 4, 128, 4
CLIP_WIDTH, CLIP_LAYERS, CLIP_PATCH, CLIP_IMAGE = 128, 2, 8, 32  # open_clip: 64 per head -> 2 heads
ALIGN_DIM, ALIGN_FFN, ALIGN_LAYERS, ALIGN_ROWS = 32, 64, 2, 258  # rows = 256 positions + offset 2


def _add_linear(state, name, out_features, in_features, bias=True):
    state[f"{name}.weight"] = torch.randn(out_features, in_features) * 0.05
    if bias:
        state[f"{name}.bias"] = torch.randn(out_features) * 0.02


def _add_norm(state, name, width):
    state[f"{name}.weight"] = 1 + torch.randn(width) * 0.05
    state[f"{name}.bias"] = torch.randn(width) * 0.02


def _torchscale_layer(state, prefix, dim, ffn, cross=False):
    """torchscale EncoderLayer/DecoderLayer with subln: inner_attn_ln only in self-attention."""
    for proj in ("k_proj", "v_proj", "q_proj", "out_proj"):
        _add_linear(state, f"{prefix}.self_attn.{proj}", dim, dim)
        if cross:
            _add_linear(state, f"{prefix}.encoder_attn.{proj}", dim, dim)
    _add_norm(state, f"{prefix}.self_attn.inner_attn_ln", dim)
    _add_norm(state, f"{prefix}.self_attn_layer_norm", dim)
    if cross:
        _add_norm(state, f"{prefix}.encoder_attn_layer_norm", dim)
    _add_linear(state, f"{prefix}.ffn.fc1", ffn, dim)
    _add_linear(state, f"{prefix}.ffn.fc2", dim, ffn)
    _add_norm(state, f"{prefix}.ffn.ffn_layernorm", ffn)
    _add_norm(state, f"{prefix}.final_layer_norm", dim)


def open_clip_visual(prefix="visual.", ts_attn=False):
    state = {}
    grid = CLIP_IMAGE // CLIP_PATCH
    state[f"{prefix}conv1.weight"] = torch.randn(CLIP_WIDTH, 3, CLIP_PATCH, CLIP_PATCH) * 0.05
    state[f"{prefix}class_embedding"] = torch.randn(CLIP_WIDTH) * 0.1
    state[f"{prefix}positional_embedding"] = torch.randn(grid * grid + 1, CLIP_WIDTH) * 0.1
    _add_norm(state, f"{prefix}ln_pre", CLIP_WIDTH)
    for i in range(CLIP_LAYERS):
        block = f"{prefix}transformer.resblocks.{i}"
        state[f"{block}.attn.in_proj_weight"] = torch.randn(3 * CLIP_WIDTH, CLIP_WIDTH) * 0.05
        state[f"{block}.attn.in_proj_bias"] = torch.randn(3 * CLIP_WIDTH) * 0.02
        _add_linear(state, f"{block}.attn.out_proj", CLIP_WIDTH, CLIP_WIDTH)
        if ts_attn:
            for proj in ("k_proj", "v_proj", "q_proj", "out_proj"):
                _add_linear(state, f"{block}.ts_attn.{proj}", CLIP_WIDTH, CLIP_WIDTH)
        _add_norm(state, f"{block}.ln_1", CLIP_WIDTH)
        _add_linear(state, f"{block}.mlp.c_fc", 4 * CLIP_WIDTH, CLIP_WIDTH)
        _add_linear(state, f"{block}.mlp.c_proj", CLIP_WIDTH, 4 * CLIP_WIDTH)
        _add_norm(state, f"{block}.ln_2", CLIP_WIDTH)
    _add_norm(state, f"{prefix}ln_post", CLIP_WIDTH)
    return state


def official_state(vocab: int, stage2: bool = False, with_clip: bool = True) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    state: dict[str, torch.Tensor] = {}
    dec = "gpt_model.decoder"
    state[f"{dec}.embed_tokens.weight"] = torch.randn(vocab, DIM) * DIM**-0.5
    state[f"{dec}.output_projection.weight"] = state[f"{dec}.embed_tokens.weight"]  # shared
    state[f"{dec}.embed_positions._float_tensor"] = torch.zeros(1)
    state[f"{dec}.self_attn_sope.scale"] = torch.rand(DIM // HEADS // 2)
    for i in range(LAYERS):
        _torchscale_layer(state, f"{dec}.layers.{i}", DIM, FFN)
    _add_norm(state, f"{dec}.layer_norm", DIM)
    if with_clip:
        state.update(open_clip_visual("img_model.visual.", ts_attn=True))
    _add_linear(state, "img_connector.dense", DIM, CLIP_WIDTH)
    state["img_connector.latent_query"] = torch.randn(LATENTS, DIM)
    for proj in ("k_proj", "v_proj", "q_proj", "out_proj"):
        _add_linear(state, f"img_connector.x_attn.{proj}", DIM, DIM)
    _add_linear(state, "aligner.encoder_proj.embed_tokens", ALIGN_DIM, DIM)
    state["aligner.encoder_proj.embed_positions.weight"] = torch.randn(ALIGN_ROWS, ALIGN_DIM) * 0.1
    for i in range(ALIGN_LAYERS):
        _torchscale_layer(state, f"aligner.encoder_proj.layers.{i}", ALIGN_DIM, ALIGN_FFN)
        _torchscale_layer(state, f"aligner.encoder.layers.{i}", ALIGN_DIM, ALIGN_FFN, cross=True)
    _add_norm(state, "aligner.encoder_proj.layer_norm", ALIGN_DIM)
    _add_norm(state, "aligner.encoder.layer_norm", ALIGN_DIM)
    state["aligner.encoder_query"] = torch.randn(77, ALIGN_DIM)
    if stage2:
        state["aligner.decoder_query"] = torch.randn(ALIGN_ROWS, ALIGN_DIM)
        state["aligner.decoder_proj.embed_positions.weight"] = torch.randn(ALIGN_ROWS, ALIGN_DIM) * 0.1
        for i in range(ALIGN_LAYERS):
            _torchscale_layer(state, f"aligner.decoder.layers.{i}", ALIGN_DIM, ALIGN_FFN, cross=True)
            _torchscale_layer(state, f"aligner.decoder_proj.layers.{i}", ALIGN_DIM, ALIGN_FFN)
        _add_norm(state, "aligner.decoder.layer_norm", ALIGN_DIM)
        _add_norm(state, "aligner.decoder_proj.layer_norm", ALIGN_DIM)
        _add_linear(state, "aligner.decoder_proj.output_projection", DIM, ALIGN_DIM)
        state["aligner.clip_encoder.text_model.embeddings.token_embedding.weight"] = torch.zeros(8, ALIGN_DIM)
    state["diffusion_unet.unet.conv_in.weight"] = torch.zeros(4, 4, 3, 3)  # frozen SD parts
    state["vae.vae.decoder.conv_out.weight"] = torch.zeros(3, 4, 3, 3)
    return state


@pytest.fixture(scope="module")
def vocab() -> int:
    from kosmos_g.models.prompt import InterleavedTokenizer

    return InterleavedTokenizer.from_model_config(model_preset("tiny")).vocab_size


def _base(tiny_sd_dir):
    base = model_preset("tiny")
    base.image_decoder.pretrained_path = tiny_sd_dir
    return base


def _open_clip_reference(state, prefix, pixels):
    """open_clip's VisualTransformer forward (QuickGELU, fused attention) + ClipVisualOnly's normalize."""
    x = F.conv2d(pixels, state[f"{prefix}conv1.weight"], stride=CLIP_PATCH).flatten(2).transpose(1, 2)
    cls = state[f"{prefix}class_embedding"].expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1) + state[f"{prefix}positional_embedding"]

    def norm(t, name):
        return F.layer_norm(t, (CLIP_WIDTH,), state[f"{name}.weight"], state[f"{name}.bias"])

    x = norm(x, f"{prefix}ln_pre")
    for i in range(CLIP_LAYERS):
        block = f"{prefix}transformer.resblocks.{i}"
        attn = torch.nn.MultiheadAttention(CLIP_WIDTH, CLIP_WIDTH // 64, batch_first=True)
        attn.load_state_dict({k[len(f"{block}.attn."):]: v for k, v in state.items() if k.startswith(f"{block}.attn.")})
        h = norm(x, f"{block}.ln_1")
        x = x + attn(h, h, h, need_weights=False)[0]
        h = F.linear(norm(x, f"{block}.ln_2"), state[f"{block}.mlp.c_fc.weight"], state[f"{block}.mlp.c_fc.bias"])
        x = x + F.linear(h * torch.sigmoid(1.702 * h), state[f"{block}.mlp.c_proj.weight"],
                         state[f"{block}.mlp.c_proj.bias"])
    return F.normalize(norm(x, f"{prefix}ln_post"), dim=-1)


def test_stage3_checkpoint_converts_loads_strictly_and_runs(vocab, tiny_sd_dir):
    state = official_state(vocab)
    converted = convert(state, None, _base(tiny_sd_dir), argparse.Namespace(decoder_attention_heads=HEADS))
    cfg = converted.config
    assert (cfg.mllm.dim, cfg.mllm.num_layers, cfg.mllm.num_heads, cfg.mllm.ffn_dim) == (DIM, LAYERS, HEADS, FFN)
    assert cfg.mllm.tie_word_embeddings and cfg.mllm.image_tokens == LATENTS
    assert (cfg.mllm.vision.hidden_size, cfg.mllm.vision.num_heads, cfg.mllm.vision.image_size) == (128, 2, 32)
    assert (cfg.aligner.encoder_layers, cfg.aligner.num_layers, cfg.aligner.max_source_length) == (2, 2, 256)
    model = load_converted(converted).eval()
    assert converted.initialised and all(k.startswith("aligner.decoder.") for k in converted.initialised)
    assert converted.ignored  # the frozen SD tensors and recomputed buffers, each counted

    # Fairseq's position offset: our row 0 is the release's row 2.
    source = model.aligner.encoder.source
    assert torch.equal(source.positions, state["aligner.encoder_proj.embed_positions.weight"][2:])
    # The release runs CLIP attention through ts_attn; its tensors are the ones imported.
    ours = model.mllm.vision.model.encoder.layers[0].self_attn
    assert torch.equal(ours.k_proj.weight, state["img_model.visual.transformer.resblocks.0.ts_attn.k_proj.weight"])
    with torch.no_grad():
        condition = model.encode_prompts(["a red circle on a blue background"])
    assert condition.shape == (1, 77, ALIGN_DIM) and torch.isfinite(condition).all()


def test_clip_file_fused_attention_matches_open_clip(vocab, tiny_sd_dir):
    """From `ViT-L-14-sd.pt` (fused in_proj, text tower beside): our tower == open_clip's forward."""
    clip = open_clip_visual("visual.")
    clip["token_embedding.weight"] = torch.zeros(10, 8)  # text tower: not used by the release
    clip["visual.proj"] = torch.zeros(CLIP_WIDTH, 16)
    converted = convert(official_state(vocab, with_clip=False), clip, _base(tiny_sd_dir), {"decoder_attention_heads": 4})
    model = load_converted(converted).eval()
    pixels = torch.randn(2, 3, CLIP_IMAGE, CLIP_IMAGE)
    with torch.no_grad():
        ours = model.mllm.vision(pixels)
        reference = _open_clip_reference(clip, "visual.", pixels)
    assert torch.allclose(ours, reference, atol=1e-5)


def test_stage2_checkpoint_imports_n_too(vocab, tiny_sd_dir):
    state = official_state(vocab, stage2=True)
    converted = convert(state, None, _base(tiny_sd_dir), {"decoder_attention_heads": HEADS})
    model = load_converted(converted)
    assert converted.initialised == []
    assert torch.equal(model.aligner.decoder.query.queries, state["aligner.decoder_query"][:256])
    assert torch.equal(model.aligner.decoder.target.positions, state["aligner.decoder_proj.embed_positions.weight"][2:])


def test_unknown_and_missing_tensors_are_errors_that_name_them(vocab, tiny_sd_dir):
    state = official_state(vocab)
    state["gpt_model.decoder.segment_emb.weight"] = torch.zeros(2, DIM)
    with pytest.raises(OfficialCheckpointError, match="segment_emb"):
        convert(state, None, _base(tiny_sd_dir), {"decoder_attention_heads": HEADS})
    state = official_state(vocab)
    del state["gpt_model.decoder.layers.1.ffn.fc2.weight"]
    with pytest.raises(OfficialCheckpointError, match=r"missing mllm\.decoder\.layers\.1\.ffn\.fc2\.weight"):
        load_converted(convert(state, None, _base(tiny_sd_dir), {"decoder_attention_heads": HEADS}))
    state = official_state(vocab, with_clip=False)
    with pytest.raises(OfficialCheckpointError, match="--clip"):
        convert(state, None, _base(tiny_sd_dir), {})


def test_reads_a_fairseq_checkpoint_whose_arguments_need_missing_packages(tmp_path, vocab):
    """fairseq pickles its config objects; a class of a package that is not installed is read
    as a placeholder, and argparse Namespaces (available) give the head count."""
    module = types.ModuleType("fairseq_like_package")

    class Config:  # stands for a fairseq/omegaconf class
        pass

    Config.__module__, Config.__qualname__ = module.__name__, "Config"
    module.Config = Config
    sys.modules[module.__name__] = module
    try:
        path = tmp_path / "checkpoint_final.pt"
        torch.save({"model": {"x": torch.ones(2)}, "args": argparse.Namespace(decoder_attention_heads=HEADS),
                    "extra_state": Config()}, path)
    finally:
        del sys.modules[module.__name__]
    state, args = read_checkpoint(path)
    assert torch.equal(state["x"], torch.ones(2)) and args.decoder_attention_heads == HEADS
    clip_path = tmp_path / "ViT-L-14-sd.pt"
    torch.save({"state_dict": {"module.visual.conv1.weight": torch.zeros(1)}}, clip_path)
    assert list(read_clip(clip_path)) == ["visual.conv1.weight"]


def test_import_command_writes_a_bundle_and_registers_it(tmp_path, vocab, tiny_sd_dir, s3_prefix, stack_env):
    from kosmos_g.cli.main import main
    from kosmos_g.platform import storage, tracking
    from kosmos_g.platform.weights import load_bundle

    checkpoint = tmp_path / "checkpoint_final.pt"
    torch.save({"model": official_state(vocab, with_clip=False),
                "args": argparse.Namespace(decoder_attention_heads=HEADS)}, checkpoint)
    clip = tmp_path / "ViT-L-14-sd.pt"
    torch.save(open_clip_visual("visual."), clip)
    storage.write_bytes(f"{s3_prefix}/official/checkpoint_final.pt", checkpoint.read_bytes())
    storage.upload_dir(tiny_sd_dir, f"{s3_prefix}/sd15")
    name = f"kosmos-g-import-{s3_prefix.rsplit('/', 1)[-1]}"
    code = main(["import", "official", "--checkpoint", f"{s3_prefix}/official/checkpoint_final.pt",
                 "--clip", str(clip), "--sd", f"{s3_prefix}/sd15", "--preset", "tiny",
                 "--output", str(tmp_path / "bundle"), "--register", "--name", name])
    assert code == 0
    config = json.loads((tmp_path / "bundle" / "config.json").read_text())
    assert config["image_decoder"]["pretrained_path"] == f"{s3_prefix}/sd15"  # the URI as given, not a cache path
    model = load_bundle(tmp_path / "bundle")  # as serving loads it: the SD folder fetched from S3
    with torch.no_grad():
        assert model.encode_prompts(["a dog"]).shape == (1, 77, ALIGN_DIM)
    version = tracking.client().get_model_version_by_alias(name, tracking.DEFAULT_ALIAS)
    assert version.tags["source"] == "official"
    assert math.isfinite(float(version.version))
