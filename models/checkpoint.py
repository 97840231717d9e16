"""Checkpoints of what Kosmos-G trains: the MLLM (vision encoder, resampler, decoder) and
AlignerNet, as safetensors plus the ModelConfig as JSON. Loading never unpickles anything.

The whole MLLM is stored, including the frozen CLIP layers, so a checkpoint is rebuilt
without the original CLIP weights. The frozen image decoder is not stored by
`save_trainable`: `load_model` reads it from `image_decoder.pretrained_path`. A servable
bundle (`save_servable`) also carries the decoder in diffusers layout under
`image_decoder/` when the config it is saved with names no pretrained path for it (random tiny
decoders, or one carried by the checkpoint it started from); a relative
`pretrained_path` is resolved against the checkpoint directory. The text vocabulary (the
official sentencepiece.bpe.model + dict.txt, or a custom SentencePiece model) is copied into
`tokenizer/`, so a bundle's ids always decode with the vocabulary it was trained with.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .config import apply_overrides, config_from_dict, config_to_dict

WEIGHTS_NAME = "model.safetensors"
DECODER_DIR = "image_decoder"
TOKENIZER_DIR = "tokenizer"
OFFICIAL_VOCAB_FILES = ("sentencepiece.bpe.model", "dict.txt")
CONFIG_NAME = "config.json"
PARTS = ("mllm", "aligner")


def trainable_state_dict(model) -> dict[str, torch.Tensor]:
    """`mllm.*` and `aligner.*` tensors, contiguous on CPU."""
    state = {}
    for part in PARTS:
        for key, value in getattr(model, part).state_dict().items():
            state[f"{part}.{key}"] = value.detach().to("cpu").contiguous()
    return state


def checkpoint_config(model, config=None) -> dict[str, Any]:
    """The config a checkpoint of `model` is saved with: `config` (default: the model's own)."""
    cfg = copy.deepcopy(config if config is not None else model.config)
    # The vision weights travel inside the checkpoint; its architecture fields are filled in.
    cfg.mllm.vision.pretrained_path = None
    return config_to_dict(cfg)


def _copy_vocabulary(config: dict[str, Any], directory: Path) -> None:
    """Copy the text vocabulary a checkpoint's ids mean into `<directory>/tokenizer/` and point
    the config there (relative), so a bundle decodes the same ids wherever it is loaded.
    Vocabularies that are not local files (the shipped default, an unresolved URI) stay as named."""
    tokenizer = config["tokenizer"]
    target = directory / TOKENIZER_DIR
    if tokenizer.get("kind") == "official" and tokenizer.get("vocab_dir"):
        source = Path(tokenizer["vocab_dir"])
        if all((source / name).is_file() for name in OFFICIAL_VOCAB_FILES):
            target.mkdir(exist_ok=True)
            for name in OFFICIAL_VOCAB_FILES:
                shutil.copyfile(source / name, target / name)
            tokenizer["vocab_dir"] = TOKENIZER_DIR
    elif tokenizer.get("sentencepiece_path") and Path(tokenizer["sentencepiece_path"]).is_file():
        source = Path(tokenizer["sentencepiece_path"])
        target.mkdir(exist_ok=True)
        shutil.copyfile(source, target / source.name)
        tokenizer["sentencepiece_path"] = f"{TOKENIZER_DIR}/{source.name}"


def save_trainable(model, directory: str | Path, config=None) -> Path:
    """Write `model.safetensors` + `config.json` (+ the text vocabulary, `tokenizer/`) into
    `directory`; returns the directory. `config`: the ModelConfig to write instead of the
    model's own, e.g. one naming the decoder by where it was fetched from rather than the
    local copy the model was built from."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(trainable_state_dict(model), str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
    config = checkpoint_config(model, config)
    _copy_vocabulary(config, directory)
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    return directory


def save_servable(model, directory: str | Path, config=None) -> Path:
    """`save_trainable` plus what serving needs to reproduce the frozen image decoder:
    its diffusers layout when the config written (`config`, default the model's) names no
    pretrained path for it."""
    config = config if config is not None else model.config
    directory = save_trainable(model, directory, config)
    if config.image_decoder.pretrained_path is None:
        model.image_decoder.save_pretrained(directory / DECODER_DIR)
        data = json.loads((directory / CONFIG_NAME).read_text())
        data["image_decoder"]["pretrained_path"] = DECODER_DIR
        (directory / CONFIG_NAME).write_text(json.dumps(data, indent=2) + "\n")
    return directory


def load_trainable(model, path: str | Path, skip: tuple[str, ...] = ()) -> None:
    """Load `mllm.*`/`aligner.*` tensors into `model` (strict: every key must match), except the
    parts named in `skip`, which keep their fresh initialisation."""
    state = load_file(str(path), device=str(model.device))
    for part in PARTS:
        if part in skip:
            continue
        prefix = f"{part}."
        sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        getattr(model, part).load_state_dict(sub, strict=True)
    unknown = [k for k in state if not k.startswith(tuple(f"{p}." for p in PARTS))]
    if unknown:
        raise ValueError(f"{path}: unexpected tensors {unknown[:5]}")


def require_bundle(directory: str | Path) -> Path:
    """`directory` if it holds a Kosmos-G checkpoint; else a FileNotFoundError that says what it
    holds instead (a Stable Diffusion folder, as a registered mini decoder is, is the usual
    mistake: the decoder Kosmos-G trains through, not a Kosmos-G model)."""
    directory = Path(directory)
    if (directory / CONFIG_NAME).is_file():
        return directory
    if (directory / "model_index.json").is_file():
        raise FileNotFoundError(
            f"{directory} is a diffusers pipeline folder (model_index.json), not a Kosmos-G checkpoint "
            f"({CONFIG_NAME} + {WEIGHTS_NAME}); a decoder alone is not a model these jobs can prompt")
    raise FileNotFoundError(f"{directory} holds no Kosmos-G checkpoint: no {CONFIG_NAME}")


def load_config(directory: str | Path, overrides: dict[str, Any] | None = None):
    directory = require_bundle(directory)
    data = json.loads((directory / CONFIG_NAME).read_text())
    cfg = apply_overrides(config_from_dict(data), overrides)
    decoder_path = cfg.image_decoder.pretrained_path
    if decoder_path and not Path(decoder_path).is_absolute() and (directory / decoder_path).is_dir():
        cfg.image_decoder.pretrained_path = str(directory / decoder_path)
    # A vocabulary copied into the bundle (relative path) is read from the bundle.
    vocab_dir, spm_path = cfg.tokenizer.vocab_dir, cfg.tokenizer.sentencepiece_path
    if vocab_dir and not Path(vocab_dir).is_absolute() and (directory / vocab_dir).is_dir():
        cfg.tokenizer.vocab_dir = str(directory / vocab_dir)
    if spm_path and not Path(spm_path).is_absolute() and (directory / spm_path).is_file():
        cfg.tokenizer.sentencepiece_path = str(directory / spm_path)
    return cfg


def load_model(directory: str | Path, overrides: dict[str, Any] | None = None,
               device: str | torch.device | None = None):
    """Rebuild a KosmosG from `config.json` (+ dotted-key overrides) and load its weights."""
    from .kosmos_g import KosmosG

    directory = Path(directory)
    model = KosmosG.from_config(load_config(directory, overrides), device=device)
    load_trainable(model, directory / WEIGHTS_NAME)
    return model
