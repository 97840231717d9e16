"""The miniature world's text CLIP: a mini CLIP trained from scratch on whole-scene captions only,
whose text encoder conditions the mini decoder (SD v1.5's CLIP text encoder in small) and is
therefore stage 2's teacher. Registered as kosmos-g-mini-text-clip.

    ray job submit -- python pipelines/mini_text_clip.py --preset mini [--set force=true]

The MLLM's vision tower is the other mini CLIP (pipelines/mini_clip.py, scenes and close-ups);
see kosmos_g.platform.train.backbone_job for why the world has two.
"""

from __future__ import annotations

import sys

from kosmos_g.platform.train.backbone_job import main as backbone_main


def main(argv: list[str] | None = None) -> int:
    return backbone_main("text-clip", argv)


if __name__ == "__main__":
    sys.exit(main())
