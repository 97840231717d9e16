"""The serving pieces without Ray: config, input checks, cached encoder, batched sampler,
LoRA slots and model resolution."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kosmos_g.serve.messages import ImageInput, RequestError
from tests.serve.conftest import make_lora_dir, png_bytes, random_png


# ------------------------------------------------------------------ config


def test_presets_and_overrides():
    from kosmos_g.platform.config import ConfigError
    from kosmos_g.serve.app import config_from_args, deployment_options
    from kosmos_g.serve.config import PRESETS, check

    tiny = PRESETS.get("tiny", ["limits.max_steps=20", "http.port=8100"])
    assert tiny.model.preset == "tiny" and tiny.limits.max_steps == 20 and tiny.http.port == 8100
    assert tiny.http.host == "127.0.0.1"
    for name in PRESETS.names:
        check(PRESETS.get(name))
    with pytest.raises(ConfigError):
        PRESETS.get("tiny", ["limits.max_steps=many"])
    with pytest.raises(ValueError, match="defaults.steps"):
        check(PRESETS.get("tiny", ["defaults.steps=99"]))
    pinned = config_from_args({"preset": "tiny", "model": "s3://b/m"})
    assert pinned.model.uri == "s3://b/m" and pinned.model.preset is None
    paper = PRESETS.get("paper")
    assert deployment_options(paper.denoiser, gpus=True)["ray_actor_options"] == {"num_cpus": 2.0, "num_gpus": 1.0}
    assert "num_gpus" not in deployment_options(paper.denoiser, gpus=False)["ray_actor_options"]
    assert deployment_options(paper.denoiser, gpus=False)["autoscaling_config"]["max_replicas"] == 4


def test_api_scheduler_names_exist_in_models():
    from kosmos_g.models.generation import SCHEDULERS
    from kosmos_g.serve.messages import SCHEDULER_ALIASES, SCHEDULER_NAMES, canonical_scheduler

    assert set(SCHEDULER_ALIASES.values()) <= set(SCHEDULERS) and set(SCHEDULER_NAMES) <= set(SCHEDULERS)
    assert canonical_scheduler("DPM-Solver++") == "dpm++" and canonical_scheduler("Euler") == "euler"
    assert canonical_scheduler("plms") is None


def test_serve_config_yaml_is_readable():
    from kosmos_g.cli.serve import read_serve_config
    from kosmos_g.platform.stack.localstack import repo_root
    from kosmos_g.serve.app import config_from_args

    import yaml
    from ray.serve.schema import ServeDeploySchema

    path = repo_root() / "infra" / "serve" / "kosmos-g.yaml"
    ServeDeploySchema.model_validate(yaml.safe_load(path.read_text()))  # what `serve deploy` checks
    http, args, deployments = read_serve_config(path)
    assert http["host"] == "127.0.0.1"
    config = config_from_args(args)
    assert set(deployments) == {"Ingress", "Encoder", "Denoiser"}
    assert config.http.host == "127.0.0.1"


# ------------------------------------------------------------------ inputs


def test_base64_and_image_checks():
    from kosmos_g.serve.inputs import check_image, decode_base64, image_bytes

    png = random_png(seed=0, size=20)
    encoded = __import__("base64").b64encode(png).decode()
    assert decode_base64(encoded, "x", 10_000) == png
    assert decode_base64("data:image/png;base64," + encoded, "x", 10_000) == png
    for bad, status in [("s3://bucket/key.png", 400), ("file:///etc/passwd", 400), ("@@@", 400), ("A" * 99_999, 413)]:
        with pytest.raises(RequestError) as error:
            decode_base64(bad, "images[0]", 10_000)
        assert error.value.status == status and "images[0]" in error.value.message
    with pytest.raises(RequestError, match="pixel limit"):
        check_image(png_bytes(np.zeros((300, 300, 3), np.uint8)), "img", 10**6, 200 * 200)
    with pytest.raises(RequestError, match="not a decodable image"):
        image_bytes(b"\x89PNG\r\n\x1a\n truncated", "img", 10**6, 10**6)
    assert image_bytes(png, "img", 10**6, 10**6) == png


def test_to_job_resolves_defaults_and_checks_limits():
    from kosmos_g.serve.config import PRESETS
    from kosmos_g.serve.schemas import GenerateRequest, to_job

    config = PRESETS.get("tiny", ["model.lora_prefix=/tmp/adapters"])
    photo = ImageInput("d1", b"...")
    job = to_job(GenerateRequest(prompt="a photo of <image> on the beach", images=["x"]), [photo], None,
                 config, wants_png=False)
    assert job.segments == ["a photo of", photo, "on the beach"]
    assert (job.steps, job.scheduler, job.num_images, job.height) == (10, "dpm++", 1, None)
    assert 0 <= job.seed <= config.limits.max_seed and job.response_format == "json"
    job = to_job(GenerateRequest(prompt="a cat", lora="style-1", seed=3), [], None, config, wants_png=True)
    assert job.adapter == "style-1" and job.seed == 3 and job.response_format == "png"
    with pytest.raises(RequestError, match="ControlNet"):
        to_job(GenerateRequest(prompt="a cat"), [], b"png", config, wants_png=False)


# ------------------------------------------------------------------ model paths


@pytest.fixture(scope="module")
def tiny(tiny_bundle):
    from kosmos_g.models.checkpoint import load_model

    return load_model(tiny_bundle).eval()


def test_condition_encoder_matches_the_model_and_caches(tiny, photos_png):
    from kosmos_g.models.prompt import parse_prompt
    from kosmos_g.serve.encoding import ConditionEncoder
    from kosmos_g.serve.inputs import decode_image, image_input
    from kosmos_g.serve.messages import EncodeRequest

    encoder = ConditionEncoder(tiny, cache_size=2)
    images = [image_input(data) for data in photos_png]
    requests = [EncodeRequest(["a photo of", images[0], "and", images[1]], negative_prompt="blurry"),
                EncodeRequest(["a red bicycle"]), EncodeRequest([images[2], images[0]])]
    results = encoder.encode(requests)
    with torch.no_grad():
        expected = tiny.encode_prompts([
            parse_prompt("a photo of <i> and <i>", [decode_image(photos_png[0]), decode_image(photos_png[1])]),
            "a red bicycle", [decode_image(photos_png[2]), decode_image(photos_png[0])]]).numpy()
        blurry = tiny.encode_prompts(["blurry"])[0].numpy()
        empty = tiny.empty_condition(1)[0].numpy()
    for result, want in zip(results, expected):
        np.testing.assert_allclose(result.cond, want, atol=1e-5)
    np.testing.assert_allclose(results[0].uncond, blurry, atol=1e-5)
    assert np.array_equal(results[1].uncond, empty)
    # Three distinct images, one repeated within the batch; the cache holds only two.
    assert [(r.cache_misses, r.cache_hits) for r in results] == [(2, 0), (0, 0), (1, 1)]
    # The batch held three images but the cache two: images[0] was evicted (least recent).
    again = encoder.encode([requests[2]])[0]
    assert (again.cache_misses, again.cache_hits) == (1, 1)
    alone = ConditionEncoder(tiny).encode([requests[2]])[0]
    np.testing.assert_allclose(again.cond, alone.cond, atol=1e-5)


def test_batched_sampler_matches_the_diffusers_pipeline(tiny):
    from kosmos_g.models.generation import generate
    from kosmos_g.serve.sampling import SampleJob, Sampler

    sampler = Sampler(tiny.image_decoder)
    with torch.no_grad():
        # Encoded one by one, as generate() does: a padded batch would differ in the last bits.
        cat, bike = tiny.encode_prompts(["a cat"])[0], tiny.encode_prompts(["a red bicycle"])[0]
        empty = tiny.empty_condition(1)[0]
    for scheduler in ("dpm++", "ddim", "euler", "ddpm"):
        reference = generate(tiny, ["a cat"], steps=3, seed=4, scheduler=scheduler, num_images=2)
        job = SampleJob(cat, empty, 2, 3, 6.0, scheduler, 4, 32, 32)
        alone = sampler.sample([job])[0]
        assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(alone, reference)), scheduler
        other = SampleJob(bike, empty, 1, 3, 1.0, scheduler, 9, 32, 32)
        together = sampler.sample([other, job])[1]
        diff = max(np.abs(np.asarray(a, int) - np.asarray(b, int)).max() for a, b in zip(together, reference))
        assert diff <= 2, (scheduler, diff)
    with pytest.raises(ValueError, match="share"):
        sampler.sample([job, SampleJob(cat, empty, 1, 4, 6.0, "dpm++", 0, 32, 32)])


def test_adapter_slots_switch_between_lora_and_base(tmp_path, tiny_bundle):
    from kosmos_g.models.checkpoint import load_config
    from kosmos_g.models.image_decoder import ImageDecoder
    from kosmos_g.serve.adapters import AdapterSlots, fetch_adapter, list_adapters

    make_lora_dir(tmp_path / "style")
    assert list_adapters(str(tmp_path)) == ["style"]
    weights = fetch_adapter(str(tmp_path), "style")
    with pytest.raises(RequestError) as missing:
        fetch_adapter(str(tmp_path), "absent")
    assert missing.value.status == 404
    unet = ImageDecoder(load_config(tiny_bundle).image_decoder).unet
    x, c = torch.randn(1, 4, 16, 16), torch.randn(1, 77, 32)
    run = lambda: unet(x, 10, encoder_hidden_states=c).sample  # noqa: E731
    slots = AdapterSlots(unet)
    with torch.no_grad():
        base = run()
        slots.activate(weights)
        adapted = run()
        slots.activate(None)
        assert torch.equal(run(), base) and not torch.equal(adapted, base)
        slots.remove("style")
        slots.activate(weights)  # installed again after an eviction
        assert torch.equal(run(), adapted)


def test_model_source_resolution(stack_env, registered_tiny, tmp_path):
    from kosmos_g.models.checkpoint import load_model
    from kosmos_g.serve.config import ModelSource
    from kosmos_g.serve.model_source import ModelNotFound, local_model_dir, resolve

    newest = resolve(ModelSource(registered_name=registered_tiny))
    assert newest.uri == f"models:/{registered_tiny}/1" and newest.label == f"{registered_tiny}/1"
    assert resolve(ModelSource(uri=f"models:/{registered_tiny}@current")).uri == newest.uri
    assert resolve(ModelSource(uri=f"models:/{registered_tiny}/latest")).uri == newest.uri
    assert load_model(local_model_dir(newest.uri)).config.name == "tiny"
    with pytest.raises(ModelNotFound, match="--preset tiny"):
        resolve(ModelSource(registered_name="kosmos-g-never-registered"))
    with pytest.raises(ModelNotFound):
        resolve(ModelSource(uri=f"models:/{registered_tiny}@nosuchalias"))
    demo = resolve(ModelSource(registered_name="kosmos-g-never-registered", fallback_preset="tiny"))
    assert demo.label == "preset:tiny" and (local_model_dir(demo.uri) / "config.json").is_file()
    assert resolve(ModelSource(preset="tiny")).uri == demo.uri  # same seed: the same bundle, reused
