"""The experiment scripts: the sweep's plan and skip-finished logic (with a fake trainer), the
config a sweep run trains with, and the report on fabricated workdirs (numbers checked by hand).
"""

import io
import json
import os
import pathlib
import sys
import textwrap

import numpy as np
import pytest

from experiments import report, sweep, train_run

# ---------------------------------------------------------------------------------------------
# Sweep.

FAKE_TRAINER = textwrap.dedent(
    """
    import json, os, sys
    run_dir = sys.argv[1]
    with open(os.path.join(run_dir, "run_spec.json")) as f:
        spec = json.load(f)
    root = os.path.dirname(os.path.dirname(run_dir))
    with open(os.path.join(root, "calls.txt"), "a") as f:
        f.write(f"{spec['arm']}/seed{spec['seed']}\\n")
    print("[tce] step 3/3  loss 0.1", flush=True)
    if spec["overrides"].get("fail"):
        sys.exit(3)
    with open(os.path.join(run_dir, "config.json"), "w") as f:
        json.dump({"seed": spec["seed"], "loss": {"name": spec["overrides"]["loss.name"]}}, f)
    with open(os.path.join(run_dir, "final_metrics.json"), "w") as f:
        json.dump({"validation": {"miou": 0.5, "worst_iou": 0.1}}, f)
    """
)


@pytest.fixture
def fake_runner(tmp_path):
    path = tmp_path / "fake_trainer.py"
    path.write_text(FAKE_TRAINER)
    return [sys.executable, str(path)]


def small_grid(**common):
    return sweep.Grid(
        config="configs/default.py",
        arms=sweep.make_arms(["ce", "tce"], [1.0, 2.5]),
        seeds=[0, 1],
        common={"num_train_steps": 3, **common},
    )


def calls(workdir):
    path = pathlib.Path(workdir, "calls.txt")
    return path.read_text().split() if path.exists() else []


def run_sweep(workdir, grid, runner, **kwargs):
    return sweep.execute(str(workdir), sweep.expand(grid), runner=runner, poll_s=0.02,
                         compile_cache=False, stream=io.StringIO(), **kwargs)


def test_make_arms_and_expand_seed_major():
    grid = small_grid()
    assert [a.name for a in grid.arms] == ["ce", "tce_t1", "tce_t2.5"]
    assert grid.arms[2].overrides == {"loss.name": "tce", "loss.t": 2.5}
    runs = sweep.expand(grid)
    assert [r.name for r in runs] == [
        "ce/seed0", "tce_t1/seed0", "tce_t2.5/seed0", "ce/seed1", "tce_t1/seed1", "tce_t2.5/seed1"
    ]
    assert runs[4].overrides == {"num_train_steps": 3, "loss.name": "tce", "loss.t": 1.0,
                                 "seed": 1}
    with pytest.raises(ValueError, match="unique"):
        sweep.expand(sweep.Grid("c.py", [sweep.Arm("a", {}), sweep.Arm("a", {})], [0]))
    with pytest.raises(ValueError, match="directory name"):
        sweep.expand(sweep.Grid("c.py", [sweep.Arm("a/b", {})], [0]))


def test_sweep_runs_everything_then_skips_finished_runs(tmp_path, fake_runner):
    workdir = tmp_path / "sweep"
    grid = small_grid()
    result = run_sweep(workdir, grid, fake_runner)
    assert len(result["ran"]) == 6 and not result["failed"]
    assert sorted(calls(workdir)) == sorted(r.name for r in sweep.expand(grid))
    spec = json.loads((workdir / "tce_t1" / "seed1" / "run_spec.json").read_text())
    assert spec["overrides"]["loss.t"] == 1.0 and spec["seed"] == 1
    assert "step 3/3" in (workdir / "tce_t1" / "seed1" / "train.log").read_text()

    # Everything finished: nothing runs again.
    result = run_sweep(workdir, grid, fake_runner)
    assert result["ran"] == [] and len(result["done"]) == 6
    assert len(calls(workdir)) == 6

    # A run interrupted before the end (no final_metrics.json) is the only one run again.
    os.remove(workdir / "tce_t2.5" / "seed0" / "final_metrics.json")
    states = sweep.plan(str(workdir), sweep.expand(grid))
    assert [r.name for r, _ in states[sweep.PARTIAL]] == ["tce_t2.5/seed0"]
    result = run_sweep(workdir, grid, fake_runner)
    assert result["ran"] == ["tce_t2.5/seed0"]
    assert calls(workdir)[-1] == "tce_t2.5/seed0" and len(calls(workdir)) == 7

    # Growing the grid (a new seed) runs only the new runs.
    grid3 = sweep.Grid(grid.config, grid.arms, [0, 1, 2], grid.common)
    result = run_sweep(workdir, grid3, fake_runner)
    assert sorted(result["ran"]) == ["ce/seed2", "tce_t1/seed2", "tce_t2.5/seed2"]


