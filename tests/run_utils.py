"""Helpers shared by the tests that inspect finished training workdirs."""

import json
import os

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
