#!/usr/bin/env bash
# The test command: sets up .venv if needed, lints, and runs the whole test suite (including
# the doctest of tce_jax/losses). Extra arguments go to pytest.
set -euo pipefail
TCE_JAX_EXTRAS=train,test
. "$(dirname "$0")/setup_env.sh"
ruff check tce_jax tests configs experiments benchmarks scripts
# Test files run in parallel worker processes (one per core, at most 4), each file whole in one
# worker so that its module fixtures (trained workdirs, multi-process runs) are built once;
# files go out in collection order, which tests/conftest.py sets to the slowest first.
python -m pytest -q -n auto --maxprocesses=4 --dist loadfile --no-loadscope-reorder \
  --doctest-modules tce_jax/losses tests "$@"