def test_sweep_refuses_conflicting_run_directories(tmp_path, fake_runner):
    workdir = tmp_path / "sweep"
    run_sweep(workdir, small_grid(), fake_runner)
    # Same arm names, different common overrides: a different experiment in the same workdir.
    changed = small_grid(num_train_steps=4)
    states = sweep.plan(str(workdir), sweep.expand(changed))
    assert len(states[sweep.CONFLICT]) == 6
    assert "num_train_steps: 3 there, 4 in the grid" in states[sweep.CONFLICT][0][1]
    with pytest.raises(RuntimeError, match="nothing was launched"):
        run_sweep(workdir, changed, fake_runner)
    assert len(calls(workdir)) == 6
    # A directory the sweep did not make is never reused.
    foreign = tmp_path / "other"
    (foreign / "ce" / "seed0").mkdir(parents=True)
    (foreign / "ce" / "seed0" / "config.json").write_text("{}")
    with pytest.raises(RuntimeError, match="not made by a sweep"):
        run_sweep(foreign, small_grid(), fake_runner)


def test_failed_runs_are_reported_and_others_continue(tmp_path, fake_runner):
    workdir = tmp_path / "sweep"
    grid = sweep.Grid(
        "configs/default.py",
        [sweep.Arm("ok", {"loss.name": "ce"}), sweep.Arm("bad", {"loss.name": "ce", "fail": 1})],
        [0],
    )
    stream = io.StringIO()
    result = sweep.execute(str(workdir), sweep.expand(grid), runner=fake_runner, poll_s=0.02,
                           compile_cache=False, stream=stream, jobs=2)
    assert result["ran"] == ["ok/seed0"] and result["failed"] == ["bad/seed0"]
    assert "FAILED bad/seed0 (exit 3)" in stream.getvalue()
    # A failed run has no final_metrics.json: the next sweep tries it again.
    states = sweep.plan(str(workdir), sweep.expand(grid))
    assert [r.name for r, _ in states[sweep.PARTIAL]] == ["bad/seed0"]


def test_command_line_dry_run_and_grid_file(tmp_path, capsys):
    grid_file = tmp_path / "grid.py"
    grid_file.write_text(textwrap.dedent(
        """
        from experiments import sweep
        def get_grid():
            return sweep.Grid("configs/default.py", sweep.make_arms(["ce", "tce"], [2]), [0, 1],
                              {"num_train_steps": 5})
        """
    ))
    code = sweep.main([f"--grid={grid_file}", f"--workdir={tmp_path / 'w'}", "--dry_run",
                       "--set=model.name=unet_small"])
    out = capsys.readouterr().out
    assert code == 0
    assert "4 runs (2 arms x 2 seeds)" in out and "new      tce_t2/seed1" in out
    assert "'model.name': 'unet_small'" in out and "'num_train_steps': 5" in out
    code = sweep.main(["--config=configs/default.py", "--losses=ce,stochastic_tce",
                       "--t=1,5", "--seeds=3", f"--workdir={tmp_path / 'w'}", "--dry_run"])
    out = capsys.readouterr().out
    assert "3 runs (3 arms x 1 seeds)" in out and "stochastic_tce_t5/seed3" in out


def test_log_progress_reads_the_last_step(tmp_path):
    log = tmp_path / "train.log"
    log.write_text("x\n[tce] step 50/300  loss 1\n[tce] step 100/300  loss 0.9\n  eval\n")
    assert sweep.log_progress(str(log)) == "step 100/300"
    assert sweep.log_progress(str(tmp_path / "missing.log")) == ""


