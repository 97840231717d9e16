"""Streamed progress (server-sent events) and the OpenAI-style images endpoint, over real HTTP."""

from __future__ import annotations

import base64
import json

import numpy as np
import requests

from tests.serve.conftest import STEPS
from tests.serve.test_service import b64, first_image, generate, pixels


def read_events(response: requests.Response) -> list[tuple[str, dict]]:
    """(event, data) pairs of a text/event-stream body, in arrival order."""
    events, name = [], None
    for line in response.iter_lines(decode_unicode=True):
        if line.startswith("event: "):
            name = line[len("event: "):]
        elif line.startswith("data: "):
            events.append((name, json.loads(line[len("data: "):])))
    return events


def test_stream_reports_every_step_then_the_same_image_as_generate(client, service, photos_png):
    body = {"prompt": "<image> in a garden", "images": [b64(photos_png[2])], "seed": 21, "steps": 4}
    with client.post(f"{service}/v1/generate/stream", json=body, stream=True, timeout=120) as response:
        assert response.status_code == 200, response.text
        assert response.headers["content-type"].startswith("text/event-stream")
        events = read_events(response)
    names = [name for name, _ in events]
    assert names[:2] == ["stage", "stage"] and names[-1] == "result", names
    assert [data["step"] for name, data in events if name == "step"] == [1, 2, 3, 4]
    assert all(data["steps"] == 4 for name, data in events if name == "step")
    streamed = events[-1][1]
    assert streamed["seed"] == 21 and "denoise_s" in streamed["timings"]
    plain = generate(client, service, **body)
    assert np.array_equal(first_image(streamed), first_image(plain))


def test_stream_refuses_bad_requests_before_streaming_and_reports_late_errors_as_events(
        client, service, photos_png):
    too_many_steps = {"prompt": "<image>", "images": [b64(photos_png[0])], "steps": 100000}
    response = client.post(f"{service}/v1/generate/stream", json=too_many_steps, timeout=60)
    assert response.status_code == 400 and "steps must be between" in response.json()["detail"]
    # A LoRA that does not exist is found only by the denoiser, after streaming began.
    unknown_lora = {"prompt": "<image>", "images": [b64(photos_png[0])], "steps": STEPS, "lora": "nope"}
    with client.post(f"{service}/v1/generate/stream", json=unknown_lora, stream=True, timeout=120) as response:
        assert response.status_code == 200
        events = read_events(response)
    name, data = events[-1]
    assert name == "error" and data["status"] == 404 and "nope" in data["detail"], events


def test_openai_style_generations(client, service, photos_png):
    body = {"prompt": "a photo of <image>", "n": 2, "size": "32x32", "response_format": "b64_json",
            "images": [b64(photos_png[1])], "seed": 5, "steps": STEPS}
    response = client.post(f"{service}/v1/images/generations", json=body, timeout=120)
    assert response.status_code == 200, response.text
    result = response.json()
    assert isinstance(result["created"], int) and len(result["data"]) == 2 and result["seed"] == 5
    image = pixels(base64.b64decode(result["data"][0]["b64_json"]))
    assert image.shape == (32, 32, 3)
    same = generate(client, service, prompt=body["prompt"], images=body["images"], seed=5, num_images=2)
    assert np.array_equal(image, first_image(same))


def test_openai_style_errors_use_the_error_envelope(client, service, photos_png):
    cases = [
        ({"prompt": "a cat", "response_format": "url", "steps": STEPS}, 400, "b64_json"),
        ({"prompt": "a cat", "size": "big", "steps": STEPS}, 400, "512x512"),
        ({"prompt": "a cat", "quality": "hd"}, 422, "quality"),
        ({"prompt": "a cat", "model": "dall-e-3"}, 404, "not served here"),
        ({"prompt": "<image> and <image>", "images": [b64(photos_png[0])]}, 400, "placeholder"),
    ]
    for body, status, words in cases:
        response = client.post(f"{service}/v1/images/generations", json=body, timeout=60)
        assert response.status_code == status, (body, response.text)
        error = response.json()["error"]
        assert words in error["message"] and error["code"] == status and error["type"], error
    unauthorized = requests.post(f"{service}/v1/images/generations", json={"prompt": "a cat"}, timeout=60)
    assert unauthorized.status_code == 401
    assert unauthorized.json()["error"]["type"] == "authentication_error"
