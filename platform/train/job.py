"""The driver side of a training stage: resolve where to start, open (or
continue) the MLflow run, build the Ray Data stream, run Ray Train's
TorchTrainer, then log and register the result.

`pipelines/pretrain.py`, `align.py` and `instruct.py` are thin: a preset and a
call to `run_stage`.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from kosmos_g.platform.stack import cluster
from kosmos_g.platform import storage, tracking
from kosmos_g.platform.config import ConfigError, fingerprint, to_dict, to_yaml
from kosmos_g.platform.train.config import REGISTERED_NAMES, check_real_inputs, StageConfig, stage_presets
from kosmos_g.platform.mlflow_model import save_pyfunc
from kosmos_g.platform.train.loop import BUNDLE_DIR, train_loop_per_worker
from kosmos_g.platform.train.resume import StageStream
from kosmos_g.platform.train.task import StageTask


@dataclass
class StageResult:
    run_id: str
    checkpoint_path: str
    registered: str | None  # "name/version"
    metrics: dict


def resolve_init(cfg: StageConfig) -> str | None:
    """A concrete model URI to start from (`…/latest` pinned to a version), or None for a random start."""
    if cfg.init == "random":
        return None
    if cfg.init != "auto":
        return tracking.pin_model_uri(cfg.init)
    if cfg.stage == 1:
        return None
    try:  # the previous stage's newest version, pinned (one registry query)
        return tracking.pin_model_uri(f"models:/{REGISTERED_NAMES[cfg.stage - 1]}/latest")
    except ValueError:
        print(f"[{cfg.pipeline}] no registered {REGISTERED_NAMES[cfg.stage - 1]} model: starting from random "
              "weights (pass --set init=URI to start from a checkpoint)", flush=True)
        return None


# What does not decide a stage's weights: names, locations, switches, reserved CPUs, the evaluation.
NOT_DECIDING = ("name", "storage_path", "register", "force", "sample_grid", "allow_random", "eval",
                "train.cpus_per_worker", "train.torch_threads", "train.placement_strategy", "data.num_cpus")


def registered_result(cfg: StageConfig, config_hash: str) -> StageResult | None:
    """The registered version trained with this exact config and start, unless `force`."""
    if cfg.force or not cfg.register:
        return None
    version = tracking.version_tagged(cfg.registered_name, "config_hash", config_hash)
    if version is None:
        return None
    run_id = tracking.client().get_model_version(cfg.registered_name, version).run_id
    print(f"[{cfg.pipeline}] {cfg.registered_name}/{version} was trained with this config from the same start: "
          "reused (--set force=true trains again)", flush=True)
    return StageResult(run_id, "", f"{cfg.registered_name}/{version}", {})


# What a resubmitted job may change and still resume its checkpoints: more steps, other cadences.
RESUMABLE = ("train.steps", "train.log_every", "train.checkpoint_every", "train.fail_at_step")


class NameTaken(ConfigError):
    """The job name's run was trained from another start or config."""


def follows_latest(cfg: StageConfig) -> bool:
    """Whether the job picks any of its inputs itself, as the newest registered version: its start
    (`init=auto`) or a backbone given as `models:/…/latest`. Call before `pin_backbones`."""
    backbones = (cfg.model.mllm.vision.pretrained_path, cfg.model.image_decoder.pretrained_path)
    return (cfg.stage > 1 and cfg.init == "auto") or any(path.endswith("/latest") for path in backbones if path)


def own_run_name(cfg: StageConfig, init_uri: str | None, resume_hash: str, config_hash: str,
                 picked_latest: bool) -> str:
    """The job name whose run this job trains. A run under the configured name that was trained on
    other inputs is refused, unless this job picked its inputs from `latest` itself: a newer
    registered stage or backbone then gets a run of its own, `<name>-<resume hash>`, as the
    user of a chain (`kosmos-g train all`, the README's main job) expects, instead of an error.
    `picked_latest`: `follows_latest(cfg)` before the backbones were pinned."""
    try:
        check_resumable(cfg, init_uri, resume_hash, config_hash)
        return cfg.name
    except NameTaken:
        if not picked_latest:
            raise
    own = copy.copy(cfg)
    own.name = f"{cfg.name}-{resume_hash[:8]}"
    check_resumable(own, init_uri, resume_hash, config_hash)
    print(f"[{cfg.pipeline}] job name {cfg.name!r} holds a run trained on other inputs; this one (on the newest "
          f"registered ones) runs as {own.name!r}", flush=True)
    return own.name


