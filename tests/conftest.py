"""Session fixtures: a real SeaweedFS S3 server, a real MLflow server proxying
artifacts into it, and a local Ray, all on free loopback ports.

Tests that need storage or tracking take `stack_env`, which points the standard
environment variables (AWS_*, MLFLOW_TRACKING_URI) at these servers for the
whole session, exactly as `eval "$(kosmos-g local env)"` does for a user.
"""

from __future__ import annotations

import os
import secrets
import uuid
from pathlib import Path

import pytest

from kosmos_g.platform.stack import services
from kosmos_g.platform.stack.services import S3Settings

REPO_ROOT = Path(__file__).resolve().parent.parent
BUCKET = "kosmos-test"


@pytest.fixture(scope="session")
def stack_id() -> str:
    return f"pytest-{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory, stack_id):
    root = tmp_path_factory.mktemp("seaweedfs")
    settings = S3Settings(access_key="test-key", secret_key=secrets.token_hex(16), bucket=BUCKET,
                          port=services.free_port())
    stopper = services.Stopper(stack_id)
    try:
        stopper.launched.append(services.start_seaweedfs(
            root / "data", settings, services.seaweed_ports(settings.port), stack_id, root / "seaweedfs.log"))
        yield settings
    finally:
        stopper.stop()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory, s3_server, stack_id):
    root = tmp_path_factory.mktemp("mlflow")
    stopper = services.Stopper(stack_id)
    try:
        launched = services.start_mlflow(root, services.free_port(), s3_server, stack_id, root / "mlflow.log")
        stopper.launched.append(launched)
        yield launched.url
    finally:
        stopper.stop()


@pytest.fixture(scope="session")
def stack_env(s3_server, mlflow_server, tmp_path_factory):
    """Point this process (and Ray workers it starts) at the test servers."""
    env = {
        **s3_server.client_env(),
        "MLFLOW_TRACKING_URI": mlflow_server,
        "KOSMOS_STORAGE_ROOT": f"s3://{s3_server.bucket}",
        "KOSMOS_CACHE_DIR": str(tmp_path_factory.mktemp("cache")),
    }
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    from kosmos_g.platform import storage

    storage._s3_client_for.cache_clear()
    yield env
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    storage._s3_client_for.cache_clear()


@pytest.fixture(scope="session")
def ray_local(stack_env):
    """A local Ray for the session, workers inheriting `stack_env`. It advertises 4
    logical CPUs on any machine: enough that a Serve app, a Ray Train run and its
    Ray Data readers (whose file listing alone asks for a whole CPU) never wait
    on each other for scheduling, while the 2 real cores are shared."""
    import ray

    from kosmos_g.platform.stack import cluster

    os.environ.pop("RAY_ADDRESS", None)
    cluster.connect(num_cpus=4)
    yield ray
    cluster.shutdown()  # ray.shutdown(), then whatever of this Ray outlived it


@pytest.fixture
def s3_prefix(stack_env) -> str:
    """A fresh prefix in the test bucket for one test."""
    return f"s3://{BUCKET}/t/{uuid.uuid4().hex[:10]}"


# Small random DINO ViT and CLIP backbones saved in their usual transformers layouts
# (evaluation jobs and the end-of-stage evaluation score with them).
@pytest.fixture(scope="session")
def dino_dir(tmp_path_factory) -> str:
    import torch
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("dino")
    ViTModel(ViTConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
                       image_size=32, patch_size=8), add_pooling_layer=False).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def clip_dir(tmp_path_factory) -> str:
    import torch
    from transformers import CLIPConfig, CLIPModel

    from kosmos_g.models.tokenizers import build_clip_tokenizer

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("clip")
    CLIPModel(CLIPConfig(
        text_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37),
        vision_config=dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
                           image_size=32, patch_size=8),
        projection_dim=24,
    )).save_pretrained(path)
    build_clip_tokenizer().save_pretrained(path)
    return str(path)



def save_sd_folder(directory, decoder) -> None:
    """A model's image decoder (+ CLIP text teacher) in Stable Diffusion's diffusers layout."""
    from diffusers import StableDiffusionPipeline

    StableDiffusionPipeline(
        vae=decoder.vae, text_encoder=decoder.text_encoder, tokenizer=decoder.clip_tokenizer, unet=decoder.unet,
        scheduler=decoder.noise_scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    ).save_pretrained(directory)


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory) -> str:
    """The tiny preset's random SD decoder saved as a diffusers folder (a stand-in for SD v1.5)."""
    import torch

    from kosmos_g.models.config import model_preset
    from kosmos_g.models.image_decoder import ImageDecoder

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("sd")
    save_sd_folder(path, ImageDecoder(model_preset("tiny").image_decoder))
    return str(path)
