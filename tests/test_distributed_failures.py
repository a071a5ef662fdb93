"""Failure behaviour of multi-process runs: a coordinator that cannot be reached, a peer that
dies mid-run (the survivor ends, a relaunch resumes). Their own file so that pytest-xdist runs
them beside the layout runs of test_distributed.py, not after them.
"""

import os
import signal
import time

from distributed_runs import TIMEOUT, free_port, launch, read_run, run, wait_all


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