def test_train_run_builds_the_config_the_sweep_asked_for():
    config = train_run.build_config({
        "config": "configs/default.py:ce",
        "overrides": {"num_train_steps": 7, "loss.t": 2, "data.crop_size": [32, 64],
                      "model.name": "unet_small", "loss.focal_gamma": 1.5},
    })
    assert config.loss.name == "ce" and config.num_train_steps == 7
    assert config.loss.t == 2.0 and isinstance(config.loss.t, float)
    assert tuple(config.data.crop_size) == (32, 64) and config.model.name == "unet_small"
    assert config.loss.focal_gamma == 1.5  # an optional baseline field, added if missing
    with pytest.raises(KeyError, match="no field 'loss.tt'"):
        train_run.build_config({"config": "configs/default.py", "overrides": {"loss.tt": 1.0}})
    with pytest.raises(KeyError, match="no field 'modle'"):
        train_run.build_config({"config": "configs/default.py", "overrides": {"modle.name": 1}})


# ---------------------------------------------------------------------------------------------
# Report, on fabricated workdirs.

CLASSES = ("road", "pole", "rider")


def fake_run(root, arm, seed, loss, val, test, t=None, per_class=None, steps=(10, 20), **cfg):
    """A finished workdir: config.json, final_metrics.json, train_metrics.jsonl."""
    path = os.path.join(root, arm, f"seed{seed}")
    os.makedirs(path, exist_ok=True)
    config = {"seed": seed, "num_train_steps": 20,
              "data": {"name": "fake", "data_dir": f"/data/{seed}", "crop_size": [8, 8]},
              "loss": {"name": loss, "t": 1.0 if t is None else t, **cfg}}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    per_class = per_class or (0.9, 0.3, 0.1)

    def figures(miou, worst):
        out = {"miou": miou, "pixel_accuracy": 0.9, "iou_std": 0.2, "worst_iou": worst,
               "worst25_miou": worst + 0.01}
        out.update({f"iou/{c}": v for c, v in zip(CLASSES, per_class, strict=True)})
        return out

    with open(os.path.join(path, "final_metrics.json"), "w") as f:
        json.dump({"validation": figures(*val), "test": figures(*test)}, f)
    with open(os.path.join(path, "train_metrics.jsonl"), "w") as f:
        for step in steps:
            record = {"step": step, "train/loss": 1.0 / step}
            record.update({f"train/class_loss/{c}": step * (i + 1) + seed
                           for i, c in enumerate(CLASSES)})
            if loss != "focal":
                record.update({f"train/class_weight/{c}": 1 / 3 for c in CLASSES})
            f.write(json.dumps(record) + "\n")
    return path


@pytest.fixture
def fabricated(tmp_path):
    """CE, TCE at t=1 and t=2 (t=1 better on validation, t=2 better on test), focal."""
    root = str(tmp_path / "study")
    for seed, (a, b, c) in enumerate([(0.50, 0.60, 0.70), (0.52, 0.62, 0.66), (0.54, 0.64, 0.68)]):
        fake_run(root, "ce", seed, "ce", val=(a, 0.05), test=(a - 0.01, 0.04))
        fake_run(root, "tce_t1", seed, "tce", t=1.0, val=(b + 0.1, 0.2),
                 test=(b, 0.10 + seed / 100), per_class=(0.8, 0.4 + seed / 10, 0.2))
        fake_run(root, "tce_t2", seed, "tce", t=2.0, val=(b, 0.3), test=(c, 0.3))
    fake_run(root, "focal", 0, "focal", val=(0.4, 0.0), test=(0.41, 0.0), focal_gamma=2.0)
    # An unfinished run: has a config but no final_metrics.json.
    os.makedirs(os.path.join(root, "ce", "seed9"))
    with open(os.path.join(root, "ce", "seed9", "config.json"), "w") as f:
        json.dump({"seed": 9, "loss": {"name": "ce"}}, f)
    return root


