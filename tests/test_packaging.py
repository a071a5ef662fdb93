"""The core install (`pip install tce_jax`) is the loss and the metrics' pure functions.

Its declared dependencies are jax and numpy alone, so `tce_jax`, `tce_jax.losses` and
`tce_jax.metrics` must import and work with the training stack absent. A subprocess blocks
those packages and uses the core API.
"""

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

TRAINING_STACK = (
    "tensorflow",
    "tensorflow_datasets",
    "flax",
    "optax",
    "orbax",
    "clu",
    "ml_collections",
    "tensorboard",
    "PIL",
    "matplotlib",
    "cityscapesscripts",
)

CORE_USE = f"""
import importlib.abc, sys

BLOCKED = {TRAINING_STACK!r}

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{{name}} is blocked: not part of the core install")
        return None

sys.meta_path.insert(0, Block())

import numpy as np
import jax.numpy as jnp
import tce_jax
from tce_jax import losses, metrics, tilted_ce

logits = jnp.asarray(np.random.default_rng(0).normal(size=(2, 4, 4, 3)), jnp.float32)
labels = jnp.asarray(np.random.default_rng(1).integers(0, 3, size=(2, 4, 4)))
loss = tilted_ce(logits, labels, t=1.0)
state = losses.stochastic_tce_init(3)
_, state, _ = losses.stochastic_tce(logits, labels, state, t=1.0, lam=0.5)
matrix = metrics.confusion_matrix(logits.argmax(-1), labels, 3)
figures = metrics.segmentation_figures(np.asarray(matrix))
assert np.isfinite(float(loss)) and 0.0 <= figures["miou"] <= 1.0
loaded = [m for m in sys.modules if m.split(".")[0] in BLOCKED]
assert not loaded, loaded
print("core ok")
"""


def test_core_modules_work_without_the_training_stack():
    result = subprocess.run(
        [sys.executable, "-c", CORE_USE], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "core ok" in result.stdout


def test_core_dependencies_are_jax_and_numpy():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {
        dep.split(">")[0].split("=")[0].split("[")[0].strip() for dep in project["dependencies"]
    }
    assert names == {"jax", "numpy"}
    # Everything the training system imports is in the `train` extra.
    train = {
        dep.split(">")[0].split("[")[0].strip() for dep in project["optional-dependencies"]["train"]
    }
    assert {"flax", "optax", "orbax-checkpoint", "clu", "tensorflow-cpu"} <= train
