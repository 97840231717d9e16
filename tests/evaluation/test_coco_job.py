"""`pipelines/evaluate_coco.py` end to end on real Ray Data, S3 and MLflow: a COCO-layout folder,
a tiny model, FID with an Inception TorchScript file (read from S3) in the release's convention."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import torch
from PIL import Image

from kosmos_g.platform import storage, tracking
from kosmos_g.platform.data import imaging, world


def write_coco(root: str, count: int) -> list[str]:
    """`count` val2014 images (world scenes, some not square) and two captions each."""
    images, annotations = [], []
    for i, scene in enumerate(world.scenes(11, count, "any")):
        pixels = np.asarray(scene.render())
        if i % 2:
            pixels = np.concatenate([pixels, pixels[:, :24]], axis=1)  # 64 x 88: the crop matters
        name = f"COCO_val2014_{i:012d}.jpg"
        storage.write_bytes(f"{root}/val2014/{name}", imaging.encode_image(Image.fromarray(pixels), "JPEG"))
        images.append({"id": i, "file_name": name})
        annotations += [{"image_id": i, "id": 2 * i + k, "caption": caption}
                        for k, caption in enumerate((scene.caption, f"a picture <i> number {i}"))]
    storage.write_text(f"{root}/annotations/captions_val2014.json",
                       json.dumps({"images": images, "annotations": annotations}))
    return [a["caption"] for a in annotations]


def test_caption_sample_is_the_releases():
    from kosmos_g.pipelines.evaluate_coco import sample_captions

    annotations = [{"id": i, "caption": f"c{i}"} for i in range(500)]
    random.seed(0)
    expected = random.sample(annotations, 40)
    assert sample_captions(annotations, 40, 0) == expected
    try:
        sample_captions(annotations, 501, 0)
    except ValueError as error:
        assert "only 500 captions" in str(error)
    else:
        raise AssertionError("asking for more captions than exist must fail")


def test_coco_fid_job_records_fid_counts_and_grid(ray_local, s3_prefix, tmp_path, inception_file):
    from kosmos_g.models.checkpoint import save_servable
    from kosmos_g.models.config import model_preset
    from kosmos_g.models.kosmos_g import KosmosG
    from kosmos_g.pipelines.evaluate_coco import main

    torch.manual_seed(0)
    bundle = save_servable(KosmosG.from_config(model_preset("tiny")), tmp_path / "bundle")
    coco = f"{s3_prefix}/coco"
    write_coco(coco, 6)
    inception = f"{s3_prefix}/weights/inception-2015-12-05.pt"
    storage.write_bytes(inception, open(inception_file, "rb").read())
    name = f"coco-{s3_prefix.rsplit('/', 1)[-1]}"
    argv = ["--preset", "tiny", "--coco", coco, "--inception", inception, "--model", str(bundle),
            "--out", f"{s3_prefix}/gen", "--name", name, "--set", "samples=5", "--set", "real_images=0"]
    assert main(argv) == 0

    experiment = tracking.client().get_experiment_by_name(tracking.experiment_name("evaluate"))
    run = tracking.client().get_run(tracking.find_run(experiment.experiment_id, name))
    metrics = run.data.metrics
    assert metrics["coco_real_images"] == 6 and metrics["coco_generated_images"] == 5
    assert metrics["coco_skipped_rows"] == 0
    assert math.isfinite(metrics["coco_fid"]) and metrics["coco_fid"] > 0
    assert run.data.params["scheduler"] == "ddim" and run.data.params["guidance_scale"] == "3.0"
    assert run.data.tags["benchmark"] == "coco-fid"
    artifacts = [a.path for a in tracking.client().list_artifacts(run.info.run_id, "coco")]
    assert artifacts == ["coco/samples.png"]
    assert len([u for u in storage.list_uris(f"{s3_prefix}/gen/images") if u.endswith(".png")]) == 5


def test_missing_inputs_are_a_clear_error(capsys):
    from kosmos_g.pipelines.evaluate_coco import main

    assert main(["--preset", "tiny", "--coco", "/nonexistent"]) == 2
    assert "--inception are required" in capsys.readouterr().err
