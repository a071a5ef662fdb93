"""Checkpoints: the best step by validation mIoU across restarts, verification of restored
states, and what a CLI run does on SIGTERM / SIGINT, divergence and a corrupt checkpoint.

The signal test runs `python -m tce_jax.main` on the tiny config (one device) and compares with
an uninterrupted run of the same config; the divergence and corrupt-checkpoint runs need no
process of their own and run the command line inside the test process. Signals to one process of
a multi-process run: test_distributed.py.
"""

import os
import re
import shutil
import signal
import subprocess

import jax
import numpy as np
import pytest
import run_utils
from absl import logging as absl_logging
from run_utils import assert_trees_close, flat_leaves, latest_checkpoint

from tce_jax import checkpointing

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


def test_replicas_share_the_writing_of_large_arrays_only(tmp_path, caplog):
    """A state replicated on 8 devices: Orbax's replica-parallel saving compiles a slicing
    program per array and device, worth it for large arrays only. The small ones (<1 MiB per
    replica) are written whole by one replica, and nothing is compiled for them."""
    replicated = jax.sharding.NamedSharding(
        jax.sharding.Mesh(np.array(jax.devices()[:8]), ("data",)), jax.sharding.PartitionSpec()
    )
    # Shapes of their own, so that no slicing program compiled by an earlier test is reused.
    small = {"kernel": np.ones((24, 40), np.float32), "bias": np.ones((40,), np.float32)}
    large = {"kernel": np.ones((8 * 2**18 + 8, 1), np.float32)}  # 8 slices of just over 1 MiB

    def programs_compiled_saving(state) -> list[str]:
        manager = checkpointing.create_checkpoint_manager(str(tmp_path / str(len(state))), 1)
        caplog.clear()
        with jax.log_compiles(True), caplog.at_level("WARNING"):
            save(manager, 1, jax.device_put(state, replicated))
        manager.close()
        return re.findall(r"Finished XLA compilation of (\S+)", caplog.text)

    assert programs_compiled_saving(small) == []
    assert programs_compiled_saving(large)  # sliced on the devices, one slice per replica


def test_a_manager_is_created_without_warnings(tmp_path, caplog):
    """Creating a manager logs nothing at WARNING, such as Orbax's note that our array handler
    replaces its default (the command line shows warnings)."""
    with caplog.at_level("WARNING"):
        for name in ("a", "b"):  # the first manager of the process and a later one
            checkpointing.create_checkpoint_manager(str(tmp_path / name), 1).close()
        assert [r.getMessage() for r in caplog.records] == []
        # Only that override is silenced: Orbax's warning for another type still shows.
        other = 'Type handler registry type "%s" overriding %s'
        absl_logging.warning(other, "<class 'numpy.ndarray'>", "np.ndarray")
    assert [r.getMessage() for r in caplog.records] == [
        "Type handler registry type \"<class 'numpy.ndarray'>\" overriding np.ndarray"
    ]


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


# ---------------------------------------------------------------------------------------------
# The CLI: preemption, divergence, corrupt checkpoints.

# 8 steps; checkpoints at 4 and 8; evaluation only at the end; a progress line every step.
TINY = (
    "--config.num_train_steps=8",
    "--config.checkpoint_every_steps=4",
    "--config.eval_every_steps=8",
    "--config.log_every_steps=1",
)


def tiny_flags(workdir, data_dir, *overrides) -> list[str]:
    return run_utils.run_flags(workdir, data_dir, *TINY, *overrides)


def start_cli(workdir, data_dir, *overrides):
    """A CLI run of TINY in a process of its own (one CPU device), interruptible by SIGINT as
    in a terminal; output and errors together."""
    return run_utils.start_main(
        *tiny_flags(workdir, data_dir, *overrides), interactive=True, stderr=subprocess.STDOUT
    )


def run_cli(workdir, data_dir, *overrides) -> str:
    """Runs TINY to its end as `start_cli`; returns the output."""
    [result] = run_utils.wait_all([start_cli(workdir, data_dir, *overrides)], TIMEOUT)
    assert result.returncode == 0, result.stdout[-3000:]
    return result.stdout


def run_in_process(workdir, data_dir, *overrides) -> tuple[int, str]:
    """A run of TINY inside the test process (its 8 devices): for the runs that need no signal."""
    result = run_utils.run_main_in_process(*tiny_flags(workdir, data_dir, *overrides))
    return result.returncode, result.stdout + result.stderr


def signal_after_first_step(proc, signum) -> run_utils.MainResult:
    """Sends `signum` once the run has printed a training step; returns how it ended."""
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if re.match(r"\[tce\] step \d+/", line):
                proc.send_signal(signum)
                break
    finally:
        [result] = run_utils.wait_all([proc], TIMEOUT)
    result.stdout = "".join(lines) + result.stdout
    return result


