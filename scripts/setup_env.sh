# Sourced by the other scripts: creates .venv (once) and installs the package with the extras in
# TCE_JAX_EXTRAS (default: train; scripts/test.sh adds test, which brings pytest, ruff and the
# compile-only GPU and TPU toolchains).
set -euo pipefail
EXTRAS="${TCE_JAX_EXTRAS:-train}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "tce_jax needs Python >= 3.11; '$PYTHON' is $("$PYTHON" --version 2>&1)." \
       "Run with PYTHON=/path/to/python3.11 (or newer)." >&2
  exit 1
fi
if [ ! -x "$ROOT/.venv/bin/python" ]; then
  "$PYTHON" -m venv "$ROOT/.venv"
fi
# shellcheck disable=SC1091
. "$ROOT/.venv/bin/activate"
# Re-install only when pyproject.toml changed since the last install of these extras.
STAMP="$ROOT/.venv/.tce_jax_installed_${EXTRAS//,/_}"
if [ ! -f "$STAMP" ] || [ "$ROOT/pyproject.toml" -nt "$STAMP" ]; then
  # uv installs the ~100 distributions in seconds where pip takes about a minute (measured on
  # 2 cores from an empty uv cache: 20 s with all bytecode compiled, against 52 s for pip); pip
  # itself is the fallback.
  if python -m pip install --quiet uv; then
    python -m uv pip install --quiet --python "$ROOT/.venv/bin/python" -e "$ROOT[$EXTRAS]"
  else
    python -m pip install --quiet --no-compile -e "$ROOT[$EXTRAS]"
  fi
  touch "$STAMP"
fi
# Python caches the bytecode of each module it imports, once, in .venv (and in the source tree's
# ignored __pycache__): a training process imports ~4,400 modules (TensorFlow's ~1,800), and
# without a cache each process would compile them again (seconds each). Compiling all ~11,000
# modules at install instead took 14 s on 2 cores, for files that are mostly never imported.
unset PYTHONDONTWRITEBYTECODE
cd "$ROOT"
