"""Failure behaviour of multi-process runs: a coordinator that cannot be reached; a preemption
notice (SIGTERM) to one process and the death of a peer (SIGKILL), each followed by a relaunch
that resumes. Their own file so that pytest-xdist runs them beside the layout runs of
test_distributed.py, not after them.
"""

import os
import re
import signal
import time

from distributed_runs import read_run, start
from run_utils import TIMEOUT, free_port, process_flags, run_flags, start_main, wait_all


def test_a_process_that_cannot_reach_the_coordinator_fails_clearly(small_data_dir, tmp_path):
    flags = run_flags(
        tmp_path / "w", small_data_dir, "--config.distributed.initialization_timeout=2"
    )
    [result] = wait_all([start_main(*flags, *process_flags(1, 2, free_port()), devices=2)], 120)
    assert result.returncode != 0
    assert "Cannot reach the coordinator at 127.0.0.1" in result.stderr
    assert not os.path.exists(tmp_path / "w" / "checkpoints")


def checkpoint_steps(workdir) -> list[int]:
    return sorted(int(s) for s in os.listdir(workdir / "checkpoints") if s.isdigit())


def last_line(output: str) -> str:
    return output.strip().splitlines()[-1]


def test_a_preempted_or_dead_process_stops_the_run_and_a_relaunch_resumes(small_data_dir, tmp_path):
    """Two processes of two devices. SIGTERM to one: both save and stop at the same step. The
    relaunch resumes there; SIGKILL to one: the survivor ends (no hang, no success). The next
    relaunch resumes from the last committed checkpoint and finishes."""
    workdir = tmp_path / "w"
    overrides = (
        "--config.num_train_steps=12",
        "--config.eval_every_steps=12",
        "--config.log_every_steps=1",
        "--config.distributed.heartbeat_timeout=10",
    )

    def launch():
        return start(workdir, small_data_dir, devices=2, processes=2, overrides=overrides)

    # A preemption notice to process 1 once process 0 (the one that prints) trains.
    procs = launch()
    try:
        for line in procs[0].stdout:
            if re.match(r"\[\w+\] step \d+/", line):
                procs[1].send_signal(signal.SIGTERM)
                break
    finally:
        results = wait_all(procs)
    messages = set()
    for result in results:
        assert result.returncode == 128 + signal.SIGTERM, result.stdout[-3000:]
        messages.add(last_line(result.stdout))
    [message] = messages  # the same step on both
    stopped = re.fullmatch(r"stopped at step (\d+) by SIGTERM.*; checkpoint saved; .*", message)
    assert stopped, message
    preempted = int(stopped.group(1))
    assert checkpoint_steps(workdir)[-1] == preempted

    # The relaunch resumes; process 1 dies once it has saved a checkpoint of its own.
    procs = launch()
    try:
        deadline = time.monotonic() + TIMEOUT
        while checkpoint_steps(workdir)[-1] == preempted and time.monotonic() < deadline:
            assert procs[0].poll() is None, procs[0].communicate()[0][-3000:]
            time.sleep(0.2)
        procs[1].send_signal(signal.SIGKILL)
    finally:
        results = wait_all(procs, timeout=120)
    assert f"Resuming from the checkpoint of step {preempted} " in results[0].stdout
    assert results[0].returncode != 0  # the survivor does not hang or pretend success
    steps = checkpoint_steps(workdir)
    assert preempted < steps[-1] < 12

    # The next relaunch resumes from the last committed checkpoint and finishes.
    results = wait_all(launch())
    for result in results:
        assert result.returncode == 0, result.stdout[-3000:]
    assert f"Resuming from the checkpoint of step {steps[-1]} " in results[0].stdout
    curve, final, state = read_run(str(workdir))
    assert int(state["step"]) == 12
    assert "validation" in final
