"""The per-worker training loop: Ray Train runs `train_loop_per_worker` on every
worker; each builds the model, wraps it in a DeepSpeed engine and steps through
its shard of the Ray Data stream.

The loop reads as torchtitan's: `next_batch → forward_backward → optimizer_step`,
with checkpoints (DeepSpeed engine state from every rank, reported to Ray Train)
every `checkpoint_every` steps and metrics on rank 0. What is trained (a Kosmos-G stage or a
mini backbone) is the `Task` in the loop config (task.py); `cfg` needs `train` and `optim`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import torch

from kosmos_g.platform import storage, tracking
from kosmos_g.platform.config import from_dict
from kosmos_g.platform.train.task import Task

STATE_FILE = "trainer_state.json"
BUNDLE_DIR = "bundle"  # the finished model's files, added by rank 0 to the final checkpoint
# Rank 0's fixed `eval_loss` batch, saved with every checkpoint: a resumed run's stream starts
# elsewhere, and its first batch would put the curve on another batch's loss from then on.
EVAL_BATCH_FILE = "eval_batch.pt"


def say(message: str) -> None:
    """One line in the job log. Ray Train V2 replaces `print` in its workers with a logger call
    and also tees to the original print when stdout is wrapped, which showed every progress
    line twice; writing to the process's own stdout shows it once."""
    stream = sys.__stdout__ or sys.stdout
    stream.write(message + "\n")
    stream.flush()


def lr_lambda(optim_cfg, total_steps: int):
    """Linear warm-up to the peak, then linear decay to 0 (appendix A), or the peak to the end
    (`schedule="constant"`)."""
    warmup = max(1, optim_cfg.warmup_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if optim_cfg.schedule == "constant":
            return 1.0
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return factor


def deepspeed_config(cfg, on_gpu: bool, world_size: int = 1) -> dict[str, Any]:
    bf16 = cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and on_gpu)
    return {
        "train_micro_batch_size_per_gpu": cfg.train.batch_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": cfg.optim.grad_clip,
        # ZeRO partitions optimizer states and gradients across ranks; one rank has nothing to
        # share, yet ZeRO-2 still copies every gradient into its flat buckets each step
        # (+37% step time for the `larger` bench model on CPU), so one worker runs without it.
        "zero_optimization": {"stage": cfg.train.zero_stage if world_size > 1 else 0},
        "bf16": {"enabled": bf16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def make_engine(model, cfg, on_gpu: bool, world_size: int = 1):
    """DeepSpeed engine over the model; only the stage's trainable parameters
    reach the optimiser, so frozen modules stay out of ZeRO's partitions."""
    import deepspeed

    if not on_gpu and not cfg.train.cpu_shm_comm:
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    params = model.trainable_parameters()
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]  # norms and biases
    # The fused kernel updates every tensor in one pass: 0.015 s a step against 0.075 s for the 220
    # tensors (12.9M parameters) of the mini stage 3 on two CPU cores; the same update otherwise.
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps, fused=True,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.optim, cfg.train.steps))
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(cfg, on_gpu, world_size),
        dist_init_required=False,
    )
    if world_size == 1:
        # Nothing to average across one rank, but the engine would still flatten, all-reduce and
        # copy back every gradient after each backward (+35 ms a step on the bench's model).
        engine.enable_backward_allreduce = False
    return engine


# --------------------------------------------------------------- one step


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def forward_backward(engine, batch: dict[str, Any], cfg, task: Task) -> dict[str, float]:
    outputs = task.losses(engine, batch, cfg)
    engine.backward(outputs["loss"])
    return {name: float(value.detach()) for name, value in outputs.items()}


@torch.no_grad()
def eval_loss(model, batch: dict[str, Any], cfg, task: Task, repeats: int = 4) -> float:
    """The loss on one fixed batch with fixed noise and timesteps: a
    training-progress signal free of the sampling noise of the step loss."""
    was_training = model.training
    model.eval()
    device = next(v.device for v in batch.values() if isinstance(v, torch.Tensor))
    generator = torch.Generator(device=device).manual_seed(cfg.train.seed)
    total = 0.0
    for _ in range(repeats):
        outputs = task.losses(model, batch, cfg, generator=generator, training=False)
        total += float(outputs["loss"])
    model.train(was_training)
    return total / repeats


def optimizer_step(engine) -> None:
    engine.step()  # clips, steps the optimiser and the LR schedule, zeroes grads


def batches(shard, cfg, collate, rank: int = 0) -> Iterator[dict[str, Any]]:
    """Endless batches: the shard is re-iterated pass after pass. A stage's stream is sized to hold
    the whole job (train/resume.py), so a second pass there means its records come again; the
    log says when one begins."""
    passes = 0
    while True:
        if passes and rank == 0:
            say(f"[{cfg.pipeline}] the data stream ended: pass {passes + 1} over it begins")
        passes += 1
        empty = True
        for batch in shard.iter_torch_batches(batch_size=cfg.train.batch_size, collate_fn=collate,
                                              drop_last=True):
            empty = False
            yield batch
        if empty:
            raise RuntimeError("the training stream produced no full batch: too little data for batch_size")


