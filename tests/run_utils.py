"""Helpers shared by the tests that run the command line or inspect finished training workdirs."""

import contextlib
import dataclasses
import io
import json
import os
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp


def read_jsonl(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def latest_checkpoint(workdir) -> tuple[int, dict]:
    """(step, state as a nested dict of numpy arrays) of the workdir's latest checkpoint."""
    manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"))
    step = manager.latest_step()
    manager.close()
    path = os.path.join(workdir, "checkpoints", str(step), "default")
    checkpointer = ocp.StandardCheckpointer()
    # Restore onto this process's first device, whatever topology wrote the checkpoint.
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
        checkpointer.metadata(path).item_metadata,
    )
    state = checkpointer.restore(path, target)
    checkpointer.close()
    return step, jax.device_get(state)


def flat_leaves(tree, prefix="") -> dict[str, np.ndarray]:
    """{'/params/Conv_0/kernel': array, ...}; empty (None) nodes are dropped."""
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, list | tuple):
        items = enumerate(tree)
    else:
        return {} if tree is None else {prefix: np.asarray(tree)}
    out = {}
    for key, sub in items:
        out.update(flat_leaves(sub, f"{prefix}/{key}"))
    return out


def assert_trees_close(actual, expected, *, rtol=0.0, atol=0.0, scaled=0.0) -> None:
    """Leaf-wise allclose; `scaled` adds an absolute tolerance of scaled * max|leaf|."""
    got, want = flat_leaves(actual), flat_leaves(expected)
    assert got.keys() == want.keys()
    for key in want:
        tolerance = atol + scaled * float(np.abs(want[key]).max(initial=0.0))
        np.testing.assert_allclose(got[key], want[key], rtol=rtol, atol=tolerance, err_msg=key)


def set_fields(config, **fields):
    """Sets dotted config fields (`set_fields(c, **{"loss.t": 2.0})`); returns the config."""
    for key, value in fields.items():
        node = config
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


@dataclasses.dataclass
class MainResult:
    """What `python -m tce_jax.main ...` ended with, as `subprocess.run` reports it."""

    returncode: int
    stdout: str
    stderr: str


def run_main_in_process(*args: str) -> MainResult:
    """Runs `python -m tce_jax.main ARGS` inside the test process: the same flag parsing, error
    handling and exit status as the command line, on this process's devices and compilation
    settings, without the start-up of a new Python with TensorFlow and JAX (most of a tiny
    run's time). Signals, locks held by another process and multi-process runs need a real
    process; everything else can run here."""
    from absl import flags, logging

    from tce_jax import main

    verbosity, argv = logging.get_verbosity(), sys.argv
    sys.argv = [main.__file__, *args]  # what provenance.jsonl records as the command
    _reset_flags(flags.FLAGS)
    out, err, code = io.StringIO(), io.StringIO(), 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main.main(main.parse_flags(sys.argv))
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    finally:
        sys.argv = argv
        _reset_flags(flags.FLAGS)
        logging.set_verbosity(verbosity)
    return MainResult(code, out.getvalue(), err.getvalue())


def _reset_flags(flag_values) -> None:
    """Back to before any parse: ml_collections defines a `--config.FIELD` flag for every field
    of the config file it loads, and refuses to define one twice."""
    for name in list(flag_values):
        if name.startswith("config."):
            delattr(flag_values, name)
    flag_values.unparse_flags()
