"""Stage 3, instruction tuning: MLLM and AlignerNet M trained jointly with the diffusion loss through the frozen U-Net, on the 2:2:1 blend of compositional, editing and caption data. The result is registered as the servable model `kosmos-g`.

    ray job submit -- python pipelines/instruct.py --preset tiny [--set train.steps=100]

Runs as a Ray Train TorchTrainer with DeepSpeed workers; see
kosmos_g.platform.train.job for what the job does and the registry it fills.
"""

from __future__ import annotations

import sys

from kosmos_g.pipelines.stage_eval import EndOfStageEval
from kosmos_g.platform.train.job import main as run_stage_main

STAGE = 3


def main(argv: list[str] | None = None) -> int:
    return run_stage_main(STAGE, argv, EndOfStageEval())


if __name__ == "__main__":
    sys.exit(main())
