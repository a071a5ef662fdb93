"""Checkpoints: the best step by validation mIoU across restarts, verification of restored
states, and what a CLI run does on SIGTERM / SIGINT, divergence and a corrupt checkpoint.

The signal tests run `python -m tce_jax.main` on the tiny config (one device) and compare with
an uninterrupted run of the same config; the divergence and corrupt-checkpoint runs need no
process of their own and run the command line inside the test process.
"""

import os
import re
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest
from distributed_runs import free_port
from run_utils import assert_trees_close, flat_leaves, latest_checkpoint, run_main_in_process

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


# ---------------------------------------------------------------------------------------------
# The CLI: preemption, divergence, corrupt checkpoints.

# 8 steps; checkpoints at 4 and 8; evaluation only at the end; a progress line every step.
TINY = (
    "--config.num_train_steps=8",
    "--config.checkpoint_every_steps=4",
    "--config.eval_every_steps=8",
    "--config.log_every_steps=1",
)


# Starts the CLI with SIGINT's default action, as an interactive shell does (a child of a
# non-interactive shell or of a background job inherits SIGINT ignored, and keeps it so).
INTERACTIVE = (
    "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
    "os.execv(sys.executable, [sys.executable, '-m', 'tce_jax.main', *sys.argv[1:]])"
)


def launch(workdir, data_dir, *overrides):
    # One CPU device, and compiled as in the test process (quickly).
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", XLA_FLAGS="")
    env["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "true"
    return subprocess.Popen(
        [
            sys.executable,
            "-c",
            INTERACTIVE,
            "--config=configs/default.py:tiny",
            f"--workdir={workdir}",
            f"--config.data.data_dir={data_dir}",
            *TINY,
            *overrides,
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish(proc) -> tuple[int, str]:
    try:
        out, _ = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return proc.returncode, out


def run_cli(workdir, data_dir, *overrides) -> tuple[int, str]:
    return finish(launch(workdir, data_dir, *overrides))


def run_in_process(workdir, data_dir, *overrides) -> tuple[int, str]:
    """As `run_cli`, inside the test process (its 8 devices): for the runs that need no signal."""
    result = run_main_in_process(
        f"--config={os.path.join(ROOT, 'configs', 'default.py')}:tiny",
        f"--workdir={workdir}",
        f"--config.data.data_dir={data_dir}",
        *TINY,
        *overrides,
    )
    return result.returncode, result.stdout + result.stderr


def interrupt_after_first_step(proc, signum) -> tuple[int, str]:
    """Sends `signum` once the run has printed a training step; returns (code, output)."""
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if re.match(r"\[tce\] step \d+/", line):
                proc.send_signal(signum)
                break
        rest, _ = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return proc.returncode, "".join(lines) + rest


def last_line(output: str) -> str:
    return output.strip().splitlines()[-1]


def checkpoint_steps(workdir) -> list[int]:
    return sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())


@pytest.fixture(scope="module")
def reference_run(small_data_dir, tmp_path_factory):
    """An uninterrupted CLI run of TINY."""
    workdir = str(tmp_path_factory.mktemp("reference"))
    code, out = run_cli(workdir, small_data_dir)
    assert code == 0, out[-3000:]
    return workdir


def stop_by_signal(workdir: str, data_dir: str, sig: signal.Signals) -> tuple[int, str]:
    """Sends `sig` to a CLI run after its first step; checks the exit status (128 + sig), the
    one-line message and that the step it names is the last checkpoint. Returns (step, output)."""
    code, out = interrupt_after_first_step(launch(workdir, data_dir), sig)
    assert code == 128 + sig, out[-3000:]
    stopped = re.fullmatch(
        rf"stopped at step (\d+) by {sig.name}; checkpoint saved; rerun the same command to "
        "resume",
        last_line(out),
    )
    assert stopped, out[-3000:]
    step = int(stopped.group(1))
    assert checkpoint_steps(workdir)[-1] == step
    return step, out


def test_sigterm_saves_and_the_rerun_continues_exactly(small_data_dir, reference_run, tmp_path):
    workdir = str(tmp_path / "w")
    step, _ = stop_by_signal(workdir, small_data_dir, signal.SIGTERM)
    assert not os.path.exists(os.path.join(workdir, "report.md"))

    code, out = run_cli(workdir, small_data_dir)
    assert code == 0, out[-3000:]
    assert f"Resuming from the checkpoint of step {step} " in out
    final_step, resumed = latest_checkpoint(workdir)
    assert final_step == 8
    assert_trees_close(resumed, latest_checkpoint(reference_run)[1], rtol=0, atol=0)


def test_sigint_saves_with_a_one_line_message(small_data_dir, tmp_path):
    _, out = stop_by_signal(str(tmp_path / "w"), small_data_dir, signal.SIGINT)
    assert "Traceback" not in out


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


def test_processes_of_a_multi_process_run_stop_at_the_same_step(small_data_dir, tmp_path):
    """SIGTERM to one of two processes: both save and stop at one step; a relaunch resumes."""
    workdir = str(tmp_path / "w")

    def launch_pair():
        port = free_port()
        return [
            launch(
                workdir,
                small_data_dir,
                f"--config.distributed.coordinator_address=127.0.0.1:{port}",
                "--config.distributed.num_processes=2",
                f"--config.distributed.process_id={i}",
            )
            for i in range(2)
        ]

    first, second = launch_pair()
    try:
        for line in first.stdout:  # only process 0 prints progress
            if re.match(r"\[tce\] step \d+/", line):
                second.send_signal(signal.SIGTERM)
                break
    finally:
        results = [finish(first), finish(second)]
    messages = set()
    for code, out in results:
        assert code == 128 + signal.SIGTERM, out[-3000:]
        messages.add(last_line(out))
    [message] = messages  # the same step on both
    stopped = re.fullmatch(r"stopped at step (\d+) by SIGTERM.*; checkpoint saved; .*", message)
    assert stopped, message
    step = int(stopped.group(1))
    assert checkpoint_steps(workdir)[-1] == step

    results = [finish(proc) for proc in launch_pair()]
    for code, out in results:
        assert code == 0, out[-3000:]
    assert f"Resuming from the checkpoint of step {step} " in results[0][1]
    assert latest_checkpoint(workdir)[0] == 8
