"""A small real job for the local stack: proves a submitted Ray job reaches
object storage and MLflow with no flags.

    ray job submit -- python pipelines/smoke.py

It runs a few Ray tasks, writes their result to `$KOSMOS_STORAGE_ROOT/smoke/`,
and logs an MLflow run in the `kosmos-g-smoke` experiment.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

from kosmos_g.platform.stack import cluster
from kosmos_g.platform import storage, tracking


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument("--output", default=None, help="storage URI (default: $KOSMOS_STORAGE_ROOT/smoke)")
    args = parser.parse_args(argv)

    import ray

    cluster.connect()

    @ray.remote
    def square(value: int) -> dict:
        return {"value": value, "square": value * value, "host": platform.node()}

    started = time.monotonic()
    results = ray.get([square.remote(i) for i in range(args.tasks)])
    root = args.output or storage.join(os.environ.get("KOSMOS_STORAGE_ROOT", ".kosmos/storage"), "smoke")
    target = storage.join(root, "results.json")
    storage.write_text(target, json.dumps(results))
    print(f"wrote {len(results)} results to {target}", flush=True)

    if os.environ.get("MLFLOW_TRACKING_URI"):
        run_id, _ = tracking.start_run("smoke", f"smoke-{int(time.time())}")
        tracking.log_metrics(run_id, {"tasks": len(results), "seconds": time.monotonic() - started}, 0)
        tracking.log_text(run_id, json.dumps(results, indent=2), "results.json")
        tracking.end_run(run_id)
        print(f"logged MLflow run {run_id}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
