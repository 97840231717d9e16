"""Model inputs that live in object storage become local paths before a model is built.

`models/` only reads local files (it knows nothing of storage). Every place that builds a model
or its tokenizer from a ModelConfig (training workers, data preprocessing, serving, import)
first calls `localize(cfg)`: each `s3://` folder (CLIP weights in transformers layout, Stable
Diffusion in diffusers layout, the official vocabulary) or file (a SentencePiece model, CLIP's
BPE merges) is copied into the local cache (again only when what is stored there changes) and the
config points at the copy. A registered model (`models:/kosmos-g-mini-clip/3`, the miniature world's
backbones) is fetched from MLflow. The bundle a job saves names those inputs by their URIs again
(`portable`), so it loads on any machine that reaches the store.
"""

from __future__ import annotations

import copy
import hashlib
import os
from pathlib import Path

from kosmos_g.models.config import ModelConfig
from kosmos_g.platform import storage

# (section path, field, is a folder)
MODEL_PATHS = (
    (("mllm", "vision"), "pretrained_path", True),
    (("image_decoder",), "pretrained_path", True),
    (("image_decoder",), "clip_bpe_path", False),
    (("tokenizer",), "vocab_dir", True),
    (("tokenizer",), "sentencepiece_path", False),
)


def local_file(uri: str) -> Path:
    """A local path holding the object at `uri` (the path itself for local URIs)."""
    return storage.local_file(uri, storage.default_cache_root() / "files")


REGISTRY_SCHEMES = ("models:/", "runs:/")


def registry_dir(uri: str) -> Path:
    """A local copy of a registered model's files (`models:/name/<version|latest|@alias>`,
    `runs:/…`); a pinned version is cached (`storage.fill_once`: concurrent readers never see half
    a copy); anything that may move is fetched again.

    The cache key is the version's number *and* the run it was registered from: a fresh stack (or
    another tracking server) numbers its versions from 1 again, and a cache keyed by the number
    alone served the previous stack's `kosmos-g/1` to the next one's jobs."""
    import re

    from kosmos_g.platform import tracking

    pinned = re.fullmatch(r"models:/([\w.-]+)/(\d+)", uri)
    if not pinned:
        return tracking.resolve_artifacts(uri)
    name, number = pinned.groups()
    version = tracking.client().get_model_version(name, number)
    origin = version.run_id or hashlib.sha256(version.source.encode()).hexdigest()[:16]
    cache = storage.default_cache_root() / "registry" / name / f"{number}-{origin}"
    storage.fill_once(cache, lambda staging: tracking.resolve_artifacts(uri, staging), note=uri)
    return tracking.bundle_of(cache)


def local_dir(uri: str) -> Path:
    """A local folder for a registry URI (`registry_dir`), a storage URI or a path."""
    return registry_dir(uri) if uri.startswith(REGISTRY_SCHEMES) else storage.local_dir(uri)


def localize(cfg: ModelConfig, parts: tuple[str, ...] | None = None) -> ModelConfig:
    """A copy of `cfg` whose weight, vocabulary and merges paths are all local; with `parts`
    (e.g. `("tokenizer",)`), only those under the named top-level sections, so that what needs
    the vocabulary alone never fetches the decoder's weights."""
    cfg = copy.deepcopy(cfg)
    for sections, name, is_dir in MODEL_PATHS:
        if parts is not None and sections[0] not in parts:
            continue
        node = cfg
        for section in sections:
            node = getattr(node, section)
        value = getattr(node, name)
        if value and value.startswith(REGISTRY_SCHEMES):
            setattr(node, name, str(registry_dir(value)))
        elif value and storage.parse(value).scheme != "file":
            local = storage.local_dir(value) if is_dir else local_file(value)
            setattr(node, name, str(local))
    return cfg


def bundle_sources(directory: str | os.PathLike, overrides: dict | None = None) -> ModelConfig:
    """A bundle's config as it names its inputs (nothing fetched), for `portable`: a decoder
    carried inside this bundle (a random tiny one) is given as None, so that a bundle saved
    from a model built on this one carries the decoder too instead of naming this copy."""
    from kosmos_g.models.checkpoint import load_config

    cfg = load_config(directory, overrides)
    decoder = cfg.image_decoder.pretrained_path
    if decoder and Path(decoder).is_relative_to(Path(directory)):
        cfg.image_decoder.pretrained_path = None
    return cfg


def decoder_override(directory: str | os.PathLike, decoder: str | None) -> dict:
    """A stage's frozen decoder as a `load_config` override of the starting bundle's, when the
    stage's config names another one (stage 3 on a retrained or cheaper decoder, from the same
    stage 2): the config is what the job's fingerprint records, so it is what the model is built
    on. {} when the config names none (the bundle's own, perhaps carried inside it) or the same."""
    if not decoder or bundle_sources(directory).image_decoder.pretrained_path == decoder:
        return {}
    return {"image_decoder.pretrained_path": decoder}


def portable(built: ModelConfig, sources: ModelConfig) -> ModelConfig:
    """The config to save with a model built from `localize(sources)`: `built`, with the frozen
    decoder's weights and BPE merges named as in `sources` (an `s3://` or `models:/` URI, a
    user's own path, or None to carry the decoder in the bundle) rather than by this machine's
    cached copies, so a registered bundle loads wherever its store can be reached. (The vision
    weights and the text vocabulary travel inside the bundle.)"""
    cfg = copy.deepcopy(built)
    cfg.image_decoder.pretrained_path = sources.image_decoder.pretrained_path
    cfg.image_decoder.clip_bpe_path = sources.image_decoder.clip_bpe_path
    return cfg


def load_bundle(directory: str | os.PathLike, overrides: dict | None = None, device=None,
                fresh_parts: tuple[str, ...] = ()):
    """`models.checkpoint.load_model` for a bundle whose config names `s3://` inputs (an SD
    decoder or vocabulary kept in object storage, as an imported official bundle does):
    those are fetched into the local cache before the model is built. `fresh_parts` (e.g.
    `("aligner",)`) are built from the (overridden) config and not loaded."""
    from kosmos_g.models.checkpoint import WEIGHTS_NAME, load_config, load_trainable
    from kosmos_g.models.kosmos_g import KosmosG

    model = KosmosG.from_config(localize(load_config(directory, overrides)), device=device)
    load_trainable(model, Path(directory) / WEIGHTS_NAME, skip=fresh_parts)
    return model


def bundle_config(directory: str | os.PathLike) -> ModelConfig:
    """A bundle's config with its storage inputs made local (for parts built on their own)."""
    from kosmos_g.models.checkpoint import load_config

    return localize(load_config(directory))
