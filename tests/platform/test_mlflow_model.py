"""A registered version is a real MLflow model: `mlflow.pyfunc.load_model(...).predict(df)`
generates images, and the bundle inside still loads directly (serving, the next stage)."""

from __future__ import annotations

import base64
import io
import uuid

import pandas as pd
import torch
from PIL import Image

from kosmos_g.platform import tracking
from kosmos_g.platform.mlflow_model import save_pyfunc


def _png_b64(colour) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 40), colour).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_registered_version_loads_with_pyfunc_and_predicts(stack_env, tmp_path, s3_prefix):
    import mlflow

    from kosmos_g.models.checkpoint import save_servable
    from kosmos_g.models.config import model_preset
    from kosmos_g.models.kosmos_g import KosmosG
    from kosmos_g.platform import storage

    torch.manual_seed(0)
    bundle = save_servable(KosmosG.from_config(model_preset("tiny")), tmp_path / "bundle")
    run_id, _ = tracking.start_run("unit", f"pyfunc-{uuid.uuid4().hex[:8]}")
    tracking.log_dir(run_id, save_pyfunc(bundle, tmp_path / "mlflow-model"), "model")
    name = f"kosmos-g-pyfunc-{uuid.uuid4().hex[:6]}"
    tracking.register_model(run_id, "model", name)

    model = mlflow.pyfunc.load_model(f"models:/{name}@{tracking.DEFAULT_ALIAS}")
    assert model.metadata.get_input_schema().input_names()[0] == "prompt"
    storage.write_bytes(f"{s3_prefix}/subject.png", base64.b64decode(_png_b64((40, 80, 220))))
    frame = pd.DataFrame({
        "prompt": ["<image> on a green background", "a red circle", "<i> and <i>"],
        "images": [[_png_b64((220, 40, 40))], [], [_png_b64((240, 210, 40)), f"{s3_prefix}/subject.png"]],
        "steps": [2, 2, 2], "seed": [0, 0, 1],
    })
    out = model.predict(frame)
    assert list(out.columns) == ["image"] and len(out) == 3
    images = [Image.open(io.BytesIO(base64.b64decode(value))) for value in out["image"]]
    assert all(image.size == (32, 32) for image in images)
    again = model.predict(frame.iloc[:1])  # same seed, same image
    assert again["image"][0] == out["image"][0]

    # The bundle inside the MLflow model still loads directly.
    local = tracking.resolve_artifacts(f"models:/{name}/1", tmp_path / "download")
    assert (local / "config.json").is_file() and local.name == "bundle"

    # And MLflow's own scoring server answers /invocations with it.
    _serve_and_invoke(f"models:/{name}@{tracking.DEFAULT_ALIAS}", frame.iloc[1:2], out["image"][1])


def _serve_and_invoke(model_uri: str, frame: pd.DataFrame, expected: str) -> None:
    import json
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    import requests

    from kosmos_g.platform.stack.services import free_port

    port = free_port()
    mlflow_cli = str(Path(sys.executable).parent / "mlflow")
    server = subprocess.Popen([mlflow_cli, "models", "serve", "-m", model_uri, "--env-manager", "local",
                               "--host", "127.0.0.1", "-p", str(port), "--workers", "1"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                              # as for a user with the venv activated: MLflow runs `uvicorn` from PATH
                              env={**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"})
    try:
        deadline = time.monotonic() + 240
        while True:
            try:
                if requests.get(f"http://127.0.0.1:{port}/ping", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert server.poll() is None, server.stdout.read().decode()[-3000:]
            assert time.monotonic() < deadline, "mlflow models serve did not come up"
            time.sleep(1)
        body = {"dataframe_split": json.loads(frame.to_json(orient="split", index=False))}
        response = requests.post(f"http://127.0.0.1:{port}/invocations", json=body, timeout=120)
        assert response.status_code == 200, response.text
        predictions = response.json()["predictions"]
        assert predictions[0]["image"] == expected  # same seed, same image as in-process
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
