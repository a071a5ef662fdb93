"""Command-line runs on any number of fake CPU devices and processes, for the distributed tests.

Every run trains the same tiny Stochastic TCE config with `data.num_shards=2`, so runs of any
layout see the same global batches. Runs are processes of the real CLI (`run_utils.start_main`)
with their own fake CPU device count; multi-process runs use JAX's CPU collectives on 127.0.0.1.
"""

import json
import os
import subprocess

from run_utils import latest_checkpoint, read_jsonl, run_flags, start_processes, wait_all

# Plain SGD with a small step: Adam's m / sqrt(v) turns float32 rounding differences in
# near-zero gradients into parameter differences of the size of the learning rate, and large
# steps amplify them from step to step; both would force tolerances that hide real errors.
CONFIG = "default.py:stochastic_tce,tiny"
SGD = ("--config.optimizer.name=sgd", "--config.optimizer.learning_rate=0.01")


def start(workdir, data_dir, *, devices, processes=1, overrides=()):
    """Starts every process of one run (output and errors together); returns their Popen
    objects."""
    flags = run_flags(workdir, data_dir, "--config.data.num_shards=2", *overrides, config=CONFIG)
    return start_processes(*flags, count=processes, devices=devices, stderr=subprocess.STDOUT)


def run(workdir, data_dir, **layout):
    for result in wait_all(start(workdir, data_dir, **layout)):
        assert result.returncode == 0, result.stdout[-4000:]


def read_run(workdir):
    curve = [
        line["train/loss"] for line in read_jsonl(os.path.join(workdir, "train_metrics.jsonl"))
    ]
    with open(os.path.join(workdir, "final_metrics.json")) as f:
        final = json.load(f)
    return curve, final, latest_checkpoint(workdir)[1]