def check_resumable(cfg, init_uri: str | None, resume_hash: str, config_hash: str) -> None:
    """Re-submitting a job name resumes its checkpoints (that is how a run gets more steps); a
    start or a config that changed since (a retrained previous stage, another data option) would
    be silently ignored, so refuse. `cfg`: a StageConfig or a BackboneConfig (its pipeline and name)."""
    experiment = tracking.client().get_experiment_by_name(tracking.experiment_name(cfg.pipeline))
    run_id = tracking.find_run(experiment.experiment_id, cfg.name) if experiment else None
    tags = tracking.client().get_run(run_id).data.tags if run_id else {}
    started, trained = tags.get("init_uri"), tags.get("resume_hash")
    if started is not None and started != (init_uri or "random"):
        raise NameTaken(f"job name {cfg.name!r} holds a run that started from {started}; this one starts from "
                          f"{init_uri or 'random'}, but would resume that run's checkpoints. Pass --set name=<new> "
                          "for a fresh run.")
    if trained is not None:
        changed = trained != resume_hash
    else:  # a run from before resume_hash tags: only its exact config is known to be safe
        changed = tags.get("config_hash") not in (None, config_hash)
    if changed:
        raise NameTaken(f"job name {cfg.name!r} holds a run trained with another config (more than "
                          f"{', '.join(RESUMABLE)} differ), but this one would resume its checkpoints. "
                          "Pass --set name=<new> for a fresh run (`--print-config` shows the config).")


def model_config_for(cfg: StageConfig, init_uri: str | None):
    """The architecture the workers will build: the bundle's when starting from one, on the frozen
    decoder the stage's config names (`weights.decoder_override`)."""
    if init_uri is None:
        return cfg.model
    from kosmos_g.models.checkpoint import load_config
    from kosmos_g.platform.weights import decoder_override, local_dir

    bundle = local_dir(init_uri)
    override = decoder_override(bundle, cfg.model.image_decoder.pretrained_path)
    if override:
        print(f"[{cfg.pipeline}] frozen image decoder {override['image_decoder.pretrained_path']} (the stage's "
              f"config), not the one {init_uri} was trained on", flush=True)
    return load_config(bundle, override or None)


def decoder_identity(model_cfg, init_uri: str | None) -> str:
    """Where the frozen image decoder's weights come from, as a name that stays the same across
    machines: its pretrained path (a URI in a bundle a job saved), the bundle it travels in (random
    tiny decoders), or random. `model_cfg`: from `model_config_for` (the same cached bundle copy)."""
    from kosmos_g.platform.weights import local_dir

    path = model_cfg.image_decoder.pretrained_path
    if init_uri is not None and (path is None or Path(path).is_relative_to(local_dir(init_uri))):
        return f"{init_uri}#image_decoder"
    return path or "random"


def precomputed_siblings(cfg: StageConfig, model_cfg, init_uri: str | None) -> dict[str, str]:
    """{source: prefix} of the stage's precomputed teacher outputs / latents
    (pipelines/precompute.py) when every source has a current set; {} otherwise."""
    from kosmos_g.platform.data import precomputed
    from kosmos_g.platform.data.datastream import stage_sources

    if cfg.stage not in precomputed.KINDS or cfg.data.precomputed == "off":
        return {}
    key = precomputed.precompute_key(cfg.stage, model_cfg, decoder_identity(model_cfg, init_uri), cfg.data)
    sources = [(name, prefix) for name, prefix, _ in stage_sources(cfg.stage, cfg.data)]
    found = precomputed.find(sources, key)
    what = precomputed.KINDS[cfg.stage]
    print(f"[{cfg.pipeline}] precomputed {what} ({key}): "
          + ("read for " + ", ".join(found) if found else "not beside every source: computed in the step "
             "(pipelines/precompute.py makes them)"), flush=True)
    return found


def ensure_sample_data(cfg: StageConfig) -> None:
    """The tiny presets read the bundled sample set; write it on first use so a
    fresh stack can run `pipelines/instruct.py --preset tiny` straight away."""
    from kosmos_g.platform.data import shards
    from kosmos_g.platform.data.samples import write_sample_shards
    from kosmos_g.platform.train.config import sample_data_root

    root = sample_data_root()
    wanted = [getattr(cfg.data, source) for source in shards.SOURCES]
    if any(prefix and prefix.startswith(root) and not storage.exists(storage.join(prefix, shards.MANIFEST))
           for prefix in wanted):
        print(f"[{cfg.pipeline}] writing the bundled sample shards to {root}", flush=True)
        write_sample_shards(root)


