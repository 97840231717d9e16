#!/usr/bin/env bash
# The main job on the embedded local stack, from a fresh clone: set up .venv, start the stack,
# then the miniature world's whole chain as Ray jobs (docs/REPRODUCTION.md): the two mini CLIPs and
# the mini decoder (the frozen backbones), the compositional shards (construction with the world's
# stand-ins for its models), then Kosmos-G stages 1-3. A step whose exact config is
# already registered is reused, so re-running costs minutes. `--tiny` runs only stage 3 of the
# tiny random model on the bundled sample shards instead (a couple of minutes).
set -euo pipefail
cd "$(dirname "$0")/../.."

bash infra/local/setup.sh
.venv/bin/kosmos-g local up
eval "$(.venv/bin/kosmos-g local env)"
export PATH="$PWD/.venv/bin:$PATH"

source infra/local/submit.sh  # submit: `ray job submit` that fails on a stopped job too

if [[ "${1:-}" == "--tiny" ]]; then
    shift
    submit python pipelines/instruct.py --preset tiny "$@"
else
    submit python pipelines/mini_clip.py --preset mini
    submit python pipelines/mini_text_clip.py --preset mini
    submit python pipelines/mini_decoder.py --preset mini
    submit python pipelines/construct.py --preset world
    submit python pipelines/pretrain.py --preset mini
    submit python pipelines/align.py --preset mini
    submit python pipelines/instruct.py --preset mini "$@"
fi

echo
echo "MLflow: $MLFLOW_TRACKING_URI  (experiments kosmos-g-*, registered model kosmos-g)"
echo "Serve it: .venv/bin/kosmos-g serve --detach, then"
echo "  .venv/bin/kosmos-g generate 'a <image> on a green background' --image red_star.png -o out.png"
echo "Stop the stack with: .venv/bin/kosmos-g local down"
