"""End-to-end training: the loss falls, reports are written, resume is exact, jit == pmap."""

import glob
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import run_utils
from run_utils import assert_trees_close, latest_checkpoint, read_jsonl

from configs import default
from tce_jax import metrics, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(data_dir, variant="tce", **overrides):
    config = default.get_config(f"{variant},tiny")
    config.data.data_dir = data_dir
    return run_utils.set_fields(config, **overrides)


@pytest.fixture(scope="module")
def stochastic_run(small_data_dir, tmp_path_factory):
    """A finished 6-step Stochastic TCE run with tilted class-aware sampling (checkpoints at
    steps 3 and 6; the sampling probabilities are refreshed every 2 steps), profiling steps 3
    and 4 (after the profiler's 2 warm-up steps)."""
    workdir = str(tmp_path_factory.mktemp("stochastic"))
    config = tiny_config(
        small_data_dir,
        "stochastic_tce",
        **{"data.class_aware_sampling": True, "profile_steps": 2},
    )
    evaluations = []  # (split, step) of every evaluation the run made
    evaluate = train.Trainer.evaluate

    def counted(trainer, state, split):
        evaluations.append((split, int(trainer.parallel.current_step(state))))
        return evaluate(trainer, state, split)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train.Trainer, "evaluate", counted)
        results = train.train_and_evaluate(config, workdir)
    return config, workdir, results, evaluations


def test_each_split_is_evaluated_once_per_evaluated_step(stochastic_run):
    """The final report takes the last step's validation figures from training instead of
    evaluating the split again."""
    *_, evaluations = stochastic_run
    assert evaluations == [("validation", 3), ("validation", 6), ("test", 6)]


def test_run_writes_logs_reports_and_checkpoints(stochastic_run):
    config, workdir, results, _ = stochastic_run
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
    # The fine-grained figures: in every eval line, final_metrics.json and report.md.
    assert all(0.0 <= e["image_miou"] <= 1.0 and "class_miou_worst5" in e for e in evals)
    with open(os.path.join(workdir, "final_metrics.json")) as f:
        final = json.load(f)
    for split in ("validation", "test"):
        assert set(metrics.FINE_GRAINED_KEYS) <= set(final[split]), split
        assert results[split]["num_images"] > 0
    with open(os.path.join(workdir, "report.md")) as f:
        assert "## Fine-grained IoU over the" in f.read()
    train_lines = read_jsonl(os.path.join(workdir, "train_metrics.jsonl"))
    assert "train/class_weight/road" in train_lines[-1]
    step, state = latest_checkpoint(workdir)
    assert step == 6
    assert int(state["step"]) == 6
    assert np.asarray(state["tce_state"]["seen"]).any()


def test_run_writes_a_profile_trace(stochastic_run):
    _, workdir, *_ = stochastic_run
    traces = glob.glob(os.path.join(workdir, "plugins", "profile", "*", "*.xplane.pb"))
    assert len(traces) == 1, os.listdir(workdir)


def test_resume_after_interruption_is_exact(stochastic_run, tmp_path):
    config, workdir, *_ = stochastic_run
    _, uninterrupted = latest_checkpoint(workdir)
    # A run killed after step 3: only the step-3 checkpoint survives.
    resumed_dir = str(tmp_path / "resumed")
    shutil.copytree(workdir, resumed_dir)
    shutil.rmtree(os.path.join(resumed_dir, "checkpoints", "6"))
    # Resumed without profiling (a field a resume may change): a trace costs seconds.
    config = run_utils.set_fields(config.copy_and_resolve_references(), profile_steps=0)
    train.train_and_evaluate(config, resumed_dir)
    step, resumed = latest_checkpoint(resumed_dir)
    assert step == 6
    assert_trees_close(resumed, uninterrupted, rtol=0, atol=0)
    probs = np.asarray(uninterrupted["sampling_probs"])
    assert probs.shape == (2, 11) and np.allclose(probs.sum(axis=1), 1.0)
    assert not np.allclose(probs[1], 1 / 11)  # refreshed from the Stochastic TCE weights


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


def test_evaluate_best_after_a_restart_restores_the_best_evaluated_step(
    small_data_dir, tmp_path, capsys
):
    """Checkpoints saved with given validation mIoUs, across a restart that keeps one latest
    step: `--checkpoint=best` restores the best one, which was not deleted."""
    config = tiny_config(small_data_dir, "tce", keep_checkpoints=1)
    config.data.final_eval_splits = ("validation",)
    workdir = str(tmp_path)
    trainer = train.Trainer(config, workdir)
    best = trainer.initial_state()
    other = best.replace(params=jax.tree.map(jnp.negative, best.params))  # another model
    trainer.save(best, 3, {"miou": 0.5})
    trainer.save(other, 6, {"miou": 0.1})
    trainer.manager.close()
    trainer = train.Trainer(config, workdir)  # a resumed run
    trainer.save(other, 9, None)  # a checkpoint between evaluations
    trainer.save(other, 12, {"miou": 0.2})
    trainer.manager.close()
    expected = trainer.evaluate(best, "validation")
    capsys.readouterr()

    results = train.evaluate(config, workdir, checkpoint="best")
    steps = sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())
    assert steps == [3, 12]
    np.testing.assert_array_equal(results["validation"]["confusion"], expected["confusion"])
    assert "Evaluating the checkpoint of step 3 (best)" in capsys.readouterr().out


def test_segformer_trains_on_the_embedded_data_from_the_command_line(small_data_dir, tmp_path):
    """`configs/default.py:segformer,tiny`: SegFormer-B0 from scratch, through the command line
    (a process of its own on one device: half the CPU time of a run on this process's eight),
    to its final metrics."""
    workdir = tmp_path / "segformer"
    flags = run_utils.run_flags(workdir, small_data_dir, config="default.py:segformer,tiny")
    result = run_utils.run_main(*flags)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    with open(workdir / "final_metrics.json") as f:
        final = json.load(f)
    assert 0.0 <= final["validation"]["miou"] <= 1.0, final
    assert [e["step"] for e in read_jsonl(workdir / "metrics.jsonl")] == [3, 6]
    losses = [line["train/loss"] for line in read_jsonl(workdir / "train_metrics.jsonl")]
    assert losses and all(np.isfinite(losses))
    step, state = latest_checkpoint(workdir)
    assert step == 6 and set(state["params"]) == {"backbone", "decode_head"}
