"""Exactness across device and process counts, and failure behaviour of multi-process runs.

Every run trains the same tiny Stochastic TCE config for 6 steps with `data.num_shards=2`, so
all of them see the same global batches. Runs are subprocesses of the real CLI with their own
fake CPU device count; multi-process runs use JAX's CPU collectives on 127.0.0.1.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from run_utils import assert_trees_close, flat_leaves, latest_checkpoint, read_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 300
# Plain SGD with a small step: Adam's m / sqrt(v) turns float32 rounding differences in
# near-zero gradients into parameter differences of the size of the learning rate, and large
# steps amplify them from step to step; both would force tolerances that hide real errors.
SGD = ("--config.optimizer.name=sgd", "--config.optimizer.learning_rate=0.01")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(workdir, data_dir, *, devices, overrides=(), process=None):
    """Starts `python -m tce_jax.main`; `process=(id, count, port)` for multi-process runs."""
    # Fully optimised programs, as users run them: the tolerances below were measured so (the
    # test session's JAX_DISABLE_MOST_OPTIMIZATIONS changes float32 summation orders).
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", JAX_DISABLE_MOST_OPTIMIZATIONS="false")
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    args = [
        sys.executable,
        "-m",
        "tce_jax.main",
        "--config=configs/default.py:stochastic_tce,tiny",
        f"--workdir={workdir}",
        f"--config.data.data_dir={data_dir}",
        "--config.data.num_shards=2",
        *overrides,
    ]
    if process is not None:
        index, count, port = process
        args += [
            f"--config.distributed.coordinator_address=127.0.0.1:{port}",
            f"--config.distributed.num_processes={count}",
            f"--config.distributed.process_id={index}",
        ]
    return subprocess.Popen(
        args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def wait_all(procs, timeout=TIMEOUT):
    """Waits for every process; kills all of them on timeout. Returns (returncode, output)."""
    deadline = time.monotonic() + timeout
    results = []
    try:
        for proc in procs:
            out, _ = proc.communicate(timeout=max(deadline - time.monotonic(), 1))
            results.append((proc.returncode, out))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    return results


def start(workdir, data_dir, *, devices, processes=1, overrides=()):
    """Starts every process of one run; returns their Popen objects."""
    port = free_port()
    return [
        launch(
            workdir,
            data_dir,
            devices=devices,
            overrides=overrides,
            process=(i, processes, port) if processes > 1 else None,
        )
        for i in range(processes)
    ]


def run(workdir, data_dir, **layout):
    for code, out in wait_all(start(workdir, data_dir, **layout)):
        assert code == 0, out[-4000:]


def read_run(workdir):
    curve = [
        line["train/loss"] for line in read_jsonl(os.path.join(workdir, "train_metrics.jsonl"))
    ]
    with open(os.path.join(workdir, "final_metrics.json")) as f:
        final = json.load(f)
    return curve, final, latest_checkpoint(workdir)[1]


LAYOUTS = {
    "1dev": dict(devices=1),
    "4dev_jit": dict(devices=4),
    "4dev_pmap": dict(devices=4, overrides=("--config.parallelism=pmap",)),
    "2proc_x_2dev_jit": dict(devices=2, processes=2),
}


@pytest.fixture(scope="module")
def runs(small_data_dir, tmp_path_factory):
    """Every layout's run, all started at once: start-up (imports) is mostly one core's work,
    so concurrent runs share the machine's cores better than one after another."""
    base = tmp_path_factory.mktemp("layouts")
    procs = {
        name: start(
            str(base / name),
            small_data_dir,
            **{**layout, "overrides": SGD + layout.get("overrides", ())},
        )
        for name, layout in LAYOUTS.items()
    }
    results = wait_all([p for group in procs.values() for p in group], timeout=2 * TIMEOUT)
    for code, out in results:
        assert code == 0, out[-4000:]
    return {name: read_run(str(base / name)) for name in LAYOUTS}


@pytest.mark.parametrize("name", [n for n in LAYOUTS if n != "1dev"])
def test_same_numbers_for_any_device_and_process_count(runs, name):
    ref_curve, ref_final, ref_state = runs["1dev"]
    curve, final, state = runs[name]
    np.testing.assert_allclose(curve, ref_curve, rtol=1e-4)
    assert any("tce_state" in k for k in flat_leaves(state))  # Stochastic TCE state compared
    # float32 sums in another order, amplified over 6 steps: measured up to 1e-3 of a leaf's
    # scale (momentum traces); a wrong reduction (per-device statistics) is off by far more.
    assert_trees_close(state, ref_state, rtol=1e-4, scaled=5e-3)
    for split in ref_final:
        for figure in ("miou", "pixel_accuracy", "worst_iou", "iou_std"):
            assert final[split][figure] == pytest.approx(ref_final[split][figure], abs=1e-3)


def test_a_process_that_cannot_reach_the_coordinator_fails_clearly(small_data_dir, tmp_path):
    proc = launch(
        tmp_path / "w",
        small_data_dir,
        devices=2,
        process=(1, 2, free_port()),
        overrides=("--config.distributed.initialization_timeout=2",),
    )
    [(code, out)] = wait_all([proc], timeout=120)
    assert code != 0
    assert "Cannot reach the coordinator at 127.0.0.1" in out
    assert not os.path.exists(tmp_path / "w" / "checkpoints")


def test_a_dead_peer_ends_the_run_and_a_relaunch_resumes(small_data_dir, tmp_path):
    workdir = tmp_path / "w"
    overrides = (
        "--config.num_train_steps=12",
        "--config.eval_every_steps=12",
        "--config.distributed.heartbeat_timeout=10",
    )
    port = free_port()
    procs = [
        launch(workdir, small_data_dir, devices=2, overrides=overrides, process=(i, 2, port))
        for i in range(2)
    ]
    try:
        first_checkpoint = workdir / "checkpoints" / "3"
        deadline = time.monotonic() + TIMEOUT
        while not first_checkpoint.exists() and time.monotonic() < deadline:
            assert procs[0].poll() is None, procs[0].communicate()[0][-3000:]
            time.sleep(0.2)
        procs[1].send_signal(signal.SIGKILL)  # a peer dies mid-run
    finally:
        results = wait_all(procs, timeout=120)
    survivor_code, _ = results[0]
    assert survivor_code != 0  # the survivor does not hang or pretend success
    steps = sorted(int(s) for s in os.listdir(workdir / "checkpoints") if s.isdigit())
    assert steps and steps[-1] < 12
    # Relaunch: resumes from the last committed checkpoint and finishes.
    run(str(workdir), small_data_dir, devices=2, processes=2, overrides=overrides)
    curve, final, state = read_run(str(workdir))
    assert int(state["step"]) == 12
    assert "validation" in final
