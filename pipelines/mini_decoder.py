"""The miniature world's mini image decoder (stand-in for SD v1.5: VAE + U-Net), trained from scratch and registered as kosmos-g-mini-decoder.

    ray job submit -- python pipelines/mini_decoder.py --preset mini [--set force=true]

See kosmos_g.platform.train.backbone_job for what the job does.
"""

from __future__ import annotations

import sys

from kosmos_g.platform.train.backbone_job import main as backbone_main


def main(argv: list[str] | None = None) -> int:
    return backbone_main("decoder", argv)


if __name__ == "__main__":
    sys.exit(main())
