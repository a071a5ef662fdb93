"""End-to-end training: the loss falls, reports are written, resume is exact, jit == pmap."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import default
from tce_jax import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(data_dir, variant="tce", **overrides):
    config = default.get_config(f"{variant},tiny")
    config.data.data_dir = data_dir
    for key, value in overrides.items():
        node = config
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def final_params(workdir):
    manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"))
    step = manager.latest_step()
    restored = manager.restore(step, args=ocp.args.StandardRestore())
    manager.close()
    return step, restored


def assert_trees_close(a, b, **tol):
    flat_a, flat_b = _leaves(a), _leaves(b)
    assert flat_a.keys() == flat_b.keys()
    for key in flat_a:
        np.testing.assert_allclose(flat_a[key], flat_b[key], err_msg=key, **tol)


def _leaves(tree, prefix=""):
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(_leaves(v, f"{prefix}/{k}"))
        return out
    if isinstance(tree, list | tuple):
        out = {}
        for i, v in enumerate(tree):
            out.update(_leaves(v, f"{prefix}/{i}"))
        return out
    return {} if tree is None else {prefix: np.asarray(tree)}


@pytest.fixture(scope="module")
def stochastic_run(small_data_dir, tmp_path_factory):
    """A finished 6-step Stochastic TCE run (checkpoints at steps 3 and 6)."""
    workdir = str(tmp_path_factory.mktemp("stochastic"))
    config = tiny_config(small_data_dir, "stochastic_tce")
    results = train.train_and_evaluate(config, workdir)
    return config, workdir, results


def test_run_writes_logs_reports_and_checkpoints(stochastic_run):
    config, workdir, results = stochastic_run
    assert set(results) == {"validation", "test"}
    for name in (
        "report.md",
        "per_class.csv",
        "final_metrics.json",
        "metrics.jsonl",
        "train_metrics.jsonl",
        "config.json",
        os.path.join("test", "report.md"),
    ):
        assert os.path.exists(os.path.join(workdir, name)), name
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(workdir))
    evals = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    assert [e["step"] for e in evals] == [3, 6]
    assert all(0.0 <= e["miou"] <= 1.0 for e in evals)
    train_lines = read_jsonl(os.path.join(workdir, "train_metrics.jsonl"))
    assert "train/class_weight/road" in train_lines[-1]
    step, state = final_params(workdir)
    assert step == 6
    assert int(state["step"]) == 6
    assert np.asarray(state["tce_state"]["seen"]).any()


def test_resume_after_interruption_is_exact(stochastic_run, tmp_path):
    config, workdir, _ = stochastic_run
    _, uninterrupted = final_params(workdir)
    # A run killed after step 3: only the step-3 checkpoint survives.
    resumed_dir = str(tmp_path / "resumed")
    shutil.copytree(workdir, resumed_dir)
    shutil.rmtree(os.path.join(resumed_dir, "checkpoints", "6"))
    train.train_and_evaluate(config, resumed_dir)
    step, resumed = final_params(resumed_dir)
    assert step == 6
    assert_trees_close(resumed, uninterrupted, rtol=0, atol=0)


def test_loss_falls(small_data_dir, tmp_path):
    config = tiny_config(
        small_data_dir,
        "tce",
        num_train_steps=30,
        log_every_steps=5,
        eval_every_steps=30,
        checkpoint_every_steps=30,
        **{"optimizer.learning_rate": 1e-2},
    )
    config.data.final_eval_splits = ("validation",)
    train.train_and_evaluate(config, str(tmp_path))
    lines = read_jsonl(tmp_path / "train_metrics.jsonl")
    losses = [line["train/loss"] for line in lines]
    assert len(losses) == 6
    assert losses[-1] < 0.8 * losses[0], losses


def run_cli(workdir, data_dir, devices, *overrides):
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tce_jax.main",
            "--config=configs/default.py:stochastic_tce,tiny",
            f"--workdir={workdir}",
            f"--config.data.data_dir={data_dir}",
            *overrides,
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_jit_and_pmap_on_four_devices_give_the_same_parameters(small_data_dir, tmp_path):
    runs = {
        mode: run_cli(tmp_path / mode, small_data_dir, 4, f"--config.parallelism={mode}")
        for mode in ("jit", "pmap")
    }
    for mode, proc in runs.items():
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"{mode} run failed:\n{out[-3000:]}"
    _, jit_state = final_params(str(tmp_path / "jit"))
    _, pmap_state = final_params(str(tmp_path / "pmap"))
    assert_trees_close(jit_state, pmap_state, rtol=2e-4, atol=2e-5)
    jit_eval = read_jsonl(tmp_path / "jit" / "metrics.jsonl")
    pmap_eval = read_jsonl(tmp_path / "pmap" / "metrics.jsonl")
    assert [e["miou"] for e in jit_eval] == pytest.approx([e["miou"] for e in pmap_eval], abs=1e-3)
