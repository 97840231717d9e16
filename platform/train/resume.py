"""Where a resumed stage's data stream continues.

Ray Train calls a dataset given as a callable each time it starts the workers: at the first
start and after every failure. `StageStream` is that callable. It reads the step of the last
checkpoint Ray Train registered and builds the stream to begin where that step's rows end (at
the next window boundary; `windows.stream_span`), so a restart neither replays the first
batches of the epoch nor depends on timing: the same checkpoint gives the same position.
"""

from __future__ import annotations

import json
import math

from kosmos_g.platform import storage, tracking

# Ray Train (V2) writes its checkpoint manager's state here, in the run's storage directory, each
# time it registers a checkpoint; the workers resume from its `latest_checkpoint_result`.
SNAPSHOT = "checkpoint_manager_snapshot.json"
# Extra records a packed stream holds beyond its measured need: the measurement is a sample.
PACKING_MARGIN = 1.2


def registered_step(run_dir: str) -> int:
    """The `step` reported with the last registered checkpoint under `run_dir`; 0 when none."""
    uri = storage.join(run_dir, SNAPSHOT)
    if not storage.exists(uri):
        return 0
    state = json.loads(storage.read_text(uri))
    if isinstance(state, str):  # pydantic's .json() output, JSON-encoded once more by Ray
        state = json.loads(state)
    latest = state.get("latest_checkpoint_result") or {}
    return int((latest.get("metrics") or {}).get("step", 0))


class StageStream:
    """A stage's training dataset from the position of its last registered checkpoint.

    `step × batch_size × num_workers` rows are taken as consumed. The stream counts records, and
    stage 1 packs several into one row: there each row counts as the records a packed row holds
    (`datastream.records_per_packed_row`, measured on the stream's first window), so that the
    stream holds the job's packed rows instead of a fraction of them read again and again (the
    tiny preset's packed rows hold ≈ 8 records: the stream held a third of a 10-step job)."""

    def __init__(self, cfg, model_cfg, run_id: str | None, siblings: dict[str, str] | None = None):
        self.cfg, self.model_cfg, self.run_id = cfg, model_cfg, run_id
        self.siblings = siblings or {}  # precomputed columns (platform/data/precomputed.py)

    def __call__(self):
        from kosmos_g.platform.data.datastream import records_per_packed_row, training_dataset
        from kosmos_g.platform.stack.cluster import quiet_data_progress

        quiet_data_progress()  # this runs in Ray Train's controller, not in the job's driver
        cfg = self.cfg
        step = registered_step(storage.join(cfg.resolved_storage_path(), cfg.name))
        global_batch = cfg.train.batch_size * cfg.train.num_workers
        positioned = cfg.data.shuffle == "stream"  # the other shuffles have no position to resume at
        per_row = records_per_packed_row(cfg.data, self.model_cfg, self.siblings) if cfg.stage == 1 else 1.0
        # One pass of the dataset covers the rest of training (a new pass restarts Ray Data's
        # operators and reads the same records again); two batches more, for the rows a split drops
        # when they do not fill a batch, and a fifth more where packing makes the count an estimate.
        margin = PACKING_MARGIN if per_row > 1 else 1.0
        start_row = round(step * global_batch * per_row)
        rows = math.ceil((cfg.train.steps - step + 2) * global_batch * per_row * margin)
        if positioned:
            packed = f" × {per_row:.2f} records a packed row" if per_row > 1 else ""
            print(f"[{cfg.pipeline}] data stream from row {start_row} (step {step} × {global_batch}{packed})",
                  flush=True)
        elif step:
            print(f"[{cfg.pipeline}] data stream from the start of an epoch (data.shuffle={cfg.data.shuffle} "
                  "has no position to resume at)", flush=True)
        if self.run_id:
            try:
                tracking.log_metrics(self.run_id, {"data_start_row": start_row if positioned else 0}, step)
            except Exception as error:  # noqa: BLE001 - a tracking outage must not stop the workers' start
                print(f"[{cfg.pipeline}] data_start_row not logged ({type(error).__name__})", flush=True)
        return training_dataset(cfg.stage, cfg.data, self.model_cfg, start_row=start_row, rows=rows,
                                siblings=self.siblings)
