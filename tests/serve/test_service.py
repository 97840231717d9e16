"""The real service over HTTP: Ray Serve on CPU, the tiny model registered in MLflow."""

from __future__ import annotations

import base64
import concurrent.futures as cf
import io

import numpy as np
import pytest
from PIL import Image

from tests.serve.conftest import API_KEY, STEPS, random_png


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)


def generate(client, service, **body):
    body.setdefault("steps", STEPS)
    response = client.post(f"{service}/v1/generate", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def first_image(result: dict) -> np.ndarray:
    return pixels(base64.b64decode(result["images"][0]["png_base64"]))


def test_health_models_and_docs(client, service, registered_tiny):
    assert client.get(f"{service}/healthz").json()["status"] == "ok"
    models = client.get(f"{service}/v1/models").json()["data"][0]
    assert models["id"] == f"{registered_tiny}/1"  # the alias was pinned to its version
    assert models["native_size"] == 32 and models["condition_shape"] == [77, 32]
    assert models["lora_adapters"] == ["sharp"] and models["controlnet"] is True
    assert "dpm++" in models["schedulers"]
    docs = client.get(f"{service}/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    spec = client.get(f"{service}/openapi.json").json()
    body = spec["paths"]["/v1/generate"]["post"]["requestBody"]["content"]
    assert {"application/json", "multipart/form-data"} <= set(body)
    assert "GenerateRequest" in spec["components"]["schemas"]


def test_one_image_prompt_end_to_end(client, service, photos_png):
    result = generate(client, service, prompt="a photo of <image> on the beach", images=[b64(photos_png[0])],
                      seed=7, num_images=2)
    assert len(result["images"]) == 2 and result["seed"] == 7
    assert first_image(result).shape == (32, 32, 3)
    assert result["width"] == result["height"] == 32
    assert {"encode_s", "denoise_s", "vae_decode_s", "total_s"} <= set(result["timings"])


def test_three_image_prompt_as_segments_returns_png(client, service, photos_png):
    prompt = [{"text": "a photo of"}, {"image": b64(photos_png[0])}, {"text": "and"},
              {"image": b64(photos_png[1])}, {"text": "in front of"}, {"image": b64(photos_png[2])}]
    response = client.post(f"{service}/v1/generate", json={"prompt": prompt, "steps": STEPS, "seed": 1},
                           headers={"Accept": "image/png"}, timeout=120)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    assert response.headers["X-Kosmos-Seed"] == "1"
    assert pixels(response.content).shape == (32, 32, 3)


def test_same_seed_same_image(client, service, photos_png):
    body = dict(prompt="<i> in the snow", images=[b64(photos_png[1])], seed=1234, scheduler="DPM-Solver++")
    first, again = first_image(generate(client, service, **body)), first_image(generate(client, service, **body))
    assert np.array_equal(first, again)
    other = first_image(generate(client, service, **{**body, "seed": 1235}))
    assert not np.array_equal(first, other)
    for scheduler in ("ddim", "euler"):
        a = first_image(generate(client, service, **{**body, "scheduler": scheduler}))
        assert np.array_equal(a, first_image(generate(client, service, **{**body, "scheduler": scheduler})))


def test_served_image_matches_in_process_generation(client, service, photos_png, tiny_bundle):
    """The service computes what models.generation.generate computes for the same model."""
    from kosmos_g.models.checkpoint import load_model
    from kosmos_g.models.generation import generate as generate_locally
    from kosmos_g.models.prompt import parse_prompt

    model = load_model(tiny_bundle).eval()
    photo = Image.open(io.BytesIO(photos_png[2]))
    local = generate_locally(model, [parse_prompt("a cup of <i>", [photo])], steps=STEPS, seed=5,
                             negative_prompt="blurry")[0]
    served = first_image(generate(client, service, prompt="a cup of <i>", images=[b64(photos_png[2])], seed=5,
                                  negative_prompt="blurry"))
    # Equal up to float reduction order (replicas run with another thread count).
    assert np.abs(served - np.asarray(local, dtype=np.int16)).max() <= 2


def test_concurrent_requests_share_unet_passes(client, service, photos_png):
    def call(i):
        return generate(client, service, prompt=f"<i> number {i}", images=[b64(photos_png[0])], seed=i)

    solo = first_image(call(3))
    with cf.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(call, range(8)))
    shared = [r["batching"]["shared_unet_requests"] for r in results]
    assert max(shared) > 1, shared
    assert max(r["batching"]["denoiser_batch_size"] for r in results) > 1
    # Per-request generators: a request's image does not depend on its batch mates.
    assert np.abs(first_image(results[3]) - solo).max() <= 2
    stats = client.get(f"{service}/v1/stats").json()
    assert stats["denoiser"]["max_batch_size"] > 1


def test_incompatible_requests_are_grouped_apart(client, service):
    shapes = [dict(height=32, width=32, steps=3), dict(height=48, width=24, steps=3),
              dict(height=32, width=32, steps=2)]

    def call(i):
        return generate(client, service, prompt=f"a red bicycle {i}", seed=i, **shapes[i % 3])

    with cf.ThreadPoolExecutor(6) as pool:
        results = list(pool.map(call, range(6)))
    for i, result in enumerate(results):
        assert first_image(result).shape == (shapes[i % 3]["height"], shapes[i % 3]["width"], 3)
        assert result["batching"]["shared_unet_requests"] <= 2  # never more than its own shape's requests


def test_encoder_cache_hits_on_a_repeated_image(client, service):
    fresh = b64(random_png(seed=99))
    cold = generate(client, service, prompt="<i> on a boat", images=[fresh], seed=0)["batching"]
    assert (cold["cache_misses"], cold["cache_hits"]) == (1, 0)
    warm = generate(client, service, prompt="<i> on a bike", images=[fresh], seed=0)["batching"]
    assert (warm["cache_misses"], warm["cache_hits"]) == (0, 1)
    other = b64(random_png(seed=100))
    mixed = generate(client, service, prompt="<i> and <i> and <i>", images=[other, fresh, other])["batching"]
    assert (mixed["cache_misses"], mixed["cache_hits"]) == (1, 2)


def test_lora_adapter_per_request(client, service, photos_png):
    body = dict(prompt="<i> at night", images=[b64(photos_png[0])], seed=11)
    base = first_image(generate(client, service, **body))
    adapted = first_image(generate(client, service, **body, lora="sharp"))
    assert not np.array_equal(base, adapted)
    assert np.array_equal(adapted, first_image(generate(client, service, **body, lora="sharp")))
    assert np.array_equal(base, first_image(generate(client, service, **body)))  # adapter switched off again
    missing = client.post(f"{service}/v1/generate", json={**body, "lora": "nope"}, timeout=60)
    assert missing.status_code == 404 and "nope" in missing.json()["detail"]


def test_controlnet_control_image(client, service):
    edges = np.where(np.indices((32, 32)).sum(0) % 8 < 4, 255, 0).astype(np.uint8)
    stripes = png_of(np.stack([edges] * 3, axis=-1))
    blank = png_of(np.zeros((32, 32, 3), np.uint8))
    body = dict(prompt="a house", seed=3)
    with_stripes = first_image(generate(client, service, **body, control_image=b64(stripes)))
    with_blank = first_image(generate(client, service, **body, control_image=b64(blank), control_scale=0.5))
    assert not np.array_equal(with_stripes, with_blank)


def png_of(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("headers,status", [
    ({}, 401), ({"X-API-Key": "wrong"}, 401), ({"Authorization": "Bearer wrong"}, 401),
    ({"Authorization": f"Bearer {API_KEY}"}, 200), ({"X-API-Key": API_KEY}, 200),
])
def test_api_key(service, headers, status):
    import requests

    response = requests.get(f"{service}/v1/models", headers=headers, timeout=30)
    assert response.status_code == status, response.text
    if status == 401:
        assert "API key" in response.json()["detail"]
        blocked = requests.post(f"{service}/v1/generate", json={"prompt": "a cat"}, headers=headers, timeout=30)
        assert blocked.status_code == 401
    assert requests.get(f"{service}/healthz", timeout=30).status_code == 200  # open for probes


def test_generate_command_writes_png(service, photos_png, tmp_path, capsys):
    from kosmos_g.cli.main import main

    (tmp_path / "dog.png").write_bytes(photos_png[1])
    out = tmp_path / "out.png"
    argv = ["generate", "a photo of <image> on the beach", "--image", str(tmp_path / "dog.png"), "-o", str(out),
            "--url", service, "--api-key", API_KEY, "--steps", str(STEPS), "--seed", "3"]
    assert main(argv) == 0
    assert Image.open(out).size == (32, 32)
    assert main(argv[:5] + [str(tmp_path / "many.png")] + argv[6:] + ["-n", "2"]) == 0
    assert (tmp_path / "many-0.png").exists() and (tmp_path / "many-1.png").exists()
    assert main(argv[:-2] + ["--seed", "-1"]) == 1
    assert "seed must be between" in capsys.readouterr().err