def _storage(cfg):
    """(storage_path, filesystem) for RunConfig; pyarrow needs the S3 endpoint passed explicitly."""
    path = cfg.resolved_storage_path()
    if storage.parse(path).scheme == "s3":
        filesystem, stripped = storage.pyarrow_filesystem(path)
        return stripped, filesystem
    Path(path).mkdir(parents=True, exist_ok=True)
    return path, None


def _use_gpu(cfg) -> bool:
    import ray

    if cfg.train.use_gpu is not None:
        return cfg.train.use_gpu
    return ray.cluster_resources().get("GPU", 0) > 0


# Ray Data runs some of a stream's tasks on one whole CPU, whatever the job asks for: the parquet
# reader's file listing (its ListFiles operator takes no resource arguments) and the repartition
# of a long stream's window items. With under one CPU left beside the Train workers and the
# stream's first preprocessing actor, such a task never starts and the workers wait for their
# first batch for ever (two `mini` stage-3 workers of 0.5 CPU on the 2-core local stack did).
STREAM_TASK_CPUS = 1.0


def check_cpu_room(cfg) -> None:
    """A clear error, before any run starts, where the cluster's CPUs cannot hold the Train
    workers' reservation, one preprocessing actor and a whole-CPU stream task at once; a warning
    where they could but others hold them now (a Serve application on the local stack does)."""
    import ray

    total = ray.cluster_resources().get("CPU", 0.0)
    needed = cfg.train.num_workers * cfg.train.cpus_per_worker + cfg.data.num_cpus
    left = total - needed
    if left < STREAM_TASK_CPUS:
        raise ConfigError(
            f"the cluster has {total:g} CPUs; {cfg.train.num_workers} Train worker(s) x train.cpus_per_worker="
            f"{cfg.train.cpus_per_worker:g} and a preprocessing actor (data.num_cpus={cfg.data.num_cpus:g}) leave "
            f"{left:g}, and Ray Data's file listing needs {STREAM_TASK_CPUS:g} whole CPU beside them (without it "
            "the job would wait for its first batch for ever): lower train.cpus_per_worker or train.num_workers, "
            "or add CPUs (`kosmos-g local up --worker-nodes N`)")
    free = ray.available_resources().get("CPU", 0.0)
    if free - needed < STREAM_TASK_CPUS:
        print(f"warning: {free:g} of the cluster's {total:g} CPUs are free now and this job needs "
              f"{needed + STREAM_TASK_CPUS:g} at once; it waits until others free them (on the local stack, "
              "a running service holds some: `kosmos-g serve --stop`)", file=sys.stderr, flush=True)


def pin_backbones(cfg: StageConfig) -> None:
    """Registered backbones (`models:/…/latest`, the mini presets) pinned to their newest
    version before any worker starts, so all of them load the same weights."""
    for section in (cfg.model.mllm.vision, cfg.model.image_decoder):
        if section.pretrained_path:
            try:
                section.pretrained_path = tracking.pin_model_uri(section.pretrained_path)
            except ValueError as error:
                raise ConfigError(f"{error}: train the miniature world's backbones first "
                                  "(pipelines/mini_clip.py, pipelines/mini_decoder.py)") from None


def ensure_world_data(cfg: StageConfig) -> None:
    """The miniature world's caption shards and images are written on first use; its compositional
    shards are the construction pipeline's output, so their absence is an error naming the job."""
    from kosmos_g.platform.data import shards
    from kosmos_g.platform.data.datastream import STAGE_SOURCES
    from kosmos_g.platform.data.world import ensure_world_shards
    from kosmos_g.platform.train.config import world_root

    root = world_root()
    used = {source: getattr(cfg.data, source) or "" for source in STAGE_SOURCES[cfg.stage]}
    if not any(prefix.startswith(root) for prefix in used.values()):
        return
    ensure_world_shards(root)
    compositional = used.get("compositional", "")
    if compositional.startswith(root) and not storage.exists(storage.join(compositional, shards.MANIFEST)):
        raise ConfigError(f"{compositional} holds no compositional shards yet: make them with "
                          "`ray job submit -- python pipelines/construct.py --preset world`")


def fit(cfg: StageConfig, init_uri: str | None, run_id: str):
    from kosmos_g.platform.data.datastream import collate_fn

    ensure_sample_data(cfg)
    model_cfg = model_config_for(cfg, init_uri)
    # One skip counter per job, so concurrent jobs do not mix their counts.
    cfg.data.skip_counter = f"skips-{cfg.name}"
    # Built by Ray Train at every start of the workers, from the last registered checkpoint on.
    siblings = precomputed_siblings(cfg, model_cfg, init_uri)
    tracking.set_tags(run_id, {"precomputed": ",".join(siblings) or "none"})
    dataset = StageStream(cfg, model_cfg, run_id, siblings)
    return run_trainer(cfg, StageTask(cfg.stage), dataset, collate_fn(cfg.stage, model_cfg), init_uri, run_id)