class FirstBatchEarly:
    """`stream`, its first batch fetched by a background thread from construction on: the data
    pipeline's start-up (Ray Data's coordinator and reader actors: new processes, imports, first
    reads; ≈ 17 s of a tiny job on two cores) runs while the worker builds its model and DeepSpeed
    engine instead of after. Batches and their order are those of `stream`."""

    def __init__(self, stream: Iterator[dict[str, Any]]):
        import concurrent.futures

        self.stream = stream
        self.fetcher = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="first-batch")
        self.first = self.fetcher.submit(next, stream)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self

    def __next__(self) -> dict[str, Any]:
        if self.first is None:
            return next(self.stream)
        first, self.first = self.first, None
        self.fetcher.shutdown(wait=False)
        return first.result()  # the fetch's error, if it failed, is raised here


# ------------------------------------------------------------- checkpoints


def save_checkpoint(engine, step: int, metrics: dict[str, float], rank: int, task: Task, final: bool,
                    eval_batch: dict[str, Any] | None = None) -> None:
    """Every rank writes its DeepSpeed shard into its own directory and reports it;
    Ray Train merges them into one checkpoint and registers it only when all
    uploads finished, so a checkpoint is never half-written."""
    import ray.train

    with tempfile.TemporaryDirectory(prefix="kosmos-ckpt-") as directory:
        engine.save_checkpoint(directory, tag=f"step_{step}", client_state={"step": step})
        if rank == 0:
            Path(directory, STATE_FILE).write_text(json.dumps({"step": step, "tag": f"step_{step}"}))
            if eval_batch is not None:
                torch.save(to_device(eval_batch, torch.device("cpu")), Path(directory, EVAL_BATCH_FILE))
            if final:
                task.save_bundle(engine.module, Path(directory) / BUNDLE_DIR)
        ray.train.report({"step": step, **metrics}, checkpoint=ray.train.Checkpoint.from_directory(directory))


def restore_checkpoint(engine, rank: int) -> tuple[int, dict[str, Any] | None]:
    """Load the latest reported checkpoint if any; returns the step to resume at and, on rank 0,
    the `eval_loss` batch saved with it (None without a checkpoint, or one saved before it was kept)."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 0, None
    with private_copy(checkpoint) as directory:
        state = json.loads(Path(directory, STATE_FILE).read_text())
        engine.load_checkpoint(directory, tag=state["tag"])
        saved_batch = Path(directory, EVAL_BATCH_FILE)
        eval_batch = torch.load(saved_batch, weights_only=False) if rank == 0 and saved_batch.exists() else None
    return int(state["step"]), eval_batch


@contextlib.contextmanager
def private_copy(checkpoint) -> Iterator[str]:
    """The checkpoint's files in a directory only this process reads.

    Ray's `Checkpoint.as_directory` shares one download per node, but a worker that
    arrives after another's download finished downloads again into the same directory,
    over the files the first is still loading (the CI's restarted workers failed with
    "PytorchStreamReader failed reading file data/160"). A copy per worker costs one more
    download per node and cannot be overwritten under its reader."""
    import pyarrow.fs

    if isinstance(checkpoint.filesystem, pyarrow.fs.LocalFileSystem):
        yield checkpoint.path
        return
    with tempfile.TemporaryDirectory(prefix="kosmos-restore-") as directory:
        yield checkpoint.to_directory(directory)


def maybe_inject_failure(cfg, step: int, rank: int, marker_uri: str) -> None:
    """Test hook: kill this worker process hard, once, at the chosen step."""
    if step != cfg.train.fail_at_step or rank != cfg.train.fail_rank or storage.exists(marker_uri):
        return
    storage.write_text(marker_uri, f"worker {rank} killed at step {step}")
    # Ray Train registers a reported checkpoint when its controller next polls the workers
    # (every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, 2 s by default); a crash sooner than that after
    # a checkpoint loses that checkpoint too. The injected crash comes after one poll, so the
    # tests measure what a failure costs once the last checkpoint is registered.
    time.sleep(float(os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "2.0")) + 1.0)
    say(f"[fault injection] rank {rank} exits at step {step}")
    os._exit(1)


# ------------------------------------------------------------------- loop


class Throughput:
    """Samples/s, tokens/s and the fraction of time spent waiting for data, over the training
    steps of a window: evaluation and checkpoints run `paused()` and do not count."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.started = time.perf_counter()
        self.samples = self.tokens = self.steps = 0
        self.data_wait = 0.0

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        began = time.perf_counter()
        try:
            yield
        finally:
            self.started += time.perf_counter() - began

    def add(self, counts: tuple[int, int], waited: float) -> None:
        self.samples += counts[0]
        self.tokens += counts[1]
        self.steps += 1
        self.data_wait += waited

    def metrics(self, world_size: int) -> dict[str, float]:
        """Rates over the window, scaled to all workers (ranks see equal batches)."""
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        return {"samples_per_s": self.samples * world_size / elapsed,
                "tokens_per_s": self.tokens * world_size / elapsed,
                # Real (non-pad) tokens in one optimiser step of the whole job: the paper's
                # stage-1 batch is ~1.2M tokens.
                "tokens_per_step": self.tokens * world_size / max(1, self.steps),
                "data_wait_fraction": self.data_wait / elapsed}


