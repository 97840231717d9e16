"""Stage 2, image-decoder aligning: the MLLM is frozen; AlignerNet learns to map its states onto the CLIP text encoder's (MSE + reconstruction), on captions only.

    ray job submit -- python pipelines/align.py --preset tiny [--set train.steps=100]

Runs as a Ray Train TorchTrainer with DeepSpeed workers; see
kosmos_g.platform.train.job for what the job does and the registry it fills.
"""

from __future__ import annotations

import sys

from kosmos_g.pipelines.stage_eval import EndOfStageEval
from kosmos_g.platform.train.job import main as run_stage_main

STAGE = 2


def main(argv: list[str] | None = None) -> int:
    return run_stage_main(STAGE, argv, EndOfStageEval())


if __name__ == "__main__":
    sys.exit(main())
