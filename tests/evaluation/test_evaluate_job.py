"""`pipelines/evaluate.py --preset dreambench` end to end on real Ray Data, S3 and MLflow: a tiny
model, a synthetic two-subject set, DINO / CLIP-I / CLIP-T in MLflow with a per-subject table."""

from __future__ import annotations

import torch

from kosmos_g.platform import storage, tracking
from kosmos_g.platform.data import imaging, world


def test_dreambench_job_records_scores(ray_local, s3_prefix, tmp_path, dino_dir, clip_dir):
    from kosmos_g.models.checkpoint import save_servable
    from kosmos_g.models.config import model_preset
    from kosmos_g.models.kosmos_g import KosmosG
    from kosmos_g.pipelines.evaluate import main

    torch.manual_seed(0)
    bundle = save_servable(KosmosG.from_config(model_preset("tiny")), tmp_path / "bundle")
    subjects = f"{s3_prefix}/dreambench"
    for subject, scene in zip(("dog", "backpack"), world.scenes(5, 2, "any")):
        storage.write_bytes(f"{subjects}/{subject}/00.png", imaging.encode_image(scene.render(), "PNG"))
    name = f"dreambench-{s3_prefix.rsplit('/', 1)[-1]}"
    argv = ["--preset", "dreambench", "--subjects", subjects, "--model", str(bundle), "--dino", dino_dir,
            "--clip", clip_dir, "--out", f"{s3_prefix}/gen", "--name", name,
            "--set", "steps=2", "--set", "images_per_prompt=2", "--set", "prompts_per_reference=2"]
    assert main(argv) == 0

    experiment = tracking.client().get_experiment_by_name(tracking.experiment_name("evaluate"))
    run_id = tracking.find_run(experiment.experiment_id, name)
    metrics = tracking.client().get_run(run_id).data.metrics
    assert metrics["dreambench_images"] == 8  # 2 subjects x 1 reference x 2 prompts x 2 images
    for key in ("dreambench_dino", "dreambench_clip_i", "dreambench_clip_t"):
        assert 0.0 <= metrics[key] <= 100.0
    table = tracking.client().download_artifacts(run_id, "dreambench/subjects.csv", str(tmp_path))
    lines = open(table).read().splitlines()
    assert lines[0] == "subject,images,dino,clip_i,clip_t" and [l.split(",")[0] for l in lines[1:]] == ["backpack", "dog"]
    grid = tracking.client().download_artifacts(run_id, "dreambench/samples.png", str(tmp_path))
    from PIL import Image

    assert Image.open(grid).size == (2 * 128, 8 * (128 + 34))  # reference | generated, 8 rows