def own_intra_op_threads(threads: int, others: int = 1) -> None:
    """`threads` intra-op threads for the calling thread (the step's), `others` for threads started
    later (0: `threads` too, PyTorch's own behaviour).

    Ray Train runs this loop in a thread of its worker, and Ray Data collates batches in threads
    of its own. PyTorch's OpenMP (libgomp) keeps a team of threads for every thread that runs a
    parallel op; once more such threads exist than cores, libgomp stops spinning between parallel
    regions, and each of the step's many small ops pays for putting its team to sleep and waking
    it. The mini stage-3 step ran at 1.05 s in the job against 0.72 s in a plain process, its two
    threads 74% and 58% busy (docs/TRAINING.md, "Threads on CPU"). A thread's count is fixed at its
    first parallel op, from a process-wide default that `torch.set_num_threads` also sets; so this
    thread fixes its own, then another lowers the default."""
    torch.set_num_threads(threads)
    torch.get_num_threads()  # fixes this thread's count (PyTorch reads the default lazily)
    if not others or others == threads:
        return
    lower_default = threading.Thread(target=torch.set_num_threads, args=(others,), name="intra-op-default")
    lower_default.start()
    lower_default.join()


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    task: Task = loop_config["task"]
    cfg = from_dict(task.config_type, loop_config["config"])
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    on_gpu = device.type == "cuda"
    if not on_gpu:
        # By default one intra-op thread per reserved core: workers share the machine.
        own_intra_op_threads(cfg.train.torch_threads or max(1, int(cfg.train.cpus_per_worker)),
                             cfg.train.torch_threads_others)

    stream = FirstBatchEarly(batches(ray.train.get_dataset_shard("train"), cfg, loop_config["collate"], rank))
    model = task.build(cfg, loop_config.get("init_uri"), device)
    engine = make_engine(model, cfg, on_gpu, world_size)
    step, eval_batch = restore_checkpoint(engine, rank)
    if rank == 0:
        threads = "" if on_gpu else f", {torch.get_num_threads()} torch thread(s) each"
        say(f"[{cfg.pipeline}] starting at step {step}/{cfg.train.steps} on {world_size} worker(s){threads}")
    logger = tracking.RunLogger(loop_config.get("run_id"), rank)
    meter = Throughput()
    window: list[float] = []
    # A resumed run logs eval_loss again at its first step: on the saved batch, the value logged
    # before the checkpoint, so the curve shows that the restore was exact.
    eval_batch = to_device(eval_batch, device) if eval_batch is not None else None
    started_at = step
    while step < cfg.train.steps:
        maybe_inject_failure(cfg, step, rank, loop_config["fault_marker"])
        waited = time.perf_counter()
        batch = to_device(next(stream), device)
        waited = time.perf_counter() - waited
        if step == started_at and rank == 0:
            eval_batch = batch if eval_batch is None else eval_batch
            with meter.paused():
                logger.log_metrics({"eval_loss": eval_loss(engine.module, eval_batch, cfg, task)}, step)
        losses = forward_backward(engine, batch, cfg, task)
        if not math.isfinite(losses["loss"]):
            raise FloatingPointError(f"loss became {losses['loss']} at step {step}")
        optimizer_step(engine)
        task.after_step(engine.module)
        step += 1
        meter.add(task.count(batch), waited)
        window.append(losses["loss"])
        logger.log_metrics({**losses, "lr": engine.get_lr()[0]}, step)
        if rank == 0 and (step % (cfg.train.eval_every or cfg.train.checkpoint_every) == 0 or step == cfg.train.steps):
            with meter.paused():
                logger.log_metrics({"eval_loss": eval_loss(engine.module, eval_batch, cfg, task)}, step)
        if step % cfg.train.log_every == 0 or step == cfg.train.steps:
            rates = meter.metrics(world_size)
            logger.log_metrics(rates, step)
            if rank == 0:
                say(f"[{cfg.pipeline}] step {step}/{cfg.train.steps} loss {sum(window) / len(window):.4f} "
                    f"samples/s {rates['samples_per_s']:.1f} data-wait {rates['data_wait_fraction']:.0%}")
            meter.reset()
            window.clear()
        if step % cfg.train.checkpoint_every == 0 or step == cfg.train.steps:
            final = step == cfg.train.steps
            # Metrics up to a checkpoint are on the server before the checkpoint exists, so a
            # restart from it never leaves a gap in the curves.
            with meter.paused():
                logger.flush()
                save_checkpoint(engine, step, losses, rank, task, final, eval_batch)
    logger.close()
