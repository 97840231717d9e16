"""Serving fixtures: a tiny servable bundle registered in the test MLflow, a LoRA adapter in
the test S3, a tiny ControlNet, and one real Ray Serve application (started with the
`kosmos-g serve` command itself) shared by the HTTP tests of the session."""

from __future__ import annotations

import io
import secrets
import time
import uuid

import numpy as np
import pytest
import requests
import torch
from PIL import Image

from tests.conftest import BUCKET

API_KEY = "test-" + secrets.token_hex(8)
STEPS = 3


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def random_png(seed: int, size: int = 40) -> bytes:
    """A distinct small photo-like image per seed (fresh cache keys for each test)."""
    rng = np.random.default_rng(seed)
    return png_bytes(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


@pytest.fixture(scope="session")
def photos_png() -> list[bytes]:
    from skimage import data

    return [png_bytes(data.astronaut()[::4, ::4]), png_bytes(data.chelsea()[::3, ::3]),
            png_bytes(data.coffee()[::4, ::4])]


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory):
    """A servable bundle of the tiny preset (seed 0): what `--preset tiny` serves."""
    from kosmos_g.serve.model_source import build_demo_bundle

    return build_demo_bundle("tiny", 0, tmp_path_factory.mktemp("tiny-bundle"))


@pytest.fixture(scope="session")
def registered_tiny(stack_env, tiny_bundle) -> str:
    """The tiny bundle registered like training registers a model; returns its name."""
    from kosmos_g.platform import tracking

    name = f"kosmos-g-servetest-{uuid.uuid4().hex[:6]}"
    run_id, _ = tracking.start_run("serve-test", name)
    tracking.log_dir(run_id, tiny_bundle, "model")
    tracking.register_model(run_id, "model", name)
    tracking.end_run(run_id)
    return name


def make_lora_dir(directory) -> None:
    """A LoRA for the tiny U-Net architecture with non-zero weights, in diffusers format."""
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict

    from kosmos_g.models.config import model_preset
    from kosmos_g.models.generation import add_lora
    from kosmos_g.models.image_decoder import ImageDecoder

    torch.manual_seed(1)
    unet = add_lora(ImageDecoder(model_preset("tiny").image_decoder).unet, rank=4)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    StableDiffusionPipeline.save_lora_weights(str(directory), unet_lora_layers=get_peft_model_state_dict(unet))


@pytest.fixture(scope="session")
def lora_prefix(stack_env, tmp_path_factory) -> str:
    from kosmos_g.platform import storage

    local = tmp_path_factory.mktemp("lora") / "sharp"
    make_lora_dir(local)
    prefix = f"s3://{BUCKET}/serve-test-{uuid.uuid4().hex[:6]}/lora"
    storage.upload_dir(local, storage.join(prefix, "sharp"))
    return prefix


@pytest.fixture(scope="session")
def controlnet_dir(tmp_path_factory):
    from diffusers import ControlNetModel

    from kosmos_g.models.config import model_preset
    from kosmos_g.models.image_decoder import ImageDecoder

    torch.manual_seed(2)
    unet = ImageDecoder(model_preset("tiny").image_decoder).unet
    # Downsampling must match the tiny VAE (x2); zero-initialised outputs would ignore the image.
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32))
    with torch.no_grad():
        for name, p in controlnet.named_parameters():
            if "zero_conv" in name or "controlnet_mid_block" in name or "conv_out" in name:
                p.normal_(0, 0.3)
    path = tmp_path_factory.mktemp("controlnet")
    controlnet.save_pretrained(path)
    return path


# Package scope: the service's replicas hold CPUs of the shared test Ray and must be
# gone before other packages' tests (training) need them.
@pytest.fixture(scope="package")
def service(ray_local, registered_tiny, lora_prefix, controlnet_dir):
    """Base URL of a running service: `kosmos-g serve --detach` on the session's Ray."""
    from ray import serve

    from kosmos_g.cli.main import main
    from kosmos_g.platform.stack.services import free_port

    port = free_port()
    argv = [
        "serve", "--preset", "tiny", "--model", f"models:/{registered_tiny}@current", "--port", str(port),
        "--detach",
        "--set", f"http.api_key={API_KEY}",
        "--set", f"model.lora_prefix={lora_prefix}",
        "--set", f"model.controlnet_uri={controlnet_dir}",
        # Small limits so that the "too large" cases need only small payloads.
        "--set", "limits.max_payload_bytes=2000000",
        "--set", "limits.max_image_bytes=1000000",
        "--set", "limits.max_image_pixels=1000000",
        "--set", "limits.max_prompt_images=4",
        # A slightly longer wait makes concurrent test requests meet in one batch.
        "--set", "batching.denoiser_batch_wait_s=0.05",
        "--set", "batching.encoder_batch_wait_s=0.02",
    ]
    url = f"http://127.0.0.1:{port}"
    try:
        assert main(argv) == 0
        yield url
    finally:
        # `kosmos-g serve --stop` with no other application left stops Serve too: its
        # controller and HTTP proxy would keep polling and holding the port.
        stopped = main(["serve", "--stop"])
        # The controller is killed asynchronously: its name may resolve for a moment after.
        deadline = time.monotonic() + 30
        while (left := _serve_controller_alive()) and time.monotonic() < deadline:
            time.sleep(0.5)
        if left:
            serve.shutdown()  # so that the training packages get their CPUs all the same
        assert stopped == 0 and not left, "kosmos-g serve --stop left Serve running"
        with pytest.raises(requests.ConnectionError):
            requests.get(f"{url}/healthz", timeout=5)


def _serve_controller_alive() -> bool:
    """Whether Serve's controller actor exists (`serve.status()` cannot say: with no Serve running
    it returns an empty status rather than raising)."""
    import ray
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    try:
        ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
    except ValueError:
        return False
    return True


@pytest.fixture(scope="package")
def client(service) -> requests.Session:
    session = requests.Session()
    session.headers["X-API-Key"] = API_KEY
    return session
