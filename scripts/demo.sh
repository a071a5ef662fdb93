#!/usr/bin/env bash
# The main job: sets up .venv if needed, then trains CE and TCE on the embedded dataset and
# prints their per-class IoU side by side. Extra arguments go to experiments/demo.py.
set -euo pipefail
. "$(dirname "$0")/setup_env.sh"
python experiments/demo.py "$@"
