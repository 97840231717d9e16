"""Model configuration: plain dataclasses with two presets, `tiny` and `paper`.

Fields are restricted to int/float/str/bool/`str | None`/tuple-of-int and nested
dataclasses so that generic tools (JSON round trip, `--set section.key=value`
overrides in `platform/`) can walk them without knowing the model.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any

# Length and width of Stable Diffusion v1.5's text condition (CLIP ViT-L/14 text tower).
SD_CONDITION_LENGTH = 77
SD_CONDITION_DIM = 768


@dataclass
class VisionConfig:
    """CLIP ViT image encoder (transformers `CLIPVisionModel`)."""

    # Local directory of a CLIPVisionModel or full CLIPModel checkpoint; None = random init.
    # When set, the architecture fields below are replaced by the checkpoint's own.
    pretrained_path: str | None = None
    image_size: int = 224
    patch_size: int = 14
    hidden_size: int = 1024
    num_layers: int = 24
    num_heads: int = 16
    intermediate_size: int = 4096
    hidden_act: str = "quick_gelu"
    # The paper freezes CLIP except its last layer (plus the final layer norm).
    trainable_layers: int = 1


@dataclass
class MLLMConfig:
    """Kosmos-1 style multimodal causal LM: vision encoder, resampler, Magneto decoder."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    dim: int = 2048
    num_layers: int = 24
    num_heads: int = 32
    ffn_dim: int = 8192
    # 0 = exactly the tokenizer's size (SentencePiece pieces + <image>, </image>, <pad>).
    vocab_size: int = 0
    tie_word_embeddings: bool = True
    # Scale input embeddings by sqrt(dim), as the released decoder does.
    scale_embedding: bool = True
    # As released (fairseq LM decoder): fairseq sinusoidal absolute positions (counted from 2,
    # pads at 1) are added to the scaled input embeddings, beside xPos inside attention.
    absolute_positions: bool = True
    # The released resampler (XConnector) attends with fairseq's plain multi-head attention:
    # no Sub-LN inner norm. True adds one (this project's earlier layout).
    resampler_sub_ln: bool = False
    image_tokens: int = 64  # resampler latent queries = embeddings per image
    resampler_heads: int = 32
    dropout: float = 0.1
    activation: str = "gelu"
    xpos_scale_base: int = 512
    gradient_checkpointing: bool = False


@dataclass
class AlignerConfig:
    """AlignerNet: encoder M (source -> condition) and decoder N (condition -> source)."""

    dim: int = SD_CONDITION_DIM  # must equal image_decoder.condition_dim
    num_layers: int = 12  # query-decoder layers, each of M and N
    # Non-causal encoder layers over the source (M) / before the output projection (N);
    # 0 = the decoder-only ablation of the paper's Table 2.
    encoder_layers: int = 12
    num_heads: int = 12
    ffn_dim: int = 3072
    # N's learned queries and the source positions of M and N are sized for this many tokens
    # (the release allots 32,768).
    max_source_length: int = 32768
    dropout: float = 0.0


@dataclass
class ImageDecoderConfig:
    """Frozen Stable Diffusion v1.5 style image decoder and its CLIP text teacher."""

    # Local directory in diffusers layout (unet/, vae/, scheduler/, text_encoder/[, tokenizer/]).
    # When set, weights and architecture come from it and the shape fields are ignored.
    pretrained_path: str | None = None
    image_size: int = 512  # VAE input side (centre crop)
    condition_length: int = SD_CONDITION_LENGTH
    condition_dim: int = SD_CONDITION_DIM  # U-Net cross_attention_dim = CLIP text width
    latent_channels: int = 4
    unet_block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    unet_layers_per_block: int = 2
    unet_attention_head_dim: int = 8
    unet_norm_num_groups: int = 32
    vae_block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    vae_layers_per_block: int = 2
    vae_norm_num_groups: int = 32
    vae_scaling_factor: float = 0.18215
    text_num_layers: int = 12
    text_num_heads: int = 12
    text_intermediate_size: int = 3072
    # CLIP BPE merges file (bpe_simple_vocab_16e6.txt.gz); None = the one in open-clip-torch.
    clip_bpe_path: str | None = None
    num_train_timesteps: int = 1000
    beta_schedule: str = "scaled_linear"
    beta_start: float = 0.00085
    beta_end: float = 0.012
    prediction_type: str = "epsilon"
    # dtype the frozen U-Net/VAE/text encoder are held in ("float32", "float16", "bfloat16").
    frozen_dtype: str = "float32"


