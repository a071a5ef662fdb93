"""The compile-only toolchains in tests: skip (with the install line) where they are missing."""

import pytest

from tce_jax import targets


def skip_without_toolchain(target: str):
    """A skipif mark for a test that compiles for ``target``."""
    parsed = targets.parse_target(target)
    try:
        targets.check_toolchain(parsed)
    except targets.ToolchainMissing as error:
        return pytest.mark.skipif(True, reason=str(error))
    return pytest.mark.skipif(False, reason="")


def compile_mesh(target: str):
    """``targets.compile_mesh(target)``; skips when this test process started JAX before the
    CUDA plugin could be kept off the GPU (run it with JAX_PLATFORMS=cpu)."""
    try:
        return targets.compile_mesh(target)
    except RuntimeError as error:
        if "JAX_PLATFORMS=cpu" not in str(error):
            raise
        pytest.skip(str(error))
