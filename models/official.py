"""Import the released Kosmos-G checkpoint (fairseq + torchscale + open_clip) into this model.

The release (xichenpan/Kosmos-G) saves a fairseq checkpoint whose `model` entry holds:

  gpt_model.decoder.*   torchscale `Decoder` (Sub-LN, xPos) + fairseq sinusoidal positions
  img_model.visual.*    open_clip ViT-L/14 (`VisualTransformer4Seq2Seq`); attention runs through
                        `ts_attn` (torchscale, separate q/k/v/out) next to open_clip's unused fused `attn`
  img_connector.*       `XConnector`: dense, latent_query, x_attn (fairseq attention)
  aligner.*             `Aligner_encoder` (M) after stage 3; stage 2's `Aligner` adds N and its teacher
  diffusion_unet.*, vae.*, aligner.clip_encoder.*   frozen Stable Diffusion parts

Every tensor is either mapped to one of ours (names below, derived from those module
definitions), deliberately left out (the `IGNORED` reasons: frozen SD parts come from a diffusers
folder, buffers that are recomputed), or an error that names it. Shapes decide the architecture;
head counts (not visible in shapes) come from the checkpoint's arguments when readable, else from
the `paper` preset. N is absent from a stage-3 checkpoint and stays at its initialisation.
"""

from __future__ import annotations

import copy
import math
import pickle
import re
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from .config import ModelConfig

# Official positions are torchscale `PositionalEmbedding`s read from row 2 (fairseq's offset).
POSITION_OFFSET = 2
# open_clip's attention width per head for ViT models (`head_width`): heads = width / 64.
OPEN_CLIP_HEAD_WIDTH = 64

IGNORED = {
    r"^(diffusion_unet|vae)\.": "frozen Stable Diffusion U-Net/VAE: read from the diffusers folder (--sd)",
    r"^aligner\.clip_encoder\.": "frozen CLIP text teacher: read from the diffusers folder's text_encoder",
    r"\.embed_positions\._float_tensor$": "fairseq sinusoid buffer: the positions are computed",
    r"_sope\.scale$": "xPos scale buffer: computed",
    r"(^|\.)version$": "fairseq bookkeeping",
}

# Sub-LN layer parts: torchscale names -> ours (models/layers.SubLNBlock).
_LAYER_PARTS = (
    ("self_attn.q_proj", "self_attn.q_proj"), ("self_attn.k_proj", "self_attn.k_proj"),
    ("self_attn.v_proj", "self_attn.v_proj"), ("self_attn.out_proj", "self_attn.out_proj"),
    ("self_attn.inner_attn_ln", "self_attn.inner_norm"), ("self_attn_layer_norm", "self_norm"),
    ("encoder_attn.q_proj", "cross_attn.q_proj"), ("encoder_attn.k_proj", "cross_attn.k_proj"),
    ("encoder_attn.v_proj", "cross_attn.v_proj"), ("encoder_attn.out_proj", "cross_attn.out_proj"),
    ("encoder_attn_layer_norm", "cross_norm"),
    ("ffn.fc1", "ffn.fc1"), ("ffn.fc2", "ffn.fc2"), ("ffn.ffn_layernorm", "ffn.inner_norm"),
    ("final_layer_norm", "ffn_norm"),
)
_CLIP_BLOCK_PARTS = (("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"), ("mlp.c_fc", "mlp.fc1"),
                     ("mlp.c_proj", "mlp.fc2"))
_ATTENTION = ("q_proj", "k_proj", "v_proj", "out_proj")


class OfficialCheckpointError(ValueError):
    """The checkpoint does not fit the released layout; the message lists the tensors."""


@dataclass
class Converted:
    config: ModelConfig
    state: dict[str, torch.Tensor]  # `mllm.*` / `aligner.*` in this model's names
    ignored: dict[str, int] = field(default_factory=dict)  # reason -> tensors left out on purpose
    initialised: list[str] = field(default_factory=list)  # our tensors the checkpoint lacks (N)


