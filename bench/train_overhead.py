"""Training-loop overhead: Ray Train + DeepSpeed workers against a plain
single-process PyTorch loop, on the same tiny model and the same data stream,
measured in one run.

    .venv/bin/python bench/train_overhead.py [--steps 40] [--stage 3] [--size tiny|larger] [--set k=v]
    .venv/bin/python bench/train_overhead.py --fair --size larger   # the trainer alone, like for like

`--fair` compares like with like: one Ray Train worker with the plain loop's intra-op threads
(all the machine's cores; Ray is started with that many more logical CPUs so the stream's tasks
still get scheduled), the plain loop pinned to the same thread count, and both reading the same
stream materialised in Ray's object store beforehand (one epoch covers the run), so neither
waits for preprocessing and the ratio is the trainer's own cost (Ray Train, DeepSpeed, metrics,
checkpoints) per step. This machine's speed drifts by tens of percent from minute to minute, so
`--fair` alternates the two `--rounds` times (plain, Ray Train, plain, Ray Train, ..., plain) and
takes each Ray Train run against the mean of the plain runs either side of it.

Prints steps/s of each (steady state, after the first logged window; evaluation and checkpoint
time is left out of the Ray Train rates, as the plain loop does neither), their
ratio, the wall-clock time including start-up, and the fraction of step time
the Ray Train workers spent waiting for data. Runs self-contained: MLflow goes
to a temporary sqlite store and data/checkpoints to a temporary directory unless
the environment points elsewhere (e.g. `eval "$(kosmos-g local env)"`).
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time
import uuid


def prepare_environment(workdir: str) -> None:
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{workdir}/mlflow.db")
    os.environ.setdefault("KOSMOS_STORAGE_ROOT", f"{workdir}/storage")


# A size where one step takes over 0.5 s on a 2-core CPU (0.7-1.3 s measured at batch 24), so
# per-step overheads are a small share of the step (the tiny model's steps take 0.1-0.15 s).
LARGER = ["model.mllm.dim=256", "model.mllm.num_layers=4", "model.mllm.num_heads=8", "model.mllm.ffn_dim=1024",
          "model.mllm.resampler_heads=8", "train.batch_size=24"]


def stage_config(stage: int, steps: int, workers: int, overrides: list[str] | None = None):
    from kosmos_g.platform.data.samples import write_sample_shards
    from kosmos_g.platform.train.config import stage_presets

    prefixes = write_sample_shards(os.environ["KOSMOS_STORAGE_ROOT"].rstrip("/") + "/bench-samples")
    cfg = stage_presets(stage).get("tiny", [
        f"train.steps={steps}", f"train.num_workers={workers}", "train.log_every=10",
        f"train.checkpoint_every={steps}", "init=random", "register=false", "sample_grid=false",
        f"name=bench-{uuid.uuid4().hex[:6]}", *(overrides or []),
    ])
    cfg.data.captions, cfg.data.compositional, cfg.data.editing = (
        prefixes["captions"], prefixes["compositional"], prefixes["editing"])
    return cfg


def plain_loop(cfg, dataset=None, threads: int | None = None) -> dict[str, float]:
    """One process, torch.optim.AdamW, batches from the same Ray Data stream (or `dataset`)."""
    import torch

    if threads:
        torch.set_num_threads(threads)

    from kosmos_g.models.kosmos_g import KosmosG
    from kosmos_g.platform.data.datastream import collate_fn, training_dataset
    from kosmos_g.platform.train.loop import lr_lambda
    from kosmos_g.platform.train.task import MODEL_KEYS

    torch.manual_seed(cfg.train.seed)
    model = KosmosG.from_config(cfg.model)
    model.set_stage(cfg.stage)
    model.train()
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                                  eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay, fused=True)  # as the jobs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.optim, cfg.train.steps))
    dataset = dataset if dataset is not None else training_dataset(cfg.stage, cfg.data, cfg.model)

    def endless():
        # The stream's epoch is finite (samples_per_epoch); pass over it as often as the run
        # needs, as the Ray Train workers do.
        while True:
            yield from dataset.iter_torch_batches(batch_size=cfg.train.batch_size * cfg.train.num_workers,
                                                  collate_fn=collate_fn(cfg.stage, cfg.model), drop_last=True)

    batches = endless()
    started = time.perf_counter()
    steady_from, waited = None, 0.0
    for step in range(cfg.train.steps):
        fetch = time.perf_counter()
        batch = next(batches)
        waited += time.perf_counter() - fetch
        outputs = model({k: batch[k] for k in MODEL_KEYS}, captions=batch.get("captions"),
                        target_pixels=batch.get("target_pixels"), cond_dropout=cfg.train.cond_dropout)
        outputs["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.trainable_parameters(), cfg.optim.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if step + 1 == cfg.train.log_every:
            steady_from = (time.perf_counter(), step + 1)
    ended = time.perf_counter()
    steady_steps = cfg.train.steps - steady_from[1]
    return {"steps_per_s": steady_steps / (ended - steady_from[0]), "wall_s": ended - started,
            "data_wait_fraction": waited / (ended - started)}


def ray_train_loop(cfg, dataset=None) -> dict[str, float]:
    """The stage job (`run_stage`); with `dataset`, its trainer (`run_trainer`) on that dataset."""
    from kosmos_g.platform import tracking
    from kosmos_g.platform.data.datastream import collate_fn
    from kosmos_g.platform.train.job import run_stage, run_trainer
    from kosmos_g.platform.train.task import StageTask

    started = time.perf_counter()
    if dataset is None:
        run_id = run_stage(cfg).run_id
    else:
        run_id, _ = tracking.start_run(cfg.pipeline, cfg.name, cfg)
        result = run_trainer(cfg, StageTask(cfg.stage), dataset, collate_fn(cfg.stage, cfg.model), None, run_id)
        tracking.end_run(run_id, "FAILED" if result.error else "FINISHED")
        if result.error:
            raise result.error
    wall = time.perf_counter() - started
    history = tracking.client().get_metric_history(run_id, "samples_per_s")
    waits = tracking.client().get_metric_history(run_id, "data_wait_fraction")
    # Steady state as the plain loop measures it: the steps after the first logged window over
    # the time they took (each window's time is its samples over its rate).
    samples_per_step = cfg.train.batch_size * cfg.train.num_workers
    steady = [m for m in history if m.step > cfg.train.log_every]
    steady_steps = cfg.train.log_every * len(steady)  # --steps is a multiple of log_every
    steady_seconds = sum(cfg.train.log_every * samples_per_step / m.value for m in steady)
    return {"steps_per_s": steady_steps / steady_seconds, "wall_s": wall,
            "data_wait_fraction": sum(m.value for m in waits) / len(waits)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", type=int, default=3, choices=[1, 2, 3])
    parser.add_argument("--steps", type=int, default=40, help="a multiple of 10 (the log window)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--size", choices=["tiny", "larger"], default="tiny",
                        help="'larger': a wider MLLM so that one step takes >= 0.5 s on 2 cores")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="extra stage-config overrides (repeatable)")
    parser.add_argument("--fair", action="store_true",
                        help="one worker with the plain loop's threads, both on the same materialised stream")
    parser.add_argument("--rounds", type=int, default=3, help="--fair: Ray Train runs, each between two plain runs")
    args = parser.parse_args(argv)
    if args.steps % 10 or args.steps < 20:
        parser.error("--steps must be a multiple of 10, at least 20 (the first window is warm-up)")
    overrides = (LARGER if args.size == "larger" else []) + args.overrides
    threads = os.cpu_count() or 1
    if args.fair:
        args.workers = 1
        overrides = [f"train.cpus_per_worker={threads}"] + overrides
    with tempfile.TemporaryDirectory(prefix="kosmos-bench-") as workdir:
        prepare_environment(workdir)
        from kosmos_g.platform.stack import cluster

        # --fair: the worker reserves every core; the stream's tasks need logical CPUs beside it.
        cluster.connect(num_cpus=2 * threads if args.fair else None)
        cfg = stage_config(args.stage, args.steps, args.workers, overrides)
        if not args.fair:
            rows = [(plain_loop(cfg), ray_train_loop(cfg))]
        else:
            rows = fair_rounds(cfg, args.rounds, threads)
    global_batch = cfg.train.batch_size * cfg.train.num_workers
    print(f"stage {args.stage}, {args.size} model, {args.steps} steps, global batch {global_batch}, "
          f"{args.workers} Ray Train workers × {cfg.train.cpus_per_worker} CPU, {os.cpu_count()} cores"
          + (f"; fair: 1 process × {threads} threads each side, stream materialised first" if args.fair else ""))
    print("| run | plain steps/s | Ray Train steps/s | ratio | Ray data wait | Ray wall incl. start-up |")
    print("|---|---|---|---|---|---|")
    ratios = []
    for number, (plain, ray_train) in enumerate(rows, start=1):
        ratios.append(ray_train["steps_per_s"] / plain["steps_per_s"])
        print(f"| {number} | {plain['steps_per_s']:.2f} | {ray_train['steps_per_s']:.2f} | {ratios[-1]:.2f} | "
              f"{ray_train['data_wait_fraction']:.0%} | {ray_train['wall_s']:.0f} s |")
    ratios.sort()
    print(f"ratio Ray Train / plain steps/s: median {ratios[len(ratios) // 2]:.2f} "
          f"(min {ratios[0]:.2f}, max {ratios[-1]:.2f}, {len(ratios)} run(s))")
    return 0


def fair_rounds(cfg, rounds: int, threads: int) -> list[tuple[dict, dict]]:
    """plain, Ray Train, plain, ...: each Ray Train run against the mean of its neighbours."""
    from kosmos_g.platform.data.datastream import training_dataset

    # One epoch covers the run, so neither side restarts its iterator mid-run.
    cfg.data.samples_per_epoch = cfg.train.steps * cfg.train.batch_size
    dataset = training_dataset(cfg.stage, cfg.data, cfg.model).materialize()
    plains = [plain_loop(cfg, dataset, threads)]
    rows = []
    for _ in range(rounds):
        # A fresh run name each round: the same name would resume from the last round's checkpoint.
        round_cfg = copy.deepcopy(cfg)
        round_cfg.name = f"bench-{uuid.uuid4().hex[:6]}"
        ray_train = ray_train_loop(round_cfg, dataset)
        plains.append(plain_loop(cfg, dataset, threads))
        before, after = plains[-2], plains[-1]
        print(f"round {len(rows) + 1}: plain {before['steps_per_s']:.2f}, Ray Train {ray_train['steps_per_s']:.2f}, "
              f"plain {after['steps_per_s']:.2f} steps/s")
        rows.append(({name: (before[name] + after[name]) / 2 for name in before}, ray_train))
    return rows


if __name__ == "__main__":
    raise SystemExit(main())
