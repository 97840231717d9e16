"""The miniature world's backbone jobs at tiny size, on the real stack (Ray Train + DeepSpeed, S3,
MLflow): the mini CLIP, then the mini decoder (VAE, then U-Net on the frozen mini CLIP); each loss
falls, each result is registered in the layout real CLIP / SD v1.5 load from, and a second run of
the same config reuses the registered version."""

from __future__ import annotations

import pytest
import torch

from kosmos_g.platform import tracking
from kosmos_g.platform.train.backbone_job import backbone_presets, run_backbone

pytestmark = pytest.mark.usefixtures("ray_local")


def _loss_fell(run_id: str, key: str = "loss") -> tuple[float, float]:
    history = sorted(tracking.client().get_metric_history(run_id, key), key=lambda m: m.step)
    values = [m.value for m in history]
    assert len(values) >= 8, values
    return sum(values[:3]) / 3, sum(values[-3:]) / 3


def _run_of(registered: str) -> str:
    name, version = registered.split("/")
    return tracking.client().get_model_version(name, version).run_id


@pytest.fixture(scope="module")
def world_prefix(stack_env):
    import uuid

    from kosmos_g.platform.data.world import write_world_shards
    from tests.conftest import BUCKET

    prefix = f"s3://{BUCKET}/t/{uuid.uuid4().hex[:10]}"
    write_world_shards(f"{prefix}/world", count=96, rows_per_shard=32)
    return prefix


def test_mini_clip_then_mini_decoder(world_prefix):
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPModel, CLIPVisionModel

    common = [f"data.captions={world_prefix}/world/captions", f"storage_path={world_prefix}/ray-train"]
    clip_cfg = backbone_presets("clip").get("tiny", common + ["train.steps=24", "name=mini-clip-test"])
    clip = run_backbone(clip_cfg)
    assert clip and clip.startswith("kosmos-g-mini-clip/")
    first, last = _loss_fell(_run_of(clip))
    assert last < first, (first, last)
    clip_dir = tracking.resolve_artifacts(f"models:/{clip}")
    assert CLIPModel.from_pretrained(clip_dir).config.text_config.hidden_size == 32
    assert CLIPVisionModel.from_pretrained(clip_dir).config.image_size == 32  # the MLLM's vision path
    assert (clip_dir / "tokenizer.json").is_file()  # the CLIP tokenizer travels with it

    assert run_backbone(clip_cfg) == clip  # same config: the registered version is reused

    decoder_cfg = backbone_presets("decoder").get(
        "tiny", common + [f"clip_model=models:/{clip}", "train.steps=24", "vae_steps=16", "name=mini-decoder-test"])
    decoder = run_backbone(decoder_cfg)
    assert decoder and decoder.startswith("kosmos-g-mini-decoder/")
    first, last = _loss_fell(_run_of(decoder))
    assert last < first, (first, last)
    sd_dir = tracking.resolve_artifacts(f"models:/{decoder}")
    for part in ("unet", "vae", "scheduler", "text_encoder", "tokenizer"):
        assert (sd_dir / part).is_dir(), part
    assert (sd_dir / "model_index.json").is_file()
    unet = UNet2DConditionModel.from_pretrained(sd_dir, subfolder="unet")
    vae = AutoencoderKL.from_pretrained(sd_dir, subfolder="vae")
    scheduler = DDPMScheduler.from_pretrained(sd_dir, subfolder="scheduler")
    assert unet.config.cross_attention_dim == 32 and unet.config.sample_size == 8
    assert scheduler.config.prediction_type == "v_prediction" and scheduler.config.rescale_betas_zero_snr
    assert vae.config.scaling_factor != 1.0  # set from the trained VAE's latents
    with torch.no_grad():
        out = unet(torch.randn(1, 4, 8, 8), 10, encoder_hidden_states=torch.randn(1, 77, 32)).sample
    assert out.shape == (1, 4, 8, 8)

    # The wiring of the mini preset: Kosmos-G on the registered backbones (registry URIs fetched by
    # localize): the MLLM sees through the mini CLIP's vision tower, stage 2's teacher is its text
    # encoder inside the SD folder, stage 3 denoises through the mini U-Net.
    from kosmos_g.models.config import model_preset
    from kosmos_g.models.kosmos_g import KosmosG
    from kosmos_g.platform.data.world import scenes
    from kosmos_g.platform.weights import localize

    cfg = model_preset("mini")
    cfg.mllm.vision.pretrained_path = f"models:/{clip}"
    cfg.image_decoder.pretrained_path = tracking.pin_model_uri("models:/kosmos-g-mini-decoder/latest")
    cfg.aligner.dim = cfg.image_decoder.condition_dim = 32
    model = KosmosG.from_config(localize(cfg))
    assert model.mllm.vision.width == 32 and model.config.image_decoder.image_size == 16
    teacher = CLIPModel.from_pretrained(clip_dir).text_model
    assert torch.equal(model.image_decoder.text_encoder.embeddings.token_embedding.weight,
                       teacher.embeddings.token_embedding.weight)
    scene = scenes(5, 1)[0]
    batch = model.tokenizer([[scene.render(), f" on a {scene.background} background"]])
    model.set_stage(2)
    assert torch.isfinite(model.align_loss(batch, [scene.caption])["loss"])
    model.set_stage(3)
    target = torch.rand(1, 3, 16, 16) * 2 - 1
    assert torch.isfinite(model.diffusion_loss(batch, target))