def test_report_groups_selects_on_validation_and_aggregates(fabricated):
    runs, unfinished = report.find_runs(fabricated)
    assert len(runs) == 10 and unfinished == [os.path.join(fabricated, "ce", "seed9")]
    arms = report.group_runs(runs)
    assert [a.name for a in arms] == ["CE", "TCE (t=1)", "TCE (t=2)", "focal"]
    assert [a.seeds for a in arms] == [[0, 1, 2], [0, 1, 2], [0, 1, 2], [0]]
    ce, tce1, tce2, focal = arms
    # mean and sample std (ddof=1) over the seeds
    mean, std, n = ce.stat("test", "miou")
    assert (n, mean) == (3, pytest.approx(0.51)) and std == pytest.approx(0.02)
    assert tce1.stat("test", "iou/pole") == (pytest.approx(0.5), pytest.approx(0.1), 3)
    assert np.isnan(focal.stat("test", "miou")[1])  # one seed: no std

    chosen = report.select(arms, "validation", "miou")
    assert chosen["tce"] is tce1  # validation picks t=1 although t=2 is better on test
    assert report.select(arms, "validation", "worst_iou")["tce"] is tce2
    assert report.select(arms, "validation", "iou_std")["tce"] is tce1  # ties: the first

    text = report.render_markdown(arms, chosen, select_split="validation", report_split="test",
                                  metric="miou", title="T", unfinished=unfinished)
    lines = text.splitlines()
    row = next(r for r in lines if r.startswith("| TCE ") and "t=1" in r and "selected" not in r)
    cells = [c.strip() for c in row.strip("|").split("|")]
    # loss, selected, seeds, mIoU, pixel acc., IoU std, worst IoU, worst-25%
    assert cells == ["TCE", "t=1", "3", "62.0 ± 2.0", "90.0 ± 0.0", "20.0 ± 0.0", "11.0 ± 1.0",
                     "12.0 ± 1.0"]
    row = next(r for r in lines if r.startswith("| pole "))
    assert [c.strip() for c in row.strip("|").split("|")] == [
        "pole", "30.0 ± 0.0", "50.0 ± 10.0", "30.0"]
    assert "t=1 (selected)" in text and "t=2 (selected)" not in text
    assert "seed9" in text and "Warning" not in text


def test_report_warns_when_arms_differ_outside_the_loss(fabricated):
    path = fake_run(fabricated, "ce_long", 0, "ce", val=(0.6, 0.1), test=(0.6, 0.1))
    config_path = pathlib.Path(path, "config.json")
    config = json.loads(config_path.read_text())
    config["num_train_steps"] = 40
    config_path.write_text(json.dumps(config))
    arms = report.group_runs(report.find_runs(fabricated)[0])
    assert [a.name for a in arms if a.family == "ce"] == ["CE (num_train_steps=20)",
                                                          "CE (num_train_steps=40)"]
    text = report.render_markdown(arms, report.select(arms, "validation", "miou"),
                                  select_split="validation", report_split="test", metric="miou",
                                  title="T")
    assert "Warning" in text and "`num_train_steps`" in text


def test_report_training_curves_average_seeds(fabricated):
    arms = report.group_runs(report.find_runs(fabricated)[0])
    steps, curves = report.training_curves(arms[1], "class_loss")
    np.testing.assert_array_equal(steps, [10, 20])
    np.testing.assert_allclose(curves["pole"], [20 + 1, 40 + 1])  # mean of seeds 0, 1, 2
    assert report.training_curves(arms[3], "class_weight")[1] == {}


def test_report_command_line_writes_tables_json_and_plots(fabricated, tmp_path, capsys):
    out = tmp_path / "results" / "study.md"
    figures = tmp_path / "figures"
    code = report.main([f"--workdir={fabricated}", f"--out={out}", f"--figures={figures}",
                        "--prefix=x_", "--title=Fake study"])
    assert code == 0
    assert out.read_text().startswith("# Fake study")
    summary = json.loads((tmp_path / "results" / "study.json").read_text())
    selected = [a for a in summary["arms"] if a["selected"]]
    assert [(a["family"], a["label"]) for a in selected] == [("ce", ""), ("tce", "t=1"),
                                                            ("focal", "")]
    tce = selected[1]["figures"]["test"]["worst_iou"]
    assert tce["mean"] == pytest.approx(0.11) and tce["n"] == 3
    assert selected[2]["figures"]["test"]["miou"]["std"] is None
    assert selected[0]["runs"] == ["ce/seed0", "ce/seed1", "ce/seed2"]
    for name in ("x_per_class_iou.png", "x_tradeoff.png", "x_curves.png"):
        path = figures / name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert path.stat().st_size < 200_000
    assert report.main([f"--workdir={tmp_path / 'empty'}"]) == 1
    assert report.main([f"--workdir={fabricated}", "--report_split=train"]) == 1
    assert "split 'train' missing" in capsys.readouterr().err


def test_read_jsonl_keeps_the_last_record_of_a_step(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 1, "a": 1}\n{"step": 2, "a": 2}\n{"step": 2, "a": 3}\n')
    assert report.read_jsonl(str(path)) == [{"step": 1, "a": 1}, {"step": 2, "a": 3}]
