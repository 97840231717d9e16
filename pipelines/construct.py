"""Construct compositional training data (paper section 3.1, Figure 4) with Ray Data.

    ray job submit -- python pipelines/construct.py --preset tiny
    python pipelines/construct.py --preset paper --set input=s3://bucket/openimages/ \\
        --set output=s3://bucket/shards/compositional

images under `input` -> decode (bad files skipped) -> captioner (BLIP-2) -> entity
extraction (instruction-tuned LLM) -> text-prompted segmentation (CLIPSeg) of each
entity -> compositional shards under `output` (crop with background, crop with the
background removed). Each model stage is an actor pool (GPU when the cluster has one).
Skipped images are counted by reason, logged to MLflow and printed. Shard names are
deterministic, so re-running on the same input replaces the shards instead of adding
copies. Relative URIs are resolved under $KOSMOS_STORAGE_ROOT.

The `tiny` preset is the local demo: it writes the scikit-image sample photographs to
`samples/images` and tiny random BLIP-2 / MPT / CLIPSeg checkpoints to
`models/construct-tiny/` (when missing) and runs the real code path on them.

The `world` preset makes the miniature world's compositional shards (docs/REPRODUCTION.md) from
its scene images (`world/images`, written when missing) with the world's stand-ins for the three
models (pipelines/construct_world.py: ground truth read from pixels as captioner and segmenter,
the caption's grammar as entity extractor), in PNG so palette colours stay exact.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import sys
import time
import uuid
from dataclasses import dataclass, field

from kosmos_g.platform.stack import cluster
from kosmos_g.platform.data import shards, skips
from kosmos_g.platform import storage, tracking
from kosmos_g.platform.config import Presets, to_yaml

SKIP_REASONS = ("decode_error", "no_entities", "empty_mask")
IMAGE_EXTENSIONS = ["jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff"]
# MPT-7B-Instruct's (Dolly) instruction format; {caption} is filled in per image.
ENTITY_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n"
    "### Instruction:\nList the objects, people and animals mentioned in this image caption, separated by "
    "commas. Copy each one exactly as it is written in the caption.\nCaption: {caption}\n### Response:\n"
)


@dataclass
class ModelsConfig:
    """Local directories or storage URIs of transformers checkpoints (with processors)."""

    captioner: str = "models/blip2-opt-6.7b"
    entity_llm: str = "models/mpt-7b-instruct"
    segmenter: str = "models/clipseg-rd64-refined"
    build_tiny: bool = False  # write tiny random checkpoints there when missing (demo/tests)


@dataclass
class CaptionConfig:
    prompt: str = ""
    max_new_tokens: int = 30
    no_repeat_ngram_size: int = 0
    batch_size: int = 16


@dataclass
class EntityConfig:
    prompt: str = ENTITY_PROMPT
    max_new_tokens: int = 48
    # Bans repeats of prompt tokens too, i.e. of the caption's words: keep 0 here.
    no_repeat_ngram_size: int = 0
    max_entities: int = 8
    do_sample: bool = False  # greedy as in the paper; sampling is seeded per batch
    seed: int = 0
    batch_size: int = 16


@dataclass
class SegmentConfig:
    mask_threshold: float = 0.3  # on CLIPSeg's sigmoid output (paper: 0.3)
    min_entity_area: float = 0.01  # fraction of the image an entity mask must cover
    crop_size: int = 512  # side of both crops (paper: 512)
    crop_with_background: bool = True
    crop_without_background: bool = True
    background_fill: int = 255  # grey level of removed background (white as in the paper)
    crop_margin: float = 0.05  # crop square grows by this fraction of the entity box on each side
    batch_size: int = 8  # images per call
    prompts_per_forward: int = 16  # entity prompts per CLIPSeg forward pass


@dataclass
class ResourcesConfig:
    actors_per_model: int = 1  # most actors of each model's pool (autoscaling from 1)
    actor_cpus: float = 1.0
    actor_gpus: float = 1.0  # per model actor, only when the cluster has GPUs
    task_cpus: float = 1.0  # per read / decode / write task


@dataclass
class ConstructConfig:
    input: str = "openimages/images"
    output: str = "shards/compositional"
    write_sample_images: bool = False  # fill an empty `input` with the bundled photographs
    write_world_images: bool = False  # fill an empty `input` with the miniature world's scenes
    image_format: str = "JPEG"  # of the stored images and crops (PNG: exact colours)
    max_image_side: int = 1024  # images are downscaled to this long side before captioning
    jpeg_quality: int = 95
    rows_per_shard: int = 1000
    run_name: str | None = None  # MLflow run key; default derived from `output`
    models: ModelsConfig = field(default_factory=ModelsConfig)
    caption: CaptionConfig = field(default_factory=CaptionConfig)
    entities: EntityConfig = field(default_factory=EntityConfig)
    segment: SegmentConfig = field(default_factory=SegmentConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)


def _tiny() -> ConstructConfig:
    return ConstructConfig(
        input="samples/images", output="shards/compositional-tiny", write_sample_images=True,
        max_image_side=256, rows_per_shard=8,
        models=ModelsConfig("models/construct-tiny/captioner", "models/construct-tiny/entity-llm",
                            "models/construct-tiny/segmenter", build_tiny=True),
        # Random models: captions without repeated words, and a sampling "LLM" whose
        # answers share words with the caption, so images get entities and the whole
        # path (segmentation, crops, shards) runs.
        caption=CaptionConfig(max_new_tokens=12, no_repeat_ngram_size=1, batch_size=4),
        entities=EntityConfig(max_new_tokens=16, do_sample=True, batch_size=4),
        segment=SegmentConfig(crop_size=64, batch_size=4),
        resources=ResourcesConfig(actor_cpus=0.25, task_cpus=0.25),
    )


def _world() -> ConstructConfig:
    from kosmos_g.pipelines.construct_world import STAND_IN

    return ConstructConfig(
        input="world/images", output="world/compositional", write_world_images=True, image_format="PNG",
        max_image_side=64, rows_per_shard=2000, run_name="construct-world",
        models=ModelsConfig(STAND_IN, STAND_IN, STAND_IN),
        caption=CaptionConfig(batch_size=256), entities=EntityConfig(batch_size=256),
        segment=SegmentConfig(crop_size=64, batch_size=256),  # the world's own crop size, fill and margin
        resources=ResourcesConfig(actor_cpus=0.25, task_cpus=0.25),
    )


PRESETS = Presets(ConstructConfig)
PRESETS.register("tiny", _tiny)
PRESETS.register("world", _world)
PRESETS.register("paper", ConstructConfig)


def resolve(uri: str) -> str:
    """Absolute paths and URIs as they are; anything else under $KOSMOS_STORAGE_ROOT."""
    if "://" in uri or os.path.isabs(uri):
        return uri
    return storage.join(os.environ.get("KOSMOS_STORAGE_ROOT", ".kosmos/storage"), uri)


def resolved(cfg: ConstructConfig) -> ConstructConfig:
    from kosmos_g.pipelines.construct_world import STAND_IN

    def model(uri: str) -> str:
        return uri if uri == STAND_IN else resolve(uri)

    models = dataclasses.replace(cfg.models, captioner=model(cfg.models.captioner),
                                 entity_llm=model(cfg.models.entity_llm), segmenter=model(cfg.models.segmenter))
    return dataclasses.replace(cfg, input=resolve(cfg.input), output=resolve(cfg.output), models=models)


def prepare(cfg: ConstructConfig) -> None:
    """Demo inputs: sample photographs and tiny checkpoints, only where missing."""
    from kosmos_g.platform.data import samples

    if cfg.write_sample_images and not _image_uris(cfg.input):
        print(f"construct: writing the sample photographs to {cfg.input}", flush=True)
        samples.write_sample_images(cfg.input)
    if cfg.write_world_images and not _image_uris(cfg.input):
        from kosmos_g.platform.data import world

        print(f"construct: writing the miniature world's {world.TRAINING_SCENES} scenes to {cfg.input}", flush=True)
        world.write_world_images(cfg.input, world.scenes(0, world.TRAINING_SCENES, "train"))
    if cfg.models.build_tiny:
        from kosmos_g.pipelines.tiny_models import write_tiny_models

        targets = {name: getattr(cfg.models, name) for name in ("captioner", "entity_llm", "segmenter")}
        missing = {name: uri for name, uri in targets.items() if not storage.exists(storage.join(uri, "config.json"))}
        if missing:
            print(f"construct: writing tiny random checkpoints for {', '.join(missing)}", flush=True)
            write_tiny_models(missing)


def _image_uris(prefix: str) -> list[str]:
    base = prefix.rstrip("/") + "/" if storage.parse(prefix).scheme == "s3" else prefix
    return [u for u in storage.list_uris(base) if u.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS]


def build_dataset(cfg: ConstructConfig, counter: str):
    """The Ray Dataset of compositional rows (lazy; executed by the write)."""
    import ray
    from ray.data import ActorPoolStrategy

    from kosmos_g.pipelines import construct_models, construct_world

    def model_class(field: str, real):
        """The real model's UDF, or the world's stand-in for it (ModelsConfig value "world")."""
        return construct_world.STAND_INS[field] if getattr(cfg.models, field) == construct_world.STAND_IN else real

    Captioner = model_class("captioner", construct_models.Captioner)
    EntityExtractor = model_class("entity_llm", construct_models.EntityExtractor)
    Segmenter = model_class("segmenter", construct_models.Segmenter)
    res = cfg.resources
    gpus = res.actor_gpus if ray.cluster_resources().get("GPU", 0) > 0 else 0
    pool = {"compute": ActorPoolStrategy(min_size=1, max_size=max(1, res.actors_per_model)),
            "num_cpus": res.actor_cpus, "num_gpus": gpus or None, "batch_format": "pyarrow"}
    filesystem, root = storage.pyarrow_filesystem(cfg.input)
    ds = ray.data.read_binary_files(root, filesystem=filesystem, include_paths=True,
                                    file_extensions=IMAGE_EXTENSIONS, num_cpus=res.task_cpus)
    ds = ds.map_batches(construct_models.decode_inputs,
                        fn_args=(root.rstrip("/"), cfg.max_image_side, cfg.jpeg_quality, counter, cfg.image_format),
                        batch_format="pyarrow", num_cpus=res.task_cpus)
    ds = ds.map_batches(Captioner, batch_size=cfg.caption.batch_size, **pool, fn_constructor_kwargs={
        "model": cfg.models.captioner, "prompt": cfg.caption.prompt, "max_new_tokens": cfg.caption.max_new_tokens,
        "no_repeat_ngram_size": cfg.caption.no_repeat_ngram_size})
    ds = ds.map_batches(EntityExtractor, batch_size=cfg.entities.batch_size, **pool, fn_constructor_kwargs={
        "model": cfg.models.entity_llm, "prompt": cfg.entities.prompt, "max_new_tokens": cfg.entities.max_new_tokens,
        "no_repeat_ngram_size": cfg.entities.no_repeat_ngram_size, "max_entities": cfg.entities.max_entities,
        "do_sample": cfg.entities.do_sample, "seed": cfg.entities.seed, "counter": counter})
    seg = cfg.segment
    ds = ds.map_batches(Segmenter, batch_size=seg.batch_size, **pool, fn_constructor_kwargs={
        "model": cfg.models.segmenter, "threshold": seg.mask_threshold, "min_area": seg.min_entity_area,
        "crop_size": seg.crop_size, "with_background": seg.crop_with_background,
        "without_background": seg.crop_without_background, "fill": seg.background_fill, "margin": seg.crop_margin,
        "batch_size": seg.prompts_per_forward, "jpeg_quality": cfg.jpeg_quality, "counter": counter,
        "image_format": cfg.image_format})
    # Same input, same order, same shard files: what makes re-runs replace, not duplicate.
    ds.context.execution_options.preserve_order = True
    return ds


def summarize(manifest: shards.Manifest, skipped: dict[str, int], output: str, seconds: float) -> dict[str, float]:
    entities = shards.entity_count(output)
    counts = {reason: int(skipped.get(reason, 0)) for reason in sorted(set(SKIP_REASONS) | set(skipped))}
    metrics = {"images_in": manifest.count + sum(counts.values()), "rows_written": manifest.count,
               "entities_written": entities, "seconds": seconds}
    metrics.update({f"skipped_{reason}": n for reason, n in counts.items()})
    return metrics


def run_key(cfg: ConstructConfig) -> str:
    """Runs writing the same output share one MLflow run (a re-run continues it)."""
    return cfg.run_name or "construct-" + hashlib.blake2b(cfg.output.encode(), digest_size=6).hexdigest()


def run(cfg: ConstructConfig) -> dict[str, float]:
    """Run the construction for a resolved config; returns the metrics."""
    started = time.monotonic()
    cluster.connect()
    prepare(cfg)
    storage.ensure_bucket(cfg.output)
    counter = f"kosmos-g-construct-{uuid.uuid4().hex[:12]}"
    skips.ensure_counter(counter)
    run_id = None
    if os.environ.get("MLFLOW_TRACKING_URI"):
        run_id, _ = tracking.start_run("construct", run_key(cfg), cfg)
    try:
        manifest = shards.write_dataset(
            build_dataset(cfg, counter), cfg.output, "compositional", cfg.rows_per_shard,
            stats=lambda: {"skipped": skips.skip_counts(counter)}, producer="pipelines/construct.py",
            num_cpus=cfg.resources.task_cpus)
        metrics = summarize(manifest, manifest.stats.get("skipped", {}), cfg.output, time.monotonic() - started)
        if run_id:
            tracking.log_metrics(run_id, metrics, step=0)
            tracking.log_text(run_id, manifest.to_json(), "manifest.json")
            tracking.end_run(run_id)
    except BaseException:
        if run_id:
            tracking.end_run(run_id, status="FAILED")
        raise
    finally:
        skips.drop_counter(counter)
    return metrics


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    PRESETS.add_arguments(parser, default="tiny")
    args = parser.parse_args(argv)
    cfg = PRESETS.from_args(args)
    if args.print_config:
        print(to_yaml(cfg), end="")
        return 0
    cfg = resolved(cfg)
    metrics = run(cfg)
    skipped = " ".join(f"{k[len('skipped_'):]}={int(v)}" for k, v in metrics.items() if k.startswith("skipped_"))
    print(f"construct: {int(metrics['images_in'])} images -> {int(metrics['rows_written'])} compositional rows "
          f"({int(metrics['entities_written'])} entities) in {cfg.output} [{metrics['seconds']:.1f}s]", flush=True)
    print(f"construct: skipped {skipped}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
