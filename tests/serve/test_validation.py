"""Every class of bad input gets a 4xx that says what to fix, and the service keeps serving."""

from __future__ import annotations

import base64

import numpy as np
import pytest

from tests.serve.conftest import STEPS, png_bytes, random_png


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


SMALL = b64(random_png(seed=1, size=16))
# 1100 x 1000 pixels: over the test service's 1,000,000 pixel limit, yet a small file.
WIDE = b64(png_bytes(np.zeros((1000, 1100, 3), np.uint8)))
# Noise does not compress: a ~1.1 MB PNG, over the 1,000,000 byte image limit.
HEAVY = b64(random_png(seed=2, size=610))

JSON_CASES = [
    ("too many images", {"prompt": "<i> " * 5, "images": [SMALL] * 5}, 400, "too many images"),
    ("image too large (pixels)", {"prompt": "<i>", "images": [WIDE]}, 413, "pixel limit"),
    ("image too large (bytes)", {"prompt": "<i>", "images": [HEAVY]}, 413, "byte limit"),
    ("undecodable image", {"prompt": "<i>", "images": [b64(b"GIF89a but not really")]}, 400, "not a decodable image"),
    ("wrong base64", {"prompt": "<i>", "images": ["not*base64!"]}, 400, "not valid base64"),
    ("image URL", {"prompt": "<i>", "images": ["https://example.com/dog.png"]}, 400, "never fetched"),
    ("placeholder mismatch", {"prompt": "<i> and <i>", "images": [SMALL]}, 400, "placeholder"),
    ("unknown scheduler", {"prompt": "a cat", "scheduler": "plms"}, 400, "unknown scheduler"),
    ("steps too high", {"prompt": "a cat", "steps": 500}, 400, "steps must be between"),
    ("steps zero", {"prompt": "a cat", "steps": 0}, 400, "steps must be between"),
    ("size too large", {"prompt": "a cat", "height": 4096}, 400, "height must be between"),
    ("size not a multiple", {"prompt": "a cat", "width": 33}, 400, "multiple of 8"),
    ("too many outputs", {"prompt": "a cat", "num_images": 50}, 400, "num_images"),
    ("guidance not finite", {"prompt": "a cat", "guidance_scale": "nan"}, 400, "guidance_scale"),
    ("negative seed", {"prompt": "a cat", "seed": -3}, 400, "seed must be between"),
    ("empty prompt", {"prompt": "   "}, 400, "prompt is empty"),
    ("empty segment list", {"prompt": []}, 400, "prompt is empty"),
    ("prompt too long", {"prompt": "a" * 5000}, 400, "characters"),
    ("missing prompt", {"steps": 3}, 422, "prompt"),
    ("wrong type", {"prompt": "a cat", "steps": "many"}, 422, "steps"),
    ("unknown field", {"prompt": "a cat", "strength": 0.5}, 422, "strength"),
    ("bad adapter name", {"prompt": "a cat", "lora": "../../etc"}, 400, "adapter names"),
    ("png with several images", {"prompt": "a cat", "num_images": 2, "response_format": "png"}, 400, "image/png"),
    ("images beside segments", {"prompt": [{"text": "a"}], "images": [SMALL]}, 400, "segment-list"),
]


@pytest.mark.parametrize("name,body,status,message", JSON_CASES, ids=[c[0] for c in JSON_CASES])
def test_invalid_json_request(client, service, name, body, status, message):
    response = client.post(f"{service}/v1/generate", json=body, timeout=60)
    assert response.status_code == status, response.text
    assert message in response.json()["detail"]


@pytest.mark.parametrize("name,kwargs,status,message", [
    ("not JSON", dict(data=b"{nope", headers={"Content-Type": "application/json"}), 400, "not valid JSON"),
    ("JSON array", dict(data=b"[1, 2]", headers={"Content-Type": "application/json"}), 400, "JSON object"),
    ("unsupported type", dict(data=b"a cat", headers={"Content-Type": "text/plain"}), 415, "Content-Type"),
    ("payload over the limit", dict(data=b"x" * 2_500_000, headers={"Content-Type": "application/json"}),
     413, "byte limit"),
    ("multipart undecodable upload", dict(data={"prompt": "<i>"}, files=[("images", ("a.png", b"junk", "image/png"))]),
     400, "not a decodable image"),
    ("multipart too many uploads", dict(data={"prompt": "<i>"}, files=[("images", ("a.png", b"x", "image/png"))] * 9),
     400, "malformed form"),
    ("multipart stray file", dict(data={"prompt": "a cat"}, files=[("steps", ("s.txt", b"3", "text/plain"))]),
     400, "file uploads"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_invalid_raw_request(client, service, name, kwargs, status, message):
    response = client.post(f"{service}/v1/generate", timeout=60, **kwargs)
    assert response.status_code == status, response.text
    assert message in response.json()["detail"]


def test_service_still_answers_after_bad_input(client, service):
    response = client.post(f"{service}/v1/generate", json={"prompt": "a cat", "steps": STEPS, "seed": 0}, timeout=60)
    assert response.status_code == 200, response.text
    assert client.get(f"{service}/healthz").status_code == 200


def test_oversized_body_reaches_a_client_without_expect_continue(service):
    """urllib sends the whole 40 MB body before reading: it must get the 413, not a reset."""
    import json
    import urllib.error
    import urllib.request

    from tests.serve.conftest import API_KEY

    request = urllib.request.Request(f"{service}/v1/generate", data=b"x" * (40 * 1024 * 1024), method="POST",
                                     headers={"Content-Type": "application/json", "X-API-Key": API_KEY})
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=120)
    assert caught.value.code == 413
    assert "byte limit" in json.loads(caught.value.read())["detail"]
