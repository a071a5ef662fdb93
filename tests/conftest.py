"""Test-session set-up: 8 fake CPU devices with fast-compiling XLA flags, quiet TensorFlow, no
GPU for TF, one compilation cache for every test process, the slowest test files scheduled
first, and the `slow` mark.

XLA_FLAGS must be set before JAX initialises its backends, so this runs at import time.
"""

import fcntl
import os

# The test processes compile with XLA:CPU's elemental emitters instead of its MLIR fusion
# emitters: in about half the CPU time (SegFormer-B0's gradient step 7.5 -> 2.7 CPU-seconds;
# test_losses.py and test_baselines.py 111 -> 67 CPU-seconds from an empty compilation cache).
# The command-line runs they start in processes of their own compile with XLA's defaults, as a
# user's do (run_utils.start_main), and the device layouts compared in test_distributed.py span
# both. (A test of compiled CPU programs themselves asks for the default: test_compile_check.py.)
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_cpu_use_fusion_emitters=false --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
# JAX on the CPU even where its CUDA plugin is installed (tce_jax[compile-gpu]): the plugin
# then only compiles for GPU targets (tests/test_compile_mode.py) and never starts a GPU client.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# libtpu (tce_jax[compile-tpu]) takes /tmp/libtpu_lockfile for the life of the process that
# loads it, to keep two processes off one TPU; compiling needs no TPU, and two pytest-xdist
# workers (or a benchmark beside the tests) may each compile for a TPU target.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
# Also for the command-line runs the tests start (they inherit the environment): their tiny
# programs compile in a fraction of the time, and each run compares only with runs compiled
# the same way.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "true")

# One on-disk compilation cache for the test processes and every run they start: the tests
# compile the same tiny programs (a train step, the slices Orbax saves with) over and over, in
# many processes. Entries are keyed by the program, the compiler options and the JAX version,
# so a stale one is never used; a half-written one (a run killed by a test, two processes
# writing the same entry) makes JAX warn and compile again (see filterwarnings in
# pyproject.toml).
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR",
    os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        ".pytest_cache",
        "jax_compilation_cache",
    ),
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402

# Tests compile many small programs; optimisation buys nothing at these sizes.
jax.config.update("jax_disable_most_optimizations", True)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def small_data_dir(tmp_path_factory):
    """A TFDS data dir holding the small embedded dataset, prepared once per test run: the
    pytest-xdist workers share it (the first to take the lock prepares it, about 5 CPU-seconds;
    the tests that alter prepared data alter a copy)."""
    from configs import default
    from tce_jax import input_pipeline

    root = tmp_path_factory.getbasetemp()
    if "PYTEST_XDIST_WORKER" in os.environ:
        root = root.parent  # the run's directory, above each worker's own
    config = default.get_config("tiny")
    config.data.data_dir = str(root / "tfds_small")
    with open(root / "tfds_small.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        input_pipeline.load_builder(config)
    return config.data.data_dir


@pytest.fixture(scope="module")
def prepared(small_data_dir):
    """(tiny config, prepared TFDS builder, DatasetSpec) of the small embedded dataset."""
    from configs import default
    from tce_jax import input_pipeline

    config = default.get_config("tiny")
    config.data.data_dir = small_data_dir
    builder, spec = input_pipeline.load_builder(config)
    return config, builder, spec


# Files that start training processes or train several times take up to minutes each;
# pytest-xdist hands files to its workers in collection order (a worker takes the next file
# once two tests of its current one are left), so these go first, longest first by their
# durations in a full run, and the two workers end on short files together.
SLOW_FILES_FIRST = (
    "test_distributed.py",
    "test_train.py",  # the SegFormer command-line run alone takes 35-80 s
    "test_compile_mode.py",
    "test_checkpointing.py",
    "test_cityscapes_ade20k.py",
    "test_workdir.py",
    "test_models.py",
    "test_configs.py",
    "test_accumulation.py",
    "test_segformer.py",
    "test_input_pipeline.py",
    "test_datasets.py",
    "test_folder_dataset.py",
    "test_predict.py",
    "test_lowering.py",
    "test_baselines.py",
)


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOW_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order kept
    # Tests on the prepared embedded dataset train or start the command line: most of the
    # suite's time. With the compiles for GPU and TPU targets (marked in test_compile_mode.py)
    # they are `slow`: `bash scripts/test.sh -m "not slow"` leaves them out for a quick loop
    # while editing; the test command itself (and CI) runs every test.
    for item in items:
        if "small_data_dir" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)
