#!/usr/bin/env bash
# Create .venv at the repo root and install kosmos-g (editable) with pinned,
# known-good dependencies for Python 3.11 on CPU. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/../.."

PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
"$PYTHON" -c 'import sys; assert sys.version_info[:2] == (3, 11), "kosmos-g needs Python 3.11, found " + sys.version' 

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip

# torch is pinned in the same command as everything else: without the pin some
# dependency resolutions pull a multi-GB CUDA build of a newer torch.
.venv/bin/python -m pip install --quiet -e ".[test]" "torch==2.13.0"

# open-clip-torch is only the source of the real CLIP BPE vocabulary file; its
# dependencies (torchvision) do not import beside the CPU torch, so skip them.
.venv/bin/python -m pip install --quiet --no-deps "open-clip-torch==3.3.0"

# Headless Chromium + chromedriver for the playground's browser test (Debian packages;
# Selenium drives the system browser, nothing is downloaded at test time).
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing chromium and chromium-driver (apt-get) for the browser test"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
  else
    echo "note: chromium/chromedriver missing and not root: the playground browser test will be skipped" >&2
  fi
fi

.venv/bin/python - <<'PY'
import importlib.metadata as metadata
import platform
import torch
import kosmos_g.platform.storage  # noqa: F401
assert torch.__version__.startswith("2.13.0"), torch.__version__
vocab = metadata.distribution("open_clip_torch").locate_file("open_clip/bpe_simple_vocab_16e6.txt.gz")
assert vocab.exists(), vocab
print(f"kosmos-g ready: torch {torch.__version__} on {platform.system()}")
PY
