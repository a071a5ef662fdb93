#!/usr/bin/env bash
# The test command: sets up .venv if needed, lints, and runs the whole test suite.
set -euo pipefail
. "$(dirname "$0")/setup_env.sh"
ruff check tce_jax tests configs experiments benchmarks
python -m pytest -q "$@"