@dataclass
class TokenizerConfig:
    # kind "sentencepiece": a SentencePiece `.model`; None = mistral-common's shipped
    # tokenizer.model.v1 (32,000 pieces) with <image>, </image>, <pad> appended.
    sentencepiece_path: str | None = None
    max_length: int = 2048
    # kind "official": the released vocabulary (sentencepiece.bpe.model + fairseq dict.txt,
    # 64,007 ids) from `vocab_dir` (local, or s3:// resolved by the platform before building).
    kind: str = "sentencepiece"
    vocab_dir: str | None = None


@dataclass
class ModelConfig:
    mllm: MLLMConfig = field(default_factory=MLLMConfig)
    aligner: AlignerConfig = field(default_factory=AlignerConfig)
    image_decoder: ImageDecoderConfig = field(default_factory=ImageDecoderConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    name: str = "custom"

    def validate(self) -> None:
        """Raise ValueError for combinations the model cannot be built from."""
        problems = []
        if self.aligner.dim != self.image_decoder.condition_dim:
            problems.append(
                f"aligner.dim ({self.aligner.dim}) must equal image_decoder.condition_dim "
                f"({self.image_decoder.condition_dim}): M's output is the U-Net condition"
            )
        if self.tokenizer.max_length > self.aligner.max_source_length:
            problems.append(
                f"tokenizer.max_length ({self.tokenizer.max_length}) exceeds "
                f"aligner.max_source_length ({self.aligner.max_source_length})"
            )
        if self.mllm.image_tokens + 3 > self.tokenizer.max_length:
            problems.append("tokenizer.max_length cannot hold even one image")
        for name, width, heads in (
            ("mllm", self.mllm.dim, self.mllm.num_heads),
            ("mllm resampler", self.mllm.dim, self.mllm.resampler_heads),
            ("aligner", self.aligner.dim, self.aligner.num_heads),
        ):
            if width % heads or (width // heads) % 2:
                problems.append(f"{name}: width {width} must split into {heads} heads of even size")
        if problems:
            raise ValueError("invalid ModelConfig: " + "; ".join(problems))


# Size of the released dictionary: 4 fairseq specials + 63,997 dict.txt pieces + 6 task symbols.
OFFICIAL_VOCAB_SIZE = 64_007


def _paper() -> ModelConfig:
    # The released vocabulary; its folder is the user's to give (tokenizer.vocab_dir). The
    # embedding size is fixed here so the preset can be counted without the files.
    return ModelConfig(
        name="paper",
        mllm=MLLMConfig(vocab_size=OFFICIAL_VOCAB_SIZE),
        tokenizer=TokenizerConfig(kind="official"),
    )


def _tiny() -> ModelConfig:
    cond_dim = 32
    return ModelConfig(
        name="tiny",
        mllm=MLLMConfig(
            vision=VisionConfig(
                image_size=32, patch_size=8, hidden_size=64, num_layers=2, num_heads=4,
                intermediate_size=128,
            ),
            dim=64, num_layers=2, num_heads=4, ffn_dim=128, image_tokens=4, resampler_heads=4,
            dropout=0.0,
        ),
        aligner=AlignerConfig(
            dim=cond_dim, num_layers=2, encoder_layers=2, num_heads=4, ffn_dim=64, max_source_length=256,
            dropout=0.0,
        ),
        image_decoder=ImageDecoderConfig(
            image_size=32, condition_dim=cond_dim,
            unet_block_out_channels=(32, 64), unet_layers_per_block=1, unet_attention_head_dim=8,
            unet_norm_num_groups=32,
            vae_block_out_channels=(32, 64), vae_layers_per_block=1, vae_norm_num_groups=32,
            text_num_layers=2, text_num_heads=4, text_intermediate_size=64,
        ),
        tokenizer=TokenizerConfig(max_length=256),
    )


def _mini() -> ModelConfig:
    """Kosmos-G for the miniature world (models/mini.py backbones): the fields describe the mini
    CLIP and mini decoder's shapes; training sets `pretrained_path`s to the registered ones."""
    width = 128  # the mini CLIP's text width = the U-Net condition width
    return ModelConfig(
        name="mini",
        mllm=MLLMConfig(
            vision=VisionConfig(image_size=32, patch_size=4, hidden_size=width, num_layers=4, num_heads=4,
                                intermediate_size=4 * width),
            dim=256, num_layers=4, num_heads=4, ffn_dim=1024, image_tokens=8, resampler_heads=4, dropout=0.0,
        ),
        aligner=AlignerConfig(dim=width, num_layers=2, encoder_layers=2, num_heads=4, ffn_dim=4 * width,
                              max_source_length=256),
        image_decoder=ImageDecoderConfig(
            image_size=32, condition_dim=width, unet_block_out_channels=(64, 128), unet_layers_per_block=1,
            unet_attention_head_dim=32, vae_block_out_channels=(32, 64), vae_layers_per_block=1,
            vae_norm_num_groups=8, text_num_layers=4, text_num_heads=4, text_intermediate_size=4 * width,
            prediction_type="v_prediction",
        ),
        tokenizer=TokenizerConfig(max_length=256),
    )


PRESETS = {"tiny": _tiny, "mini": _mini, "paper": _paper}


def model_preset(name: str) -> ModelConfig:
    """A fresh ModelConfig for a named preset ("tiny" or "paper")."""
    try:
        return PRESETS[name]()
    except KeyError:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}") from None


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """JSON-ready dict (tuples become lists)."""
    return dataclasses.asdict(cfg)


def _convert(value: Any, hint: Any, where: str) -> Any:
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a mapping, got {value!r}")
        return _from_dict(hint, value, where)
    origin = typing.get_origin(hint)
    if origin is tuple:
        return tuple(int(v) for v in value)
    if hint is bool:
        if isinstance(value, str):
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(f"{where}: not a boolean: {value!r}")
            return value.lower() in ("true", "1", "yes")
        return bool(value)
    if hint in (int, float):
        return hint(value)
    optional = type(None) in typing.get_args(hint)
    if optional and (value is None or (isinstance(value, str) and value.lower() in ("none", "null", ""))):
        return None
    if value is None:
        raise ValueError(f"{where}: may not be None")
    return str(value)


def _from_dict(cls: type, data: dict[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ValueError(f"{where or cls.__name__}: unknown field(s) {sorted(unknown)}")
    kwargs = {k: _convert(v, hints[k], f"{where}.{k}".lstrip(".")) for k, v in data.items()}
    return cls(**kwargs)


def config_from_dict(data: dict[str, Any]) -> ModelConfig:
    """Inverse of `config_to_dict`; missing fields take their defaults, unknown ones fail."""
    return _from_dict(ModelConfig, data, "")


def apply_overrides(cfg: ModelConfig, overrides: dict[str, Any] | None) -> ModelConfig:
    """A copy of `cfg` with dotted-key overrides, e.g. {"image_decoder.pretrained_path": "/sd"}.

    String values are converted to the field's type, so command-line text can be passed as is.
    """
    data = config_to_dict(cfg)
    for key, value in (overrides or {}).items():
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                raise ValueError(f"override {key!r}: {part!r} is not a config section")
            node = node[part]
        if parts[-1] not in node or isinstance(node[parts[-1]], dict):
            raise ValueError(f"override {key!r}: no such field")
        node[parts[-1]] = value
    return config_from_dict(data)
