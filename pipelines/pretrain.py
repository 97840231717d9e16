"""Stage 1, multimodal language modelling: next-token loss on text tokens over caption and interleaved data.

    ray job submit -- python pipelines/pretrain.py --preset tiny [--set train.steps=100]

Runs as a Ray Train TorchTrainer with DeepSpeed workers; see
kosmos_g.platform.train.job for what the job does and the registry it fills.
"""

from __future__ import annotations

import sys

from kosmos_g.platform.train.job import main as run_stage_main

STAGE = 1


def main(argv: list[str] | None = None) -> int:
    return run_stage_main(STAGE, argv)


if __name__ == "__main__":
    sys.exit(main())
