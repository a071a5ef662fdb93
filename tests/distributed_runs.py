"""Command-line runs on any number of fake CPU devices and processes, for the distributed tests.

Every run trains the same tiny Stochastic TCE config with `data.num_shards=2`, so runs of any
layout see the same global batches. Runs are processes of the real CLI (`run_utils.start_main`)
with their own fake CPU device count (multi-process runs use JAX's CPU collectives on
127.0.0.1), or the CLI inside the test process on its 8 devices (`run_in_process`).
"""

import json
import os
import subprocess

from run_utils import (
    latest_checkpoint,
    read_jsonl,
    run_flags,
    run_main_in_process,
    start_processes,
)

# Plain SGD with a small step: Adam's m / sqrt(v) turns float32 rounding differences in
# near-zero gradients into parameter differences of the size of the learning rate, and large
# steps amplify them from step to step; both would force tolerances that hide real errors.
CONFIG = "default.py:stochastic_tce,tiny"
SGD = ("--config.optimizer.name=sgd", "--config.optimizer.learning_rate=0.01")


def flags(workdir, data_dir, overrides=()) -> list[str]:
    return run_flags(workdir, data_dir, "--config.data.num_shards=2", *overrides, config=CONFIG)


def start(workdir, data_dir, *, devices, processes=1, overrides=()):
    """Starts every process of one run (output and errors together); returns their Popen
    objects."""
    return start_processes(
        *flags(workdir, data_dir, overrides),
        count=processes,
        devices=devices,
        stderr=subprocess.STDOUT,
    )


def run_in_process(workdir, data_dir, overrides=()):
    """The run inside the test process (its 8 devices)."""
    result = run_main_in_process(*flags(workdir, data_dir, overrides))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]


def read_run(workdir):
    """(loss curve, final metrics, state of the latest checkpoint). A step logged twice (by a
    process killed after its last checkpoint, then by the relaunch that redid the step) counts
    once, as logged last."""
    lines = read_jsonl(os.path.join(workdir, "train_metrics.jsonl"))
    losses = {line["step"]: line["train/loss"] for line in lines}
    curve = [losses[step] for step in sorted(losses)]
    with open(os.path.join(workdir, "final_metrics.json")) as f:
        final = json.load(f)
    return curve, final, latest_checkpoint(workdir)[1]
