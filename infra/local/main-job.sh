#!/usr/bin/env bash
# The main job on the embedded local stack, from a fresh clone:
#   set up .venv → kosmos-g local up → sample data to S3 → stage 3 (tiny) as a Ray job.
set -euo pipefail
cd "$(dirname "$0")/../.."

bash infra/local/setup.sh
.venv/bin/kosmos-g local up
eval "$(.venv/bin/kosmos-g local env)"
export PATH="$PWD/.venv/bin:$PATH"


ray job submit -- python pipelines/instruct.py --preset tiny "$@"

echo
echo "MLflow: $MLFLOW_TRACKING_URI  (experiment kosmos-g-instruct, registered model kosmos-g)"
echo "Stop the stack with: .venv/bin/kosmos-g local down"
