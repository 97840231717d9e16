"""The Serve application: Ingress -> Encoder -> Denoiser, bound from a ServeConfig.

    from kosmos_g.serve.app import build_app
    serve.run(build_app(PRESETS.get("tiny")))

`app` is the application builder a Serve config YAML names in `import_path`
(infra/serve/kosmos-g.yaml); its `args` are {preset, model, overrides}. Per-deployment
settings from the YAML's `deployments:` section override what the config sets here.
"""

from __future__ import annotations

import logging
from typing import Any

from ray import serve
from ray.serve import Application

from kosmos_g.serve.config import PRESETS, DeploymentOptions, ServeConfig, check, with_model_uri

log = logging.getLogger(__name__)


def cluster_has_gpus() -> bool:
    import ray

    return ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0


def deployment_options(options: DeploymentOptions, gpus: bool) -> dict[str, Any]:
    """Serve `.options(...)` for one deployment: fixed replicas or an autoscaling range."""
    actor = {"num_cpus": options.num_cpus}
    if gpus and options.num_gpus_when_present > 0:
        actor["num_gpus"] = options.num_gpus_when_present
    result: dict[str, Any] = {"ray_actor_options": actor, "max_ongoing_requests": options.max_ongoing_requests}
    if options.max_replicas is not None:
        result["autoscaling_config"] = {
            "min_replicas": options.min_replicas, "max_replicas": options.max_replicas,
            "target_ongoing_requests": options.target_ongoing_requests,
        }
    else:
        result["num_replicas"] = options.num_replicas
    return result


def build_app(config: ServeConfig, overrides: dict[str, dict] | None = None) -> Application:
    """Resolve the model once (pinned registry version or a demo bundle) and bind the graph.

    `overrides`: {"Encoder"|"Denoiser"|"Ingress": {Serve deployment options}}, applied last."""
    from kosmos_g.serve.denoiser import Denoiser
    from kosmos_g.serve.encoder import Encoder
    from kosmos_g.serve.ingress import Ingress
    from kosmos_g.serve.model_source import resolve

    check(config)
    model = resolve(config.model)
    log.info("serving %s from %s", model.label, model.uri)
    gpus = cluster_has_gpus()
    overrides = overrides or {}
    batching, limits = config.batching, config.limits

    def options(name: str, settings: DeploymentOptions) -> dict[str, Any]:
        extra = overrides.get(name, {})
        merged = {**deployment_options(settings, gpus), **extra}
        # Fixed replicas and autoscaling exclude each other: the override's choice wins.
        if "autoscaling_config" in extra and "num_replicas" not in extra:
            merged.pop("num_replicas", None)
        elif "num_replicas" in extra and "autoscaling_config" not in extra:
            merged.pop("autoscaling_config", None)
        return merged

    encoder = Encoder.options(**options("Encoder", config.encoder)).bind(
        model.uri, batching.encoder_max_batch_size, batching.encoder_batch_wait_s,
        batching.encoder_cache_size, limits.max_image_pixels)
    denoiser = Denoiser.options(**options("Denoiser", config.denoiser)).bind(
        model.uri, batching.denoiser_max_batch_size, batching.denoiser_batch_wait_s, batching.max_group_images,
        limits.max_image_pixels, config.model.controlnet_uri, config.model.lora_prefix)
    return Ingress.options(**options("Ingress", config.ingress)).bind(encoder, denoiser, config, model.label)


def config_from_args(args: dict[str, Any] | None) -> ServeConfig:
    """ServeConfig from builder args: preset (default "local"), model (URI), overrides (list)."""
    args = dict(args or {})
    unknown = set(args) - {"preset", "model", "overrides"}
    if unknown:
        raise ValueError(f"unknown application args {sorted(unknown)}; use preset, model, overrides")
    overrides = args.get("overrides") or []
    if isinstance(overrides, str):
        overrides = [overrides]
    config = PRESETS.get(args.get("preset") or "local", list(overrides))
    return with_model_uri(config, args.get("model"))


def app(args: dict[str, Any]) -> Application:
    """Application builder for `serve run` / `serve deploy` (import_path kosmos_g.serve.app:app)."""
    return build_app(config_from_args(args))