def last_line(output: str) -> str:
    return output.strip().splitlines()[-1]


def checkpoint_steps(workdir) -> list[int]:
    return sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())


@pytest.fixture(scope="module")
def reference_run(small_data_dir, tmp_path_factory):
    """An uninterrupted CLI run of TINY."""
    workdir = str(tmp_path_factory.mktemp("reference"))
    run_cli(workdir, small_data_dir)
    return workdir


def stop_by_signal(workdir: str, data_dir: str, sig: signal.Signals) -> tuple[int, str]:
    """Sends `sig` to a CLI run after its first step; checks the exit status (128 + sig), the
    one-line message and that the step it names is the last checkpoint. Returns (step, output)."""
    result = signal_after_first_step(start_cli(workdir, data_dir), sig)
    out = result.stdout
    assert result.returncode == 128 + sig, out[-3000:]
    stopped = re.fullmatch(
        rf"stopped at step (\d+) by {sig.name}; checkpoint saved; rerun the same command to "
        "resume",
        last_line(out),
    )
    assert stopped, out[-3000:]
    step = int(stopped.group(1))
    assert checkpoint_steps(workdir)[-1] == step
    assert "Traceback" not in out
    assert not os.path.exists(os.path.join(workdir, "report.md"))  # the run did not end
    return step, out


def test_a_signal_saves_and_the_rerun_continues_exactly(small_data_dir, reference_run, tmp_path):
    """SIGINT (Ctrl-C) and SIGTERM (a preemption notice) each stop a run at a step of its own;
    each rerun resumes there, and the last one ends bitwise equal to an uninterrupted run."""
    workdir = str(tmp_path / "w")
    first, _ = stop_by_signal(workdir, small_data_dir, signal.SIGINT)
    second, out = stop_by_signal(workdir, small_data_dir, signal.SIGTERM)
    assert f"Resuming from the checkpoint of step {first} " in out
    assert second > first
    out = run_cli(workdir, small_data_dir)
    assert f"Resuming from the checkpoint of step {second} " in out
    final_step, resumed = latest_checkpoint(workdir)
    assert final_step == 8
    assert_trees_close(resumed, latest_checkpoint(reference_run)[1], rtol=0, atol=0)


def test_divergence_stops_the_run_and_saves_nothing_non_finite(small_data_dir, tmp_path):
    workdir = str(tmp_path / "w")
    code, out = run_in_process(
        workdir,
        small_data_dir,
        "--config.optimizer.name=sgd",
        "--config.optimizer.learning_rate=1e4",
        "--config.checkpoint_every_steps=1",  # every finite step is saved
    )
    assert code == 1, out[-3000:]
    message = last_line(out)
    diverged = re.fullmatch(
        r"(loss|gradient norm) is (nan|inf|-inf) at step (\d+); nothing saved after step (\d+) "
        r"\((.*)\); lower the learning rate .*",
        message,
    )
    assert diverged, out[-3000:]
    step = int(diverged.group(3))
    assert int(diverged.group(4)) == step - 1
    steps = checkpoint_steps(workdir)
    assert steps[-1] == step - 1
    assert diverged.group(5) == f"last good checkpoint: step {step - 1} in {workdir}/checkpoints"
    _, state = latest_checkpoint(workdir)
    for name, value in flat_leaves(state).items():
        if np.issubdtype(value.dtype, np.inexact):
            assert np.isfinite(value).all(), name
    assert not os.path.exists(os.path.join(workdir, "report.md"))


@pytest.mark.parametrize(
    "damage,mode",
    [("flipped_bytes", "train"), ("truncated", "evaluate")],
)
def test_a_corrupt_checkpoint_is_refused_in_one_line(
    small_data_dir, reference_run, tmp_path, damage, mode
):
    workdir = str(tmp_path / "w")
    shutil.copytree(reference_run, workdir)
    DAMAGE[damage][0](largest_array_file(os.path.join(workdir, "checkpoints", "8")))
    if mode == "train":  # resume from the latest checkpoint and train on
        code, out = run_in_process(workdir, small_data_dir, "--config.num_train_steps=12")
    else:
        code, out = run_in_process(
            workdir, small_data_dir, "--mode=evaluate", "--checkpoint=latest"
        )
    assert code == 1, out[-3000:]
    assert last_line(out).startswith(
        f"The checkpoint of step 8 in {workdir}/checkpoints is corrupt: "
    ), out[-3000:]
    assert "to resume from step 4" in last_line(out)
    assert "Traceback" not in out
    assert checkpoint_steps(workdir) == [4, 8]
