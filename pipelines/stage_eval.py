"""The small evaluation a training stage runs at its end (`--set eval.prompts=…`), before it
registers its model: the batch generation job on a prompt table with the just-trained bundle,
then DINO / CLIP-I / CLIP-T as the DreamBench job scores them, logged to the stage's MLflow run
as `eval_dino`, `eval_clip_i`, `eval_clip_t` (and so on the registered version's card) with a
grid `eval/samples.png`.

Rows are those of pipelines/generate.py; each needs at least one image (its first is the
reference) and may carry `text` for CLIP-T (default: the prompt without its placeholders) and
`subject` for grouping. Stages 2 and 3 call it (pipelines/align.py, pipelines/instruct.py).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from kosmos_g.platform.train.config import ConfigError, StageConfig

_PLACEHOLDER = re.compile(r"\s*<(?:image|i)>\s*")


def eval_rows(cfg: StageConfig) -> list[dict[str, Any]]:
    """The prompt table, checked: every row has a prompt and a reference image."""
    from kosmos_g.pipelines.generate import read_prompts

    rows = read_prompts(cfg.eval.prompts)
    problems = [f"row {i} ({row.get('key') or 'no key'})" for i, row in enumerate(rows)
                if not row.get("key") or not row.get("prompt") or not row.get("images")]
    if not rows or problems:
        raise ConfigError(f"eval.prompts {cfg.eval.prompts}: every row needs key, prompt and images "
                          f"(the first image is the reference); bad: {', '.join(problems[:5]) or 'the table is empty'}")
    return [{**row, "steps": cfg.eval.steps, "guidance_scale": cfg.eval.guidance_scale,
             "seed": row.get("seed", 0)} for row in rows]


def plain_text(prompt: str) -> str:
    return " ".join(_PLACEHOLDER.sub(" ", prompt).split())


def evaluate_bundle(cfg: StageConfig, run_id: str, bundle: Path) -> dict[str, float]:
    from kosmos_g.pipelines.evaluate import log_grid, score_images, summarise
    from kosmos_g.pipelines.generate import done_keys, generate_rows, image_uri
    from kosmos_g.platform import storage, tracking

    rows = eval_rows(cfg)
    out = storage.join(cfg.resolved_storage_path(), cfg.name, f"eval-{run_id[:8]}")
    generate_rows(rows, out, str(bundle), cfg.eval.batch_size)
    written = done_keys(out)
    images = [{"image_uri": image_uri(out, row["key"]), "reference": row["images"][0],
               "text": row.get("text") or plain_text(row["prompt"]), "subject": row.get("subject") or row["key"]}
              for row in rows if row["key"] in written]
    if not images:
        raise RuntimeError(f"eval.prompts: no row of {cfg.eval.prompts} could be generated (see the job log)")
    metrics, _ = summarise(score_images(images, cfg.eval.dino, cfg.eval.clip), prefix="eval")
    metrics["eval_images"] = float(len(images))
    tracking.log_metrics(run_id, metrics, cfg.train.steps)
    log_grid(run_id, images, artifact="eval/samples.png")
    print(f"[{cfg.pipeline}] end-of-stage evaluation: {metrics}", flush=True)
    return metrics


class EndOfStageEval:
    """What pipelines/align.py and instruct.py hand the stage job: `check` before training
    (a bad table fails in seconds, not after hours), then a call with the final bundle."""

    def check(self, cfg: StageConfig) -> None:
        if cfg.eval.prompts:
            eval_rows(cfg)

    def __call__(self, cfg: StageConfig, run_id: str, bundle: Path) -> dict[str, float]:
        return evaluate_bundle(cfg, run_id, bundle)
