"""The miniature world's mini CLIP (stand-in for CLIP ViT-L/14), trained from scratch and registered as kosmos-g-mini-clip.

    ray job submit -- python pipelines/mini_clip.py --preset mini [--set force=true]

See kosmos_g.platform.train.backbone_job for what the job does.
"""

from __future__ import annotations

import sys

from kosmos_g.platform.train.backbone_job import main as backbone_main


def main(argv: list[str] | None = None) -> int:
    return backbone_main("clip", argv)


if __name__ == "__main__":
    sys.exit(main())
