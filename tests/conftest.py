"""Test-session set-up: 8 fake CPU devices, quiet TensorFlow, no GPU for TF.

XLA_FLAGS must be set before JAX initialises its backends, so this runs at import time.
"""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
# Also for the command-line runs the tests start (they inherit the environment): their tiny
# programs compile in a fraction of the time, and each run compares only with runs compiled
# the same way.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "true")

import jax  # noqa: E402

# Tests compile many small programs; optimisation buys nothing at these sizes.
jax.config.update("jax_disable_most_optimizations", True)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def small_data_dir(tmp_path_factory):
    """A TFDS data dir holding the small embedded dataset, prepared once per session."""
    from configs import default
    from tce_jax import input_pipeline

    data_dir = str(tmp_path_factory.mktemp("tfds"))
    config = default.get_config("tiny")
    config.data.data_dir = data_dir
    input_pipeline.load_builder(config)
    return data_dir


@pytest.fixture(scope="module")
def prepared(small_data_dir):
    """(tiny config, prepared TFDS builder, DatasetSpec) of the small embedded dataset."""
    from configs import default
    from tce_jax import input_pipeline

    config = default.get_config("tiny")
    config.data.data_dir = small_data_dir
    builder, spec = input_pipeline.load_builder(config)
    return config, builder, spec
