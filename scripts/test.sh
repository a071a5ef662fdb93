#!/usr/bin/env bash
# The test command: sets up .venv if needed, lints, and runs the whole test suite (including
# the doctest of tce_jax/losses). Extra arguments go to pytest.
set -euo pipefail
. "$(dirname "$0")/setup_env.sh"
ruff check tce_jax tests configs experiments benchmarks scripts
python -m pytest -q --doctest-modules tce_jax/losses tests "$@"