def run_trainer(cfg, task, dataset, collate, init_uri: str | None, run_id: str | None):
    """Ray Train's TorchTrainer running the shared loop for `task` over `dataset` (a Ray Dataset,
    or a callable Ray Train calls for one at every start of the workers). `cfg` needs
    `name`, `train`, `optim` and `resolved_storage_path()` (StageConfig, BackboneConfig)."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    storage_path, filesystem = _storage(cfg)
    fault_marker = storage.join(cfg.resolved_storage_path(), cfg.name, ".fault-injected")
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": to_dict(cfg), "task": task, "init_uri": init_uri, "run_id": run_id,
                           "fault_marker": fault_marker, "collate": collate},
        scaling_config=ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=_use_gpu(cfg),
                                     resources_per_worker={"CPU": cfg.train.cpus_per_worker},
                                     placement_strategy=cfg.train.placement_strategy),
        run_config=RunConfig(
            name=cfg.name, storage_path=storage_path, storage_filesystem=filesystem,
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
        datasets={"train": dataset},
        # One worker reads the stream itself: a split would route every block through a
        # coordinator actor for nothing to share.
        dataset_config=DataConfig(datasets_to_split=[] if cfg.train.num_workers == 1 else "all"),
    )
    return trainer.fit()


def publish(cfg: StageConfig, run_id: str, checkpoint, evaluator=None) -> str | None:
    """Log the final bundle (safetensors + config) to the run, evaluate it when `eval.prompts`
    is set (so the scores reach the version's card), and register it."""
    with checkpoint.as_directory() as directory:
        bundle = Path(directory) / BUNDLE_DIR
        if not bundle.is_dir():
            raise RuntimeError(f"final checkpoint {checkpoint.path} has no {BUNDLE_DIR}/")
        with tempfile.TemporaryDirectory(prefix="kosmos-mlflow-model-") as staging:
            # A real MLflow model (pyfunc flavour, signature, input example) around the bundle.
            tracking.log_dir(run_id, save_pyfunc(bundle, Path(staging) / "model"), "model")
        if cfg.stage == 3 and cfg.sample_grid:
            log_sample_grid(run_id, bundle)
        if cfg.eval.prompts:
            evaluator(cfg, run_id, bundle)
    if not cfg.register:
        return None
    tags, description = version_card(cfg, run_id)
    version = tracking.register_model(run_id, "model", cfg.registered_name, tags=tags, description=description)
    if cfg.stage == 3 and cfg.sample_grid:
        # The grid on the version itself: the registry page alone shows what the model draws.
        tracking.client().set_model_version_tag(cfg.registered_name, version, "sample_grid",
                                                f"runs:/{run_id}/samples/grid.png")
    return f"{cfg.registered_name}/{version}"


# Final values shown on a registered version: losses, then the end-of-stage evaluation's scores.
CARD_METRICS = ("eval_loss", "loss", "mse", "rec", "eval_dino", "eval_clip_i", "eval_clip_t")


def version_card(cfg: StageConfig, run_id: str) -> tuple[dict[str, str], str]:
    """Tags and description telling, in the registry alone, what trained a version."""
    from kosmos_g.platform.data.datastream import STAGE_SOURCES

    run = tracking.client().get_run(run_id)
    metrics = run.data.metrics
    data = {f"data.{source}": getattr(cfg.data, source) or "" for source in STAGE_SOURCES[cfg.stage]}
    final = {f"final.{key}": f"{metrics[key]:.4g}" for key in CARD_METRICS if key in metrics}
    tags = {"stage": str(cfg.stage), "job": cfg.name, "preset": cfg.model.name, "steps": str(cfg.train.steps),
            "init": run.data.tags.get("init_uri", cfg.init), "config_hash": run.data.tags.get("config_hash", ""),
            "git_commit": tracking.git_commit(), **data, **final}
    sources = ", ".join(f"{key[5:]} from {value}" for key, value in data.items() if value)
    description = (f"Kosmos-G stage {cfg.stage} ({cfg.pipeline}), preset {cfg.model.name}: {cfg.train.steps} steps "
                   f"on {sources}; " + (", ".join(f"{k[6:]} {v}" for k, v in final.items()) or "no metrics")
                   + f". Run {run_id}, commit {tags['git_commit']}.")
    return tags, description


def log_skip_counts(cfg: StageConfig, run_id: str) -> None:
    """Records the stream skipped (corrupt image, missing field, …), as metrics."""
    from kosmos_g.platform.data.datastream import skip_counts

    counts = skip_counts(cfg.data)
    tracking.log_metrics(
        run_id, {"data_skipped_total": sum(counts.values()), **{f"data_skipped_{k}": v for k, v in counts.items()}},
        cfg.train.steps)
    if counts:
        print(f"[{cfg.pipeline}] data records skipped: {counts}", flush=True)


def log_sample_grid(run_id: str, bundle: Path) -> None:
    from kosmos_g.platform.train.sample_grid import sample_grid

    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "grid.png"
        sample_grid(bundle).save(path)
        tracking.client().log_artifact(run_id, str(path), "samples")


def run_stage(cfg: StageConfig, evaluator=None) -> StageResult:
    """Train, publish, register. `evaluator` (pipelines/stage_eval.EndOfStageEval) runs the
    end-of-stage evaluation that `eval.prompts` asks for."""
    cfg.validate()
    check_real_inputs(cfg)
    if cfg.eval.prompts:
        if evaluator is None:
            raise ConfigError("eval.prompts is set, but this entry point has no evaluator: run the stage with "
                              "pipelines/align.py or pipelines/instruct.py")
        evaluator.check(cfg)
    cluster.connect()
    picks_latest = follows_latest(cfg)
    pin_backbones(cfg)
    ensure_world_data(cfg)
    init_uri = resolve_init(cfg)
    config_hash = fingerprint(cfg, NOT_DECIDING, init_uri=init_uri)
    reused = registered_result(cfg, config_hash)
    if reused:
        return reused
    check_cpu_room(cfg)
    resume_hash = fingerprint(cfg, NOT_DECIDING + RESUMABLE, init_uri=init_uri)
    cfg.name = own_run_name(cfg, init_uri, resume_hash, config_hash, picks_latest)
    run_id, resumed = tracking.start_run(cfg.pipeline, cfg.name, cfg, tags={"stage": str(cfg.stage)})
    tags = {"config_hash": config_hash, "resume_hash": resume_hash, "init_uri": init_uri or "random"}
    tracking.set_tags(run_id, tags)  # a resumed run (more steps) trains this config now
    print(f"[{cfg.pipeline}] MLflow run {run_id} ({'continued' if resumed else 'new'}); "
          f"init: {init_uri or 'random'}; checkpoints: {cfg.resolved_storage_path()}/{cfg.name}", flush=True)
    started = time.monotonic()
    try:
        result = fit(cfg, init_uri, run_id)
        if result.error:
            raise result.error
        trained = time.monotonic()
        log_skip_counts(cfg, run_id)
        registered = publish(cfg, run_id, result.checkpoint, evaluator)
        print(f"[{cfg.pipeline}] trained in {trained - started:.0f}s, published in {time.monotonic() - trained:.0f}s",
              flush=True)
    except BaseException:
        tracking.end_run(run_id, "FAILED")
        raise
    tracking.log_metrics(run_id, {"wall_clock_s": time.monotonic() - started}, cfg.train.steps)
    tracking.end_run(run_id)
    print(f"[{cfg.pipeline}] done: registered {registered}; run {run_id}", flush=True)
    return StageResult(run_id, checkpoint_uri(cfg, result.checkpoint), registered, dict(result.metrics or {}))


def checkpoint_uri(cfg: StageConfig, checkpoint) -> str:
    """Ray reports paths relative to the filesystem it was given; make it a URI again."""
    if storage.parse(cfg.resolved_storage_path()).scheme == "s3":
        return f"s3://{checkpoint.path.lstrip('/')}"
    return checkpoint.path


def main(stage: int, argv: list[str] | None = None, evaluator=None) -> int:
    """Command line shared by the three stage scripts."""
    presets = stage_presets(stage)
    parser = argparse.ArgumentParser(description=f"Kosmos-G training stage {stage} on Ray Train + DeepSpeed")
    presets.add_arguments(parser)
    args = parser.parse_args(argv)
    cfg = presets.from_args(args)
    if args.print_config:
        print(to_yaml(cfg))
        return 0
    try:
        result = run_stage(cfg, evaluator)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    print(json.dumps({"run_id": result.run_id, "registered": result.registered,
                      "checkpoint": result.checkpoint_path}), flush=True)
    return 0
