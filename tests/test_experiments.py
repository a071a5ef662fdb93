"""The experiment scripts: the sweep's plan and skip-finished logic (with a fake trainer), the
config a sweep run trains with, and the report on fabricated workdirs (numbers checked by hand).
"""

import io
import json
import math
import os
import pathlib
import sys
import textwrap

import numpy as np
import pytest

from experiments import (
    demo,
    report,
    report_plots,
    report_render,
    report_runs,
    report_stats,
    sweep,
    train_run,
)

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
        json.dump({"validation": {"miou": 0.5, "worst_iou": 0.1, "image_miou": 0.4}}, f)
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


def test_demo_runs_through_the_sweep_and_tabulates_the_finished_runs(tmp_path, fake_runner):
    """The demo's two runs (its budget, the data dir) go through the sweep; its table reads each
    run's final_metrics.json (NaN for a figure the file lacks)."""
    runs = demo.demo_runs(None, "/data")
    assert [r.name for r in runs] == ["ce/seed0", "tce/seed0"]
    assert {r.overrides["loss.name"] for r in runs} == {"ce", "tce"}
    for run in runs:
        assert run.overrides["num_train_steps"] == demo.BUDGET["num_train_steps"]
        assert run.overrides["data.data_dir"] == "/data"
    assert demo.demo_runs(7, "")[0].overrides["num_train_steps"] == 7
    workdir = tmp_path / "demo"
    result = sweep.execute(str(workdir), runs, runner=fake_runner, poll_s=0.02,
                           compile_cache=False, stream=io.StringIO())
    assert sorted(result["ran"]) == ["ce/seed0", "tce/seed0"]
    figures = demo.final_figures(sweep.run_dir(str(workdir), runs[0]), "validation", ["a", "b"])
    assert figures["miou"] == 0.5 and figures["worst_iou"] == 0.1
    assert math.isnan(figures["pixel_accuracy"]) and all(math.isnan(x) for x in figures["iou"])
    assert figures["image_miou"] == 0.4 and "class_miou" not in figures  # only those it has


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
# Student's t quantiles t(0.975, df) from a printed table (an independent reference).
T_975 = {1: 12.7062, 2: 4.3027, 4: 2.7764, 9: 2.2622, 29: 2.0452}