class _Tensors:
    """The official tensors, each consumed at most once; what is left over is reported."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]):
        self.tensors = dict(tensors)
        self.used: set[str] = set()

    def has(self, key: str) -> bool:
        return key in self.tensors

    def take(self, key: str) -> torch.Tensor:
        if key not in self.tensors:
            raise OfficialCheckpointError(f"official checkpoint lacks {key}")
        self.used.add(key)
        return self.tensors[key]

    def count(self, pattern: str) -> int:
        """Number of layers: distinct integers captured by `pattern` (one group)."""
        found = {int(m.group(1)) for key in self.tensors if (m := re.match(pattern, key))}
        return max(found) + 1 if found else 0

    def unused(self) -> list[str]:
        return sorted(set(self.tensors) - self.used)


def _linear(src: _Tensors, official: str, ours: str, out: dict, optional: bool = False) -> None:
    for kind in ("weight", "bias"):
        key = f"{official}.{kind}"
        if optional and not src.has(key):
            continue
        out[f"{ours}.{kind}"] = src.take(key)


def _sub_ln_layer(src: _Tensors, official: str, ours: str, out: dict) -> None:
    for theirs, mine in _LAYER_PARTS:
        _linear(src, f"{official}.{theirs}", f"{ours}.{mine}", out, optional=True)


def _decoder(src: _Tensors, out: dict) -> tuple[int, int, int]:
    prefix = "gpt_model.decoder"
    layers = src.count(rf"^{prefix}\.layers\.(\d+)\.")
    out["mllm.decoder.embed_tokens.weight"] = embed = src.take(f"{prefix}.embed_tokens.weight")
    for i in range(layers):
        _sub_ln_layer(src, f"{prefix}.layers.{i}", f"mllm.decoder.layers.{i}", out)
    _linear(src, f"{prefix}.layer_norm", "mllm.decoder.final_norm", out)
    head_key = f"{prefix}.output_projection.weight"
    if src.has(head_key) and not torch.equal(src.tensors[head_key], embed):
        out["mllm.decoder.lm_head.weight"] = src.take(head_key)
    elif src.has(head_key):
        src.take(head_key)  # shared with embed_tokens (--share-decoder-input-output-embed)
    return layers, embed.shape[0], embed.shape[1]


def _resampler(src: _Tensors, out: dict) -> int:
    _linear(src, "img_connector.dense", "mllm.resampler.proj", out)
    out["mllm.resampler.latents"] = latents = src.take("img_connector.latent_query")
    for name in _ATTENTION:
        _linear(src, f"img_connector.x_attn.{name}", f"mllm.resampler.attn.{name}", out)
    return latents.shape[0]


def _clip_attention(src: _Tensors, official: str, ours: str, out: dict) -> None:
    """torchscale `ts_attn` (what the release runs) when present, else open_clip's fused
    `attn.in_proj` split in q, k, v order (what `ViT-L-14-sd.pt` holds)."""
    if src.has(f"{official}.ts_attn.q_proj.weight"):
        for name in _ATTENTION:
            _linear(src, f"{official}.ts_attn.{name}", f"{ours}.self_attn.{name}", out)
        for kind in ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias"):
            if src.has(f"{official}.attn.{kind}"):
                src.take(f"{official}.attn.{kind}")  # built but bypassed in the release's forward
        return
    weight, bias = src.take(f"{official}.attn.in_proj_weight"), src.take(f"{official}.attn.in_proj_bias")
    for name, w, b in zip(("q_proj", "k_proj", "v_proj"), weight.chunk(3), bias.chunk(3)):
        out[f"{ours}.self_attn.{name}.weight"], out[f"{ours}.self_attn.{name}.bias"] = w, b
    _linear(src, f"{official}.attn.out_proj", f"{ours}.self_attn.out_proj", out)


def _vision(src: _Tensors, prefix: str, out: dict) -> dict[str, Any]:
    ours = "mllm.vision.model"  # transformers CLIPVisionModel (5.x: no vision_model level)
    patch = src.take(f"{prefix}.conv1.weight")
    positions = src.take(f"{prefix}.positional_embedding")
    out[f"{ours}.embeddings.patch_embedding.weight"] = patch
    out[f"{ours}.embeddings.class_embedding"] = src.take(f"{prefix}.class_embedding")
    out[f"{ours}.embeddings.position_embedding.weight"] = positions
    _linear(src, f"{prefix}.ln_pre", f"{ours}.pre_layrnorm", out)
    _linear(src, f"{prefix}.ln_post", f"{ours}.post_layernorm", out)
    layers = src.count(rf"^{re.escape(prefix)}\.transformer\.resblocks\.(\d+)\.")
    for i in range(layers):
        block, mine = f"{prefix}.transformer.resblocks.{i}", f"{ours}.encoder.layers.{i}"
        _clip_attention(src, block, mine, out)
        for theirs, name in _CLIP_BLOCK_PARTS:
            _linear(src, f"{block}.{theirs}", f"{mine}.{name}", out)
    width, patch_size = patch.shape[0], patch.shape[-1]
    grid = math.isqrt(positions.shape[0] - 1)
    return dict(hidden_size=width, patch_size=patch_size, image_size=grid * patch_size, num_layers=layers,
                num_heads=width // OPEN_CLIP_HEAD_WIDTH, hidden_act="quick_gelu",
                intermediate_size=out[f"{ours}.encoder.layers.0.mlp.fc1.weight"].shape[0] if layers else 0)


def _aligner_stack(src: _Tensors, official: str, ours: str, out: dict) -> int:
    layers = src.count(rf"^{re.escape(official)}\.layers\.(\d+)\.")
    for i in range(layers):
        _sub_ln_layer(src, f"{official}.layers.{i}", f"{ours}.layers.{i}", out)
    return layers


def _positions(src: _Tensors, key: str, length: int) -> torch.Tensor:
    return src.take(key)[POSITION_OFFSET:POSITION_OFFSET + length]


def _aligner(src: _Tensors, out: dict) -> dict[str, int]:
    """M (`encoder_proj` -> `encoder`) and, in a stage-2 checkpoint, N (`decoder` -> `decoder_proj`)."""
    rows = src.tensors["aligner.encoder_proj.embed_positions.weight"].shape[0]
    length = rows - POSITION_OFFSET  # the last position the release can index
    _linear(src, "aligner.encoder_proj.embed_tokens", "aligner.encoder.source.in_proj", out)
    out["aligner.encoder.source.positions"] = _positions(src, "aligner.encoder_proj.embed_positions.weight", length)
    encoder_layers = _aligner_stack(src, "aligner.encoder_proj", "aligner.encoder.source", out)
    _linear(src, "aligner.encoder_proj.layer_norm", "aligner.encoder.source.final_norm", out, optional=True)
    out["aligner.encoder.query.queries"] = queries = src.take("aligner.encoder_query")
    decoder_layers = _aligner_stack(src, "aligner.encoder", "aligner.encoder.query", out)
    _linear(src, "aligner.encoder.layer_norm", "aligner.encoder.query.final_norm", out)
    if src.has("aligner.decoder_query"):
        out["aligner.decoder.query.queries"] = src.take("aligner.decoder_query")[:length]
        _aligner_stack(src, "aligner.decoder", "aligner.decoder.query", out)
        _linear(src, "aligner.decoder.layer_norm", "aligner.decoder.query.final_norm", out)
        out["aligner.decoder.target.positions"] = _positions(src, "aligner.decoder_proj.embed_positions.weight",
                                                             length)
        _aligner_stack(src, "aligner.decoder_proj", "aligner.decoder.target", out)
        _linear(src, "aligner.decoder_proj.layer_norm", "aligner.decoder.target.final_norm", out, optional=True)
        _linear(src, "aligner.decoder_proj.output_projection", "aligner.decoder.target.out_proj", out)
    ffn = out["aligner.encoder.query.layers.0.ffn.fc1.weight"].shape[0] if decoder_layers else 0
    return dict(dim=queries.shape[1], num_layers=decoder_layers, encoder_layers=encoder_layers,
                ffn_dim=ffn, max_source_length=length)


def _argument(args: Any, name: str) -> Any:
    """A training argument from a fairseq Namespace/dict (None when unreadable)."""
    if args is None:
        return None
    if isinstance(args, Mapping):
        return args.get(name)
    return getattr(args, name, None)


def convert(model_state: Mapping[str, torch.Tensor], clip_state: Mapping[str, torch.Tensor] | None,
            base: ModelConfig, args: Any = None) -> Converted:
    """Map the release's tensors onto `base` (usually the `paper` preset), whose architecture
    fields are replaced by what the shapes say. Raises OfficialCheckpointError listing unmapped tensors."""
    tensors = dict(model_state)
    if clip_state is not None:
        # The CLIP file fills what the checkpoint lacks; the checkpoint's trained blocks win.
        for key, value in clip_state.items():
            tensors.setdefault(f"img_model.{key}" if key.startswith("visual.") else f"clip_file.{key}", value)
    src = _Tensors(tensors)
    out: dict[str, torch.Tensor] = {}
    if not any(k.startswith("img_model.visual.") for k in tensors):
        raise OfficialCheckpointError("no CLIP image encoder: the checkpoint has no img_model.visual.* tensors; "
                           "pass the open_clip ViT-L-14 file (--clip ViT-L-14-sd.pt)")
    cfg = copy.deepcopy(base)
    layers, vocab, dim = _decoder(src, out)
    heads = _argument(args, "decoder_attention_heads") or cfg.mllm.num_heads
    cfg.mllm.dim, cfg.mllm.num_layers, cfg.mllm.vocab_size = dim, layers, vocab
    cfg.mllm.num_heads = cfg.mllm.resampler_heads = int(heads)
    cfg.mllm.ffn_dim = out["mllm.decoder.layers.0.ffn.fc1.weight"].shape[0]
    cfg.mllm.tie_word_embeddings = "mllm.decoder.lm_head.weight" not in out
    cfg.mllm.image_tokens = _resampler(src, out)
    for key, value in _vision(src, "img_model.visual", out).items():
        setattr(cfg.mllm.vision, key, value)
    cfg.mllm.vision.pretrained_path = None
    for key, value in _aligner(src, out).items():
        setattr(cfg.aligner, key, value)
    cfg.tokenizer.max_length = min(cfg.tokenizer.max_length, cfg.aligner.max_source_length)

    ignored: dict[str, int] = {}
    unknown = []
    for key in src.unused():
        reason = next((why for pattern, why in IGNORED.items() if re.search(pattern, key)), None)
        if key.startswith("clip_file."):
            reason = "CLIP file parts the release does not use (text tower, visual.proj, logit_scale)"
        elif key == "img_model.visual.proj":
            reason = reason or "CLIP joint-space projection: the release keeps every token unprojected"
        if reason is None:
            unknown.append(key)
        else:
            ignored[reason] = ignored.get(reason, 0) + 1
    if unknown:
        raise OfficialCheckpointError(f"{len(unknown)} official tensors have no place in this model: "
                           + ", ".join(unknown[:20]) + (" …" if len(unknown) > 20 else ""))
    return Converted(cfg, out, ignored)


def load_converted(converted: Converted, device: str | torch.device | None = None):
    """Build the model for `converted.config` and load its tensors strictly; only N (absent
    after stage 3) may stay at its initialisation. Raises OfficialCheckpointError listing any gap."""
    from .kosmos_g import KosmosG

    model = KosmosG.from_config(converted.config, device=device)
    mllm = {k[5:]: v for k, v in converted.state.items() if k.startswith("mllm.")}
    aligner = {k[8:]: v for k, v in converted.state.items() if k.startswith("aligner.")}
    problems = []
    for name, module, state in (("mllm", model.mllm, mllm), ("aligner", model.aligner, aligner)):
        expected = {k: v.shape for k, v in module.state_dict().items()}
        missing = sorted(set(expected) - set(state))
        if name == "aligner":
            converted.initialised = [f"aligner.{k}" for k in missing if k.startswith("decoder.")]
            missing = [k for k in missing if not k.startswith("decoder.")]
        problems += [f"missing {name}.{k}" for k in missing]
        problems += [f"unexpected {name}.{k}" for k in sorted(set(state) - set(expected))]
        problems += [f"{name}.{k}: official {tuple(v.shape)} vs {tuple(expected[k])}"
                     for k, v in state.items() if k in expected and v.shape != expected[k]]
    if problems:
        raise OfficialCheckpointError(f"{len(problems)} mismatches with this model: " + "; ".join(problems[:20]))
    model.mllm.load_state_dict(mllm, strict=True)
    model.aligner.load_state_dict(aligner, strict=not converted.initialised)
    return model


class _Placeholder:
    """Stands in for classes of packages this environment lacks (fairseq, omegaconf) so the
    tensors of a fairseq checkpoint can be read; their objects keep their pickled state."""

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state):
        self.state = state


class _TolerantUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        try:
            return super().find_class(module, name)
        except (ImportError, AttributeError):
            return type(name, (_Placeholder,), {"__module__": module})


_tolerant_pickle = types.SimpleNamespace(Unpickler=_TolerantUnpickler, load=pickle.load, __name__="pickle")


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], Any]:
    """(`model` tensors, training arguments) of a fairseq checkpoint. A fairseq checkpoint
    pickles its arguments, so when a tensors-only read fails the file is unpickled with
    placeholders for unavailable classes: import only checkpoints you trust."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        data = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_tolerant_pickle)
    if not isinstance(data, Mapping) or "model" not in data:
        raise OfficialCheckpointError(f"{path}: not a fairseq checkpoint (no 'model' entry)")
    args = data.get("args")
    cfg = data.get("cfg")
    if args is None and cfg is not None:
        args = cfg.get("model") if isinstance(cfg, Mapping) else getattr(cfg, "model", None)
    return dict(data["model"]), args


def read_clip(path: str | Path) -> dict[str, torch.Tensor]:
    """open_clip state dict (`ViT-L-14-sd.pt`), plain or under `state_dict`."""
    data = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(data, Mapping) and "state_dict" in data:
        data = data["state_dict"]
    state = {k.removeprefix("module."): v for k, v in data.items()}
    if not any(k.startswith("visual.") for k in state):
        raise OfficialCheckpointError(f"{path}: no visual.* tensors; expected an open_clip CLIP state dict")
    return state


__all__ = ["Converted", "OfficialCheckpointError", "convert", "load_converted", "read_checkpoint", "read_clip"]
