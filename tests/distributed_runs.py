"""Command-line runs on any number of fake CPU devices and processes, for the distributed tests.

Every run trains the same tiny Stochastic TCE config with `data.num_shards=2`, so runs of any
layout see the same global batches. Runs are subprocesses of the real CLI with their own fake
CPU device count; multi-process runs use JAX's CPU collectives on 127.0.0.1.
"""

import json
import os
import socket
import subprocess
import sys
import time

from run_utils import latest_checkpoint, read_jsonl

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
    # Compiled as the test process compiles (JAX_DISABLE_MOST_OPTIMIZATIONS, set in conftest.py):
    # half the CPU time of a fully optimised run; every layout is compiled the same way.
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
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