def fake_run(root, arm, seed, loss, val, test, t=None, per_class=None, steps=(10, 20),
             data=None, test_figures=None, **cfg):
    """A finished workdir: config.json, final_metrics.json, train_metrics.jsonl.

    ``val``/``test``: (mIoU, worst-class IoU); worst-25% mIoU is worst + 0.01 unless
    ``test_figures`` sets the test split's figures.
    """
    path = os.path.join(root, arm, f"seed{seed}")
    os.makedirs(path, exist_ok=True)
    config = {"seed": seed, "num_train_steps": 20,
              "data": {"name": "fake", "data_dir": f"/data/{seed}", "crop_size": [8, 8],
                       **(data or {})},
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
        json.dump({"validation": figures(*val), "test": {**figures(*test),
                                                         **(test_figures or {})}}, f)
    with open(os.path.join(path, "train_metrics.jsonl"), "w") as f:
        for step in steps:
            record = {"step": step, "train/loss": 1.0 / step}
            record.update({f"train/class_loss/{c}": step * (i + 1) + seed
                           for i, c in enumerate(CLASSES)})
            if loss not in ("focal", "lovasz"):
                record.update({f"train/class_weight/{c}": 1 / 3 for c in CLASSES})
            f.write(json.dumps(record) + "\n")
    return path


def table_rows(text, heading):
    """The cells of each body row of the first table under the heading starting ``heading``."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"## {heading}"))
    body = []
    for line in lines[start + 1:]:
        if line.startswith("## "):
            break
        if line.startswith("|"):
            body.append([c.strip() for c in line.strip("|").split("|")])
    return body[2:]  # without the header and the rule


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


# The study's arms (experiments/grids/embedded.py), as (run dir, loss, t, loss fields, data).
STUDY_ARMS = (
    ("ce", "ce", None, {}, {}),
    ("tce_t1", "tce", 1.0, {}, {}),
    ("tce_t2", "tce", 2.0, {}, {}),
    ("tce_t5", "tce", 5.0, {}, {}),
    ("stochastic_tce_ema", "stochastic_tce", 2.0, {"estimator": "ema"}, {}),
    ("stochastic_tce_tilted", "stochastic_tce", 2.0, {"estimator": "tilted"}, {}),
    ("stochastic_tce_sampling", "stochastic_tce", 2.0, {"estimator": "tilted", "batch_loss": "ce"},
     {"class_aware_sampling": True, "sampling_prior": "uniform", "sampling_mix": 0.5,
      "sampling_refresh_steps": 20}),
    ("tce_uniform_t1", "tce", 1.0, {"class_weighting": "uniform"}, {}),
    ("weighted_ce_median", "weighted_ce", None, {"class_weights": "median_frequency"}, {}),
    ("lovasz", "lovasz", None, {}, {}),
)
CE_MIOU, CE_WORST = (0.50, 0.52, 0.54), (0.10, 0.12, 0.14)
# Per-seed test differences from CE (mIoU, worst-class IoU; worst-25% mIoU follows the latter).
STUDY_DIFFERENCES = {
    "ce": ((0.0, 0.0, 0.0), (0.0, 0.0, 0.0)),
    "tce_t2": ((0.02, -0.01, 0.05), (0.06, 0.07, 0.08)),
    "weighted_ce_median": ((-0.10, -0.11, -0.12), (0.0, 0.01, -0.01)),
    "lovasz": ((0.01, 0.03), (0.0, 0.0)),  # no seed 2: unpaired
}
VALIDATION_MIOU = {"tce_t1": 0.60, "tce_t2": 0.65, "tce_t5": 0.55}


@pytest.fixture
def fabricated_study(tmp_path):
    """The study's 10 arms; TCE t=2 best on validation, t=1 on test; Lovász lacks seed 2.

    The config of TCE t=1 seed 0 names the loss fields that the other runs' config.json lack
    (an older config): with the defaults filled in, they are one arm.
    """
    root = str(tmp_path / "study")
    for arm, loss, t, fields, data in STUDY_ARMS:
        miou_d, worst_d = STUDY_DIFFERENCES.get(arm, ((0.01, 0.02, 0.03), (0.0, 0.0, 0.0)))
        for seed in range(len(miou_d)):
            miou, worst = CE_MIOU[seed] + miou_d[seed], CE_WORST[seed] + worst_d[seed]
            if arm == "tce_t1":
                miou = 0.80  # best on test, not selected
            if arm == "tce_t1" and seed == 0:
                fields = {"estimator": "ema", "class_weighting": "frequency", "tau": 0.0}
            per_class = (0.9, 0.3 + 0.05 * (seed + 1), 0.1) if arm == "tce_t2" else None
            fake_run(root, arm, seed, loss, t=t, val=(VALIDATION_MIOU.get(arm, 0.5), 0.1),
                     test=(miou, worst), per_class=per_class, data=data, **fields)
    return root


def test_report_groups_selects_on_validation_and_aggregates(fabricated):
    runs, unfinished = report_runs.find_runs(fabricated)
    assert len(runs) == 10 and unfinished == [os.path.join(fabricated, "ce", "seed9")]
    arms = report_runs.group_runs(runs)
    assert [a.name for a in arms] == ["CE", "TCE, t=1", "TCE, t=2", "focal"]
    assert [a.seeds for a in arms] == [[0, 1, 2], [0, 1, 2], [0, 1, 2], [0]]
    ce, tce1, tce2, focal = arms
    # mean and sample std (ddof=1) over the seeds
    mean, std, n = ce.stat("test", "miou")
    assert (n, mean) == (3, pytest.approx(0.51)) and std == pytest.approx(0.02)
    assert tce1.stat("test", "iou/pole") == (pytest.approx(0.5), pytest.approx(0.1), 3)
    assert np.isnan(focal.stat("test", "miou")[1])  # one seed: no std

    chosen = report_runs.select(arms, "validation", "miou")
    assert chosen["TCE"] is tce1  # validation picks t=1 although t=2 is better on test
    assert report_runs.select(arms, "validation", "worst_iou")["TCE"] is tce2
    assert report_runs.select(arms, "validation", "iou_std")["TCE"] is tce1  # ties: the first

    text = report_render.render_markdown(arms, chosen, select_split="validation",
                                         report_split="test", metric="miou", title="T",
                                         unfinished=unfinished)
    rows = table_rows(text, "Selected configurations")
    # loss, selected, seeds, mIoU, pixel acc., IoU std, worst IoU, worst-25%
    assert rows[1] == ["TCE", "t=1 (of 2)", "3", "62.0 ± 2.0", "90.0 ± 0.0", "20.0 ± 0.0",
                       "11.0 ± 1.0", "12.0 ± 1.0"]
    row = next(r for r in table_rows(text, "Per-class IoU (") if r[0] == "pole")
    assert row == ["pole", "30.0 ± 0.0", "50.0 ± 10.0", "30.0"]
    assert "t=1 (selected)" in text and "t=2 (selected)" not in text
    assert "seed9" in text and "Warning" not in text


def test_report_shows_fine_grained_columns_where_runs_have_them(fabricated):
    for seed, image_miou in enumerate((0.40, 0.42, 0.44)):  # CE runs evaluated with them
        fake_run(fabricated, "ce", seed, "ce", val=(0.5, 0.05), test=(0.49, 0.04),
                 test_figures={"image_miou": image_miou, "class_miou": 0.3})
    arms = report_runs.group_runs(report_runs.find_runs(fabricated)[0])
    chosen = report_runs.select(arms, "validation", "miou")
    assert report_render.summary_columns(arms, "validation") == report_render.SUMMARY
    text = report_render.render_markdown(arms, chosen, select_split="validation",
                                         report_split="test", metric="miou", title="T")
    rows = table_rows(text, "Selected configurations")
    # ..., worst-25% mIoU, mIoU^I, mIoU^C (no run has the worst-5% figures: no column)
    assert rows[0][-3:] == ["5.0 ± 0.0", "42.0 ± 2.0", "30.0 ± 0.0"]
    assert rows[1][-2:] == ["n/a", "n/a"]  # TCE's runs predate them
    assert "| mIoU^I | mIoU^C |" in text and "worst-5% mIoU^I" not in text


def test_report_warns_when_arms_differ_outside_the_loss(fabricated):
    path = fake_run(fabricated, "ce_long", 0, "ce", val=(0.6, 0.1), test=(0.6, 0.1))
    config_path = pathlib.Path(path, "config.json")
    config = json.loads(config_path.read_text())
    config["num_train_steps"] = 40
    config_path.write_text(json.dumps(config))
    arms = report_runs.group_runs(report_runs.find_runs(fabricated)[0])
    assert [a.name for a in arms if a.loss == "ce"] == ["CE (num_train_steps=20)",
                                                        "CE (num_train_steps=40)"]
    text = report_render.render_markdown(arms, report_runs.select(arms, "validation", "miou"),
                                         select_split="validation", report_split="test",
                                         metric="miou", title="T")
    assert "Warning" in text and "`num_train_steps`" in text
    assert "Paired differences from CE (num_train_steps=20)" in text


def test_report_does_not_warn_about_the_samplers_fields(fabricated):
    """`data.sampling` and the samplers' own fields (Rare Class Sampling, repeat-factor) are
    part of the method compared, like the loss: arms that differ only there are like for like."""
    fake_run(fabricated, "ce_rcs", 0, "ce", val=(0.6, 0.1), test=(0.6, 0.1),
             data={"sampling": "rcs", "rcs_temperature": 0.01})
    fake_run(fabricated, "ce_rfs", 0, "ce", val=(0.6, 0.1), test=(0.6, 0.1),
             data={"sampling": "repeat_factor", "repeat_factor_threshold": 1.0})
    arms = report_runs.group_runs(report_runs.find_runs(fabricated)[0])
    text = report_render.render_markdown(arms, report_runs.select(arms, "validation", "miou"),
                                         select_split="validation", report_split="test",
                                         metric="miou", title="T")
    assert "CE (Rare Class Sampling)" in text and "CE (repeat-factor sampling)" in text
    assert "Warning" not in text


def test_report_families_match_the_study(fabricated_study):
    arms = report_runs.group_runs(report_runs.find_runs(fabricated_study)[0])
    assert [a.name for a in arms] == [
        "CE",
        "TCE, t=1",
        "TCE, t=2",
        "TCE, t=5",
        "TCE (uniform prior), t=1",
        "Stochastic TCE (EMA), t=2",
        "Stochastic TCE (tilted estimate), t=2",
        "Stochastic TCE (TERM: tilted sampling, CE batch loss), t=2",
        "weighted CE (median frequency)",
        "Lovász-softmax",
    ]
    # The older config of TCE t=1 seed 0 joined the others (missing fields take the defaults).
    assert [len(a.runs) for a in arms] == [3] * 9 + [2]
    chosen = report_runs.select(arms, "validation", "miou")
    assert len(chosen) == 8 and chosen["TCE"] is arms[2]  # t=2 on validation; t=1 wins on test
    assert [a.family_size for a in report_runs.selected_arms(arms, chosen)] == [1, 3] + [1] * 6
    assert report_runs.reference_arm(arms, chosen) is arms[0]
    text = report_render.render_markdown(arms, chosen, select_split="validation",
                                         report_split="test", metric="miou", title="T")
    # The sampler's fields belong to the method: no like-for-like warning.
    assert "Warning" not in text
    assert "TCE, t=2 was selected among 3 values of t by validation mIoU" in text


def test_t_quantiles_match_the_printed_table():
    for df, value in T_975.items():
        assert report_stats.t_quantile(df) == pytest.approx(value, abs=1e-4)


def hand_interval(diffs):
    """Mean and 95% t-interval of the differences, from the printed t table."""
    n = len(diffs)
    mean = sum(diffs) / n
    s = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    half = T_975[n - 1] * s / math.sqrt(n)
    return mean, mean - half, mean + half


def test_report_paired_differences_and_intervals(fabricated_study):
    arms = {a.name: a for a in report_runs.group_runs(report_runs.find_runs(fabricated_study)[0])}
    ce, tce, weighted, lovasz = (arms[n] for n in ("CE", "TCE, t=2",
                                                    "weighted CE (median frequency)",
                                                    "Lovász-softmax"))
    cases = [
        (tce, "miou", [0.02, -0.01, 0.05], False),  # mean +2.0, interval about [-5.5, +9.5]
        (tce, "worst25_miou", [0.06, 0.07, 0.08], True),  # [+4.5, +9.5]
        (weighted, "miou", [-0.10, -0.11, -0.12], True),  # below 0
        (lovasz, "miou", [0.01, 0.03], False),  # two pairs: t(0.975, 1) = 12.71
        (tce, "iou/pole", [0.05, 0.10, 0.15], False),
    ]
    for arm, key, diffs, excludes in cases:
        seeds, values = report_stats.paired_differences(arm, ce, "test", key)
        assert seeds == list(range(len(diffs)))
        np.testing.assert_allclose(values, diffs, atol=1e-12)
        iv = report_stats.difference(arm, ce, "test", key)
        mean, low, high = hand_interval(diffs)
        assert (iv.n, iv.excludes_zero) == (len(diffs), excludes)
        assert (iv.mean, iv.low, iv.high) == (pytest.approx(mean), pytest.approx(low, abs=1e-4),
                                              pytest.approx(high, abs=1e-4))
    assert report_stats.paired_seeds(lovasz, ce) == [0, 1]
    one = report_stats.t_interval([0.3])
    assert one.n == 1 and np.isnan(one.low) and not one.excludes_zero

    chosen = report_runs.select(list(arms.values()), "validation", "miou")
    text = report_render.render_markdown(list(arms.values()), chosen, select_split="validation",
                                         report_split="test", metric="miou", title="T")
    rows = {r[0] + r[1]: r for r in table_rows(text, "Paired differences")}
    # loss, configuration, pairs, mIoU, pixel acc., IoU std, worst-class IoU, worst-25% mIoU
    assert rows["TCEt=2 (of 3)"] == ["TCE", "t=2 (of 3)", "3 (0, 1, 2)", "+2.0 [-5.5, +9.5]",
                                     "+0.0 [+0.0, +0.0]", "+0.0 [+0.0, +0.0]",
                                     "**+7.0 [+4.5, +9.5]**", "**+7.0 [+4.5, +9.5]**"]
    assert rows["Lovász-softmax-"][2:4] == ["2 (0, 1)", "+2.0 [-10.7, +14.7]"]
    assert rows["weighted CE (median frequency)-"][3] == "**-11.0 [-13.5, -8.5]**"
    pole = next(r for r in table_rows(text, "Per-class IoU, paired") if r[0] == "pole")
    assert pole[1] == "+10.0 [-2.4, +22.4]"
    summary = text[text.index("## Summary"):text.index("## Paired")]
    assert ("* **TCE, t=2** (3 pairs): worst-25% mIoU: higher than CE (interval excludes 0: "
            "+7.0 [+4.5, +9.5] pp); mIoU: not shown (interval contains 0: +2.0 [-5.5, +9.5] pp)."
            in summary)
    assert ("* **weighted CE (median frequency)** (3 pairs): worst-25% mIoU: not shown "
            "(interval contains 0: +0.0 [-2.5, +2.5] pp); mIoU: lower than CE (interval excludes "
            "0: -11.0 [-13.5, -8.5] pp)." in summary)
    assert summary.count("\n* **") == 7  # every selected arm but CE


def test_pareto_front_of_the_means():
    points = [(50, 10), (55, 8), (52, 12), (49, 9), (55, 7), (52, 12)]
    # (50, 10), (49, 9) and (55, 7) are dominated; equal points both stay.
    assert report_plots.pareto_front(points) == [2, 5, 1]


def test_report_training_curves_average_seeds(fabricated):
    arms = report_runs.group_runs(report_runs.find_runs(fabricated)[0])
    steps, curves = report_plots.training_curves(arms[1], "class_loss")
    np.testing.assert_array_equal(steps, [10, 20])
    np.testing.assert_allclose(curves["pole"], [20 + 1, 40 + 1])  # mean of seeds 0, 1, 2
    assert report_plots.training_curves(arms[3], "class_weight")[1] == {}


def check_pngs(figures, prefix):
    for name in ("per_class_iou.png", "frontier.png", "curves.png"):
        path = figures / f"{prefix}{name}"
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert path.stat().st_size < 300_000


def test_report_command_line_writes_tables_json_and_plots(fabricated, tmp_path, capsys):
    out = tmp_path / "results" / "study.md"
    figures = tmp_path / "figures"
    code = report.main([f"--workdir={fabricated}", f"--out={out}", f"--figures={figures}",
                        "--prefix=x_", "--title=Fake study"])
    assert code == 0
    assert out.read_text().startswith("# Fake study")
    summary = json.loads((tmp_path / "results" / "study.json").read_text())
    selected = [a for a in summary["arms"] if a["selected"]]
    assert [(a["family"], a["label"]) for a in selected] == [("CE", ""), ("TCE", "t=1"),
                                                            ("focal", "")]
    tce = selected[1]["figures"]["test"]["worst_iou"]
    assert tce["mean"] == pytest.approx(0.11) and tce["n"] == 3
    assert selected[2]["figures"]["test"]["miou"]["std"] is None
    assert selected[0]["runs"] == ["ce/seed0", "ce/seed1", "ce/seed2"]
    check_pngs(figures, "x_")
    assert report.main([f"--workdir={tmp_path / 'empty'}"]) == 1
    assert report.main([f"--workdir={fabricated}", "--report_split=train"]) == 1
    assert "split 'train' missing" in capsys.readouterr().err


def test_report_command_line_on_the_study(fabricated_study, tmp_path):
    out = tmp_path / "study.md"
    figures = tmp_path / "figures"
    assert report.main([f"--workdir={fabricated_study}", f"--out={out}",
                        f"--figures={figures}", "--prefix=s_"]) == 0
    summary = json.loads((tmp_path / "study.json").read_text())
    assert summary["reference"] == "CE" and summary["confidence"] == 0.95
    arms = {a["name"]: a for a in summary["arms"]}
    paired = arms["TCE, t=2"]["difference_from_reference"]["test"]["worst25_miou"]
    mean, low, high = hand_interval([0.06, 0.07, 0.08])
    assert paired["seeds"] == [0, 1, 2] and paired["n"] == 3 and paired["excludes_zero"]
    np.testing.assert_allclose(paired["differences"], [0.06, 0.07, 0.08], atol=1e-12)
    assert (paired["mean"], paired["ci_low"], paired["ci_high"]) == (
        pytest.approx(mean), pytest.approx(low, abs=1e-4), pytest.approx(high, abs=1e-4))
    assert arms["Lovász-softmax"]["difference_from_reference"]["test"]["miou"]["seeds"] == [0, 1]
    assert "difference_from_reference" not in arms["CE"]
    # The arm's own interval (the frontier plot's error bars).
    own = arms["CE"]["figures"]["test"]["miou"]
    assert (own["ci_low"], own["ci_high"]) == (
        pytest.approx(0.52 - 4.3027 * 0.02 / math.sqrt(3), abs=1e-4),
        pytest.approx(0.52 + 4.3027 * 0.02 / math.sqrt(3), abs=1e-4))
    assert {(s["arm"], s["figure"]): s["result"] for s in summary["summary"]}[
        ("weighted CE (median frequency)", "miou")] == "lower"
    check_pngs(figures, "s_")


def test_read_jsonl_keeps_the_last_record_of_a_step(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 1, "a": 1}\n{"step": 2, "a": 2}\n{"step": 2, "a": 3}\n')
    records = report_plots.records_by_step(str(path))
    assert list(records.values()) == [{"step": 1, "a": 1}, {"step": 2, "a": 3}]


def test_family_names_of_the_field_methods_and_samplers():
    from experiments.report_runs import describe_family

    assert describe_family({"loss.name": "ohem"}) == "OHEM CE"
    assert describe_family({"loss.name": "ce", "data.sampling": "rcs"}) == (
        "CE (Rare Class Sampling)"
    )
    assert describe_family(
        {"loss.name": "tce", "loss.class_weighting": "frequency", "data.sampling": "rcs"}
    ) == "TCE (Rare Class Sampling)"
    assert describe_family({"loss.name": "ce", "data.sampling": "repeat_factor"}) == (
        "CE (repeat-factor sampling)"
    )
    tilted = {
        "loss.name": "stochastic_tce",
        "loss.estimator": "ema",
        "loss.batch_loss": "tilted",
        "loss.class_weighting": "frequency",
    }
    # Runs written before data.sampling existed, and runs that name the sampler, read the same.
    assert describe_family({**tilted, "data.class_aware_sampling": True}) == describe_family(
        {**tilted, "data.class_aware_sampling": False, "data.sampling": "tilted"}
    ) == "Stochastic TCE (EMA, tilted sampling)"
