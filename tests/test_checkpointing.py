"""Checkpoints: the best step by validation mIoU across restarts, verification of restored
states, and what a CLI run does on SIGTERM / SIGINT, divergence and a corrupt checkpoint.

The CLI tests run `python -m tce_jax.main` on the tiny config (one device) and compare with
an uninterrupted run of the same config.
"""

import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from run_utils import assert_trees_close, flat_leaves, latest_checkpoint

from tce_jax import checkpointing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 600


def fake_state(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "params": {
            "kernel": rng.normal(size=(128, 256)).astype(np.float32),
            "bias": rng.normal(size=(256,)).astype(np.float32),
        },
        "step": np.int32(seed),
    }


ABSTRACT = jax.tree.map(np.zeros_like, fake_state(0))


def save(manager, step, state, miou=None):
    metrics = None if miou is None else {"miou": miou}
    checkpointing.save_checkpoint(manager, step, state, metrics)
    manager.wait_until_finished()


# ---------------------------------------------------------------------------------------------
# Best checkpoint.


def test_the_best_step_is_kept_and_known_after_a_restart(tmp_path):
    directory = str(tmp_path / "checkpoints")
    manager = checkpointing.create_checkpoint_manager(directory, keep_latest=1)
    save(manager, 1, fake_state(1), miou=0.5)
    save(manager, 2, fake_state(2), miou=0.1)
    manager.close()
    # A resumed run: a new manager, a save without an evaluation, a worse evaluated step.
    manager = checkpointing.create_checkpoint_manager(directory, keep_latest=1)
    assert manager.best_step() == 1
    save(manager, 3, fake_state(3))
    save(manager, 4, fake_state(4), miou=0.2)
    save(manager, 5, fake_state(5))
    assert list(manager.all_steps()) == [1, 5]  # the best plus the latest
    assert manager.best_step() == 1
    assert manager.metrics(1) == {"miou": 0.5}
    assert_trees_close(checkpointing.restore_checkpoint(manager, 1, ABSTRACT), fake_state(1))
    manager.close()


def test_checkpoints_without_metrics_are_never_best(tmp_path):
    manager = checkpointing.create_checkpoint_manager(str(tmp_path), keep_latest=2)
    for step in (1, 2, 3):
        save(manager, step, fake_state(step))
    assert list(manager.all_steps()) == [2, 3]
    assert manager.best_step() is None
    save(manager, 4, fake_state(4), miou=float("nan"))  # ranks below any real mIoU
    save(manager, 5, fake_state(5), miou=0.0)
    assert manager.best_step() == 5
    manager.close()


def test_a_non_finite_state_is_not_saved(tmp_path):
    manager = checkpointing.create_checkpoint_manager(str(tmp_path), keep_latest=2)
    state = fake_state(1)
    state["params"]["bias"][3] = np.inf
    with pytest.raises(checkpointing.NonFiniteStateError) as info:
        save(manager, 1, state)
    assert info.value.leaves == [".params['bias']"] or "bias" in info.value.leaves[0]
    assert list(manager.all_steps()) == []
    manager.close()


# ---------------------------------------------------------------------------------------------
# Verification of restored states.


def largest_array_file(step_dir) -> str:
    """The biggest TensorStore data file of a step's state item (where the large leaves are)."""
    files = [
        os.path.join(root, name)
        for root, _, names in os.walk(os.path.join(step_dir, checkpointing.STATE_ITEM))
        for name in names
        if os.sep + "d" + os.sep in os.path.join(root, name) + os.sep
    ]
    return max(files, key=os.path.getsize)


def flip_bytes(path, mask: int, count: int = 64) -> None:
    """XORs `count` bytes in the middle of the file (its data, away from header and index)."""
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.seek(size // 2)
        data = f.read(count)
        f.seek(size // 2)
        f.write(bytes(b ^ mask for b in data))


def truncate(path) -> None:
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


DAMAGE = {
    # Lowest bit of each byte: finite values, caught only by the checksums.
    "flipped_low_bits": (lambda p: flip_bytes(p, 0x01), "differ from what was written"),
    "flipped_bytes": (lambda p: flip_bytes(p, 0xFF), ""),
    "truncated": (truncate, "cannot read it"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_checkpoint_is_refused_and_nothing_is_deleted(tmp_path, damage):
    directory = str(tmp_path / "checkpoints")
    manager = checkpointing.create_checkpoint_manager(directory, keep_latest=2)
    # Random integers do not compress: a byte flipped in the file is a byte flipped in a leaf.
    rng = np.random.default_rng(0)
    states = {
        step: {"counts": rng.integers(0, 2**31, (256, 256), dtype=np.int32), **fake_state(step)}
        for step in (1, 2)
    }
    for step, state in states.items():
        save(manager, step, state)
    manager.close()
    damage_fn, problem = DAMAGE[damage]
    damage_fn(largest_array_file(os.path.join(directory, "2")))

    manager = checkpointing.create_checkpoint_manager(directory, keep_latest=2)
    abstract = jax.tree.map(np.zeros_like, states[2])
    with pytest.raises(checkpointing.CheckpointError) as info:
        checkpointing.restore_checkpoint(manager, 2, abstract)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"The checkpoint of step 2 in {directory} is corrupt: ")
    assert problem in message
    assert "resume from step 1" in message
    assert list(manager.all_steps()) == [1, 2]
    assert_trees_close(checkpointing.restore_checkpoint(manager, 1, abstract), states[1])
    manager.close()
