"""Where the served model comes from, decided once when the application is built.

Registry URIs are pinned to a version number (`models:/kosmos-g@current` ->
`models:/kosmos-g/7`) before any replica starts, so every encoder and denoiser replica
loads the same weights even if training registers a new version meanwhile. A demo
preset is built once (seeded), written as a servable bundle, and loaded from there by
every replica exactly like a registered model.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from kosmos_g.serve.config import ModelSource

log = logging.getLogger(__name__)
_REGISTRY_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>[^/]+)|@(?P<alias>[^/]+))$")


class ModelNotFound(RuntimeError):
    pass


@dataclass(frozen=True)
class ResolvedModel:
    uri: str  # what replicas load: a pinned models:/name/N, a storage URI or a local bundle
    label: str  # shown to API clients, e.g. "kosmos-g/7" or "preset:tiny"


def resolve(source: ModelSource) -> ResolvedModel:
    """Pin the configured source (driver side; needs MLflow only for registry URIs)."""
    if source.uri:
        return _resolve_uri(source.uri)
    if source.preset:
        return _demo(source.preset, source.seed)
    from kosmos_g.platform import tracking

    newest = tracking.latest_model_uri(source.registered_name) if os.environ.get("MLFLOW_TRACKING_URI") else None
    if newest:
        return _resolve_uri(newest)
    if source.fallback_preset:
        log.warning("no version of %r is registered: serving the %r demo model built from config",
                    source.registered_name, source.fallback_preset)
        return _demo(source.fallback_preset, source.seed)
    raise ModelNotFound(
        f"no version of {source.registered_name!r} is registered (MLFLOW_TRACKING_URI="
        f"{os.environ.get('MLFLOW_TRACKING_URI')!r}); train one, pass --model URI, or --preset tiny for a demo")


def _resolve_uri(uri: str) -> ResolvedModel:
    match = _REGISTRY_URI.match(uri)
    if not match:
        return ResolvedModel(uri, uri)
    name = match["name"]
    version = _registry_version(name, match["version"], match["alias"])
    return ResolvedModel(f"models:/{name}/{version}", f"{name}/{version}")


def _registry_version(name: str, version: str | None, alias: str | None) -> str:
    from mlflow.exceptions import MlflowException

    from kosmos_g.platform import tracking

    client = tracking.client()
    try:
        if alias:
            return str(client.get_model_version_by_alias(name, alias).version)
        if version and version != "latest":
            return str(client.get_model_version(name, version).version)
        versions = client.search_model_versions(f"name = '{name}'", max_results=1,
                                                order_by=["version_number DESC"])
    except MlflowException as error:
        raise ModelNotFound(f"models:/{name}{'@' + alias if alias else '/' + str(version)}: {error.message}") from None
    if not versions:
        raise ModelNotFound(f"no version of {name!r} is registered")
    return str(versions[0].version)


def _demo(preset: str, seed: int) -> ResolvedModel:
    return ResolvedModel(str(build_demo_bundle(preset, seed)), f"preset:{preset}")


def build_demo_bundle(preset: str, seed: int, directory: str | os.PathLike | None = None) -> Path:
    """A servable bundle of a randomly initialised model preset (seeded: reproducible).

    Without `directory` it lands under KOSMOS_CACHE_DIR (or the system temp dir) in a folder
    named by its weights' hash: rebuilding the same demo reuses it, and a replica that
    restarts later still finds it. A demo served this way runs on one machine; for a
    cluster, register a model instead."""
    import torch

    from kosmos_g.models.checkpoint import save_servable
    from kosmos_g.models.config import model_preset
    from kosmos_g.models.kosmos_g import KosmosG

    torch.manual_seed(seed)
    model = KosmosG.from_config(model_preset(preset))
    if directory is not None:
        return save_servable(model, directory)
    root = Path(os.environ.get("KOSMOS_CACHE_DIR") or tempfile.gettempdir()) / "serve-demo"
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=root))
    save_servable(model, staging)
    digest = _tree_digest(staging)
    target = root / f"{preset}-seed{seed}-{digest}"
    try:
        os.rename(staging, target)  # atomic; fails when an identical bundle is already there
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _tree_digest(directory: Path) -> str:
    """Hash of every file (path and bytes) under `directory`."""
    digest = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        digest.update(path.relative_to(directory).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def local_model_dir(uri: str) -> Path:
    """Replica side: a local directory holding the bundle at `uri`."""
    from kosmos_g.platform import tracking

    return tracking.resolve_artifacts(uri)
