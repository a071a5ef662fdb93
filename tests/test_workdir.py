"""The workdir: one writer at a time, no silent change of experiment on resume, cloud paths
written through epath (never as a local `gs:` directory), and the provenance of every start.

The command-line tests run `python -m tce_jax.main` on the tiny config: as a process of its own
(2 fake CPU devices) where the test needs one (a lock holder, provenance of a real command,
several processes), otherwise inside the test process (its 8 devices).
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import run_utils
from etils.epath import gpath as epath_gpath
from etils.epath import testing as epath_testing

from configs import default
from tce_jax import config_lib, metrics, models, workdir

ROOT = run_utils.ROOT


def run_in_process(path, data_dir, *overrides):
    """A tiny run inside the test process (its 8 devices): for the tests that need no process
    of their own."""
    return run_utils.run_main_in_process(*run_utils.run_flags(path, data_dir, *overrides))


def last_stderr_line(result) -> str:
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return result.stderr.strip().splitlines()[-1]


def dead_pid() -> int:
    """The id of a process that has exited."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def tiny_config(**fields):
    return run_utils.set_fields(default.get_config("tiny"), **fields)


@pytest.fixture(scope="module")
def finished_run(small_data_dir, tmp_path_factory):
    """A workdir of a complete tiny run (checkpoints at steps 3 and 6), run in the test process
    (its 8 devices; the tests that resume it run there too)."""
    path = tmp_path_factory.mktemp("finished") / "run"
    result = run_in_process(path, small_data_dir)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return path


# ---------------------------------------------------------------------------------------------
# One writer.


def test_a_second_trainer_is_refused_and_a_killed_ones_lock_taken_over(
    small_data_dir, tmp_path, capsys
):
    path = tmp_path / "run"
    lock_path = path / workdir.LOCK_FILE
    long_run = ("--config.num_train_steps=100000", "--config.eval_every_steps=100000")
    first = run_utils.start_main(
        *run_utils.run_flags(path, small_data_dir, *long_run),
        devices=2,
        fresh=True,  # the lock names the run's own pid
        stdout=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + run_utils.TIMEOUT
        holder = None
        while holder is None or holder.get("pid") != first.pid:
            assert first.poll() is None, f"first run ended: {first.stderr.read()[-3000:]}"
            assert time.monotonic() < deadline, "the first run never took the lock"
            time.sleep(0.5)
            if lock_path.exists():
                text = lock_path.read_text()
                holder = json.loads(text) if text.endswith("\n") else None
        second = run_in_process(path, small_data_dir)
        assert first.poll() is None  # the first still runs: the refusal was about it
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.communicate()
    assert second.returncode == 1
    assert last_stderr_line(second) == (
        f"error: workdir {path} is in use by process {first.pid} on {socket.gethostname()} "
        f"since {holder['since']}; wait for it or use another --workdir"
    )
    # The killed trainer could not remove its lock file; the next one takes it over.
    assert json.loads(lock_path.read_text())["pid"] == first.pid
    with workdir.WorkdirLock(str(path)):
        assert json.loads(lock_path.read_text())["pid"] == os.getpid()
    assert f"process {first.pid} on {socket.gethostname()}" in capsys.readouterr().out
    assert not lock_path.exists()


def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    stale = {"host": socket.gethostname(), "pid": dead_pid(), "since": "2020-01-01T00:00:00"}
    (tmp_path / workdir.LOCK_FILE).write_text(json.dumps(stale) + "\n")
    with workdir.WorkdirLock(str(tmp_path)):
        held = json.loads((tmp_path / workdir.LOCK_FILE).read_text())
        assert held["pid"] == os.getpid()
        with pytest.raises(workdir.WorkdirError, match=f"in use by process {os.getpid()}"):
            workdir.WorkdirLock(str(tmp_path)).acquire()
    assert not (tmp_path / workdir.LOCK_FILE).exists()


def test_the_lock_is_released_when_the_run_raises_and_evaluation_needs_it_too(tmp_path):
    config = tiny_config()
    with pytest.raises(RuntimeError, match="boom"):
        with workdir.open_run(config, str(tmp_path)):
            assert (tmp_path / workdir.LOCK_FILE).exists()
            raise RuntimeError("boom")
    assert not (tmp_path / workdir.LOCK_FILE).exists()
    with workdir.WorkdirLock(str(tmp_path)):
        with pytest.raises(workdir.WorkdirError, match="is in use by process"):
            with workdir.open_run(config, str(tmp_path), mode="evaluate"):
                pass


def test_only_process_0_locks_and_every_process_stops_when_it_cannot(small_data_dir, tmp_path):
    with workdir.WorkdirLock(str(tmp_path)):
        procs = run_utils.start_processes(
            *run_utils.run_flags(tmp_path, small_data_dir),
            count=2,
            devices=1,
            stdout=subprocess.DEVNULL,
        )
        results = run_utils.wait_all(procs)
    assert [r.returncode for r in results] == [1, 1]
    assert "is in use by process" in results[0].stderr.strip().splitlines()[-1]
    assert "process 0 could not open workdir" in results[1].stderr.strip().splitlines()[-1]


# ---------------------------------------------------------------------------------------------
# Resuming another experiment.


def test_resuming_another_experiment_is_refused_with_every_difference(finished_run, small_data_dir):
    kept = {name: (finished_run / name).read_text() for name in ("config.json", "metrics.jsonl")}
    result = run_in_process(
        finished_run,
        small_data_dir,
        "--config.loss.name=ce",
        "--config.data.name=street_scenes",
        "--config.num_train_steps=9",  # run length may change
    )
    assert result.returncode == 1
    assert last_stderr_line(result) == (
        f"error: workdir {finished_run} holds a checkpoint (step 6) of a different experiment; "
        "these fields differ from its config.json: data.name: 'street_scenes_small' -> "
        "'street_scenes'; loss.name: 'tce' -> 'ce'. Use the original values, another "
        "--workdir, or --allow_config_change to continue with the new ones (recorded in "
        "config_history.jsonl)."
    )
    assert {name: (finished_run / name).read_text() for name in kept} == kept


def test_allow_config_change_resumes_and_records_the_change(finished_run, small_data_dir, tmp_path):
    path = tmp_path / "run"
    shutil.copytree(finished_run, path)
    old_config = json.loads((path / "config.json").read_text())
    result = run_in_process(
        path,
        small_data_dir,
        "--config.loss.name=ce",
        "--allow_config_change",
        "--config.data.final_eval_splits=()",  # nothing left to do but the records
    )
    assert result.returncode == 0, result.stderr[-3000:]
    new_config = json.loads((path / "config.json").read_text())
    assert new_config == {
        **old_config,
        "loss": {**old_config["loss"], "name": "ce"},
        "data": {**old_config["data"], "final_eval_splits": []},
    }
    (record,) = workdir.read_jsonl(path / workdir.CONFIG_HISTORY_FILE)
    assert record["resumed_from_step"] == 6
    assert record["changes"] == {
        "data.final_eval_splits": {"old": ["validation", "test"], "new": []},
        "loss.name": {"old": "tce", "new": "ce"},
    }
    assert record["experiment_fields_changed"] == ["loss.name"]
    assert record["allowed_by"] == "--allow_config_change"
    starts = workdir.read_jsonl(path / workdir.PROVENANCE_FILE)
    assert [s["resumed_from_step"] for s in starts] == [None, 6]


def test_evaluation_does_not_refuse_a_different_config_and_records_its_start(
    finished_run, small_data_dir, tmp_path
):
    path = tmp_path / "run"
    shutil.copytree(finished_run, path)
    kept = (path / "config.json").read_text()
    result = run_in_process(
        path,
        small_data_dir,
        "--mode=evaluate",
        "--checkpoint=latest",
        "--config.data.eval_mode=sliding",
        "--config.data.final_eval_splits=()",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Note: the config differs from config.json: data.eval_mode: 'whole' -> 'sliding'" in (
        result.stdout
    )
    assert (path / "config.json").read_text() == kept
    starts = workdir.read_jsonl(path / workdir.PROVENANCE_FILE)
    assert [(s["mode"], s.get("checkpoint")) for s in starts] == [
        ("train", None),
        ("evaluate", "latest"),
    ]
    assert not (path / workdir.LOCK_FILE).exists()


def test_a_fresh_start_over_an_old_config_json_records_the_change(tmp_path):
    workdir.write_json(tmp_path / "config.json", workdir.config_to_dict(tiny_config()))
    config = tiny_config(**{"loss.name": "ce"})
    with workdir.open_run(config, str(tmp_path)):  # no checkpoint: nothing is resumed
        pass
    assert json.loads((tmp_path / "config.json").read_text())["loss"]["name"] == "ce"
    (record,) = workdir.read_jsonl(tmp_path / workdir.CONFIG_HISTORY_FILE)
    assert record["resumed_from_step"] is None
    assert record["changes"] == {"loss.name": {"old": "tce", "new": "ce"}}
    checkpoints = tmp_path / "checkpoints" / "3"  # as Orbax names a finished step
    checkpoints.mkdir(parents=True)
    with pytest.raises(workdir.WorkdirError, match="loss.name: 'ce' -> 'tce'"):
        with workdir.open_run(tiny_config(), str(tmp_path)):
            pass
    assert checkpoints.exists()


def test_run_length_and_paths_may_change_and_new_fields_at_their_defaults_are_no_change():
    old = workdir.config_to_dict(tiny_config())
    del old["loss"]["focal_gamma"]  # as if written before the field existed
    new = tiny_config(**{"num_train_steps": 60, "data.data_dir": "/elsewhere"})
    changes = workdir.config_changes(old, workdir.config_to_dict(new))
    assert changes == {"data.data_dir": ("", "/elsewhere"), "num_train_steps": (6, 60)}
    assert all(workdir.is_resumable(f) for f in changes)
    new.loss.focal_gamma = 3.0
    changes = workdir.config_changes(old, workdir.config_to_dict(new))
    assert changes["loss.focal_gamma"] == (2.0, 3.0)
    assert not workdir.is_resumable("loss.focal_gamma")


def test_a_new_field_whose_default_changed_behaviour_is_compared_with_the_old_behaviour():
    """Runs recorded before data.sampling_prior drew with the loss's prior: resuming one with
    the new default ('uniform') is a change of experiment, with 'loss' it is not."""
    old = workdir.config_to_dict(tiny_config(**{"data.class_aware_sampling": True}))
    del old["data"]["sampling_prior"]
    new = tiny_config(**{"data.class_aware_sampling": True})
    changes = workdir.config_changes(old, workdir.config_to_dict(new))
    assert changes == {"data.sampling_prior": ("loss", "uniform")}
    assert not workdir.is_resumable("data.sampling_prior")
    new.data.sampling_prior = "loss"
    assert workdir.config_changes(old, workdir.config_to_dict(new)) == {}


# ---------------------------------------------------------------------------------------------
# Provenance.


def test_every_start_records_its_provenance(finished_run):
    (record,) = workdir.read_jsonl(finished_run / workdir.PROVENANCE_FILE)
    import jax
    import tensorflow as tf

    assert record["mode"] == "train"
    assert record["resumed_from_step"] is None
    assert record["host"] == socket.gethostname()
    assert f"--workdir={finished_run}" in record["command"]
    assert record["packages"]["jax"] == jax.__version__
    assert record["packages"]["numpy"] == np.__version__
    assert record["packages"]["tensorflow"] == tf.__version__
    head = subprocess.run(
        ["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    assert record["git"]["commit"] == (head or "unknown")
    assert isinstance(record["git"]["dirty"], bool) or head == ""
    assert record["devices"] == {
        "platform": "cpu",
        "kinds": ["cpu"],
        "count": 8,
        "local_count": 8,
        "process_count": 1,
    }
    assert not (finished_run / workdir.LOCK_FILE).exists()  # released at the end


# ---------------------------------------------------------------------------------------------
# Cloud workdirs.


@pytest.mark.parametrize("path", ["s3://bucket/run", "memory://run", "file:///tmp/run"])
def test_workdirs_with_unsupported_schemes_are_refused_not_written_locally(
    path, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    result = run_in_process(path, tmp_path)
    scheme = path.split(":")[0]
    assert result.returncode == 1
    assert last_stderr_line(result).startswith(
        f"error: --workdir={path}: {scheme}:// is not supported"
    )
    assert os.listdir(tmp_path) == []


def test_local_workdirs_become_absolute_and_gs_paths_stay_as_given(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert workdir.resolve("runs/a") == str(tmp_path / "runs" / "a")
    assert workdir.resolve("gs://bucket/runs/a") == "gs://bucket/runs/a"


@pytest.fixture
def fake_gcs(tmp_path, monkeypatch):
    """Routes epath's gs:// paths to `tmp_path/bucket_store` (cwd is `tmp_path/cwd`); returns
    the store. Whatever bypasses epath lands in a local `gs:` folder of the cwd instead."""
    store, cwd = tmp_path / "bucket_store", tmp_path / "cwd"
    store.mkdir()
    cwd.mkdir()
    monkeypatch.chdir(cwd)

    def redirect(path):
        path = os.fspath(path)
        return str(store / path.removeprefix("gs://")) if path.startswith("gs://") else path

    def one_path(original, path, *args, **kwargs):
        return original(redirect(path), *args, **kwargs)

    def two_paths(original, path, dst, *args, **kwargs):
        return original(redirect(path), redirect(dst), *args, **kwargs)

    names = ("exists", "glob", "isdir", "listdir", "makedirs", "mkdir", "open", "remove")
    names += ("rmtree", "stat", "walk")
    mocks = {name: one_path for name in names}
    mocks.update(copy=two_paths, rename=two_paths, replace=two_paths)
    # With TensorFlow installed, epath sends gs:// to tf.io.gfile whatever mock_epath replaced
    # (etils 1.15); without that choice it uses the mocked backends.
    monkeypatch.setattr(epath_gpath, "_is_tf_installed", lambda: False)
    with epath_testing.mock_epath(**mocks):
        yield store
    assert os.listdir(cwd) == []  # nothing written to a local gs: folder


def test_gs_workdir_files_go_through_epath(fake_gcs):
    run = "gs://bucket/run"
    config = tiny_config()
    with workdir.open_run(config, run):
        held = json.loads((fake_gcs / "bucket" / "run" / workdir.LOCK_FILE).read_text())
        assert held["pid"] == os.getpid()
        with pytest.raises(workdir.WorkdirError, match="is in use by process"):
            workdir.WorkdirLock(run).acquire()
        workdir.append_jsonl(f"{run}/metrics.jsonl", {"step": 1})
        workdir.append_jsonl(f"{run}/metrics.jsonl", {"step": 2})
        workdir.write_json(f"{run}/final_metrics.json", {"validation": {"miou": 0.5}})
        figures = metrics.segmentation_figures(np.array([[3, 1], [0, 4]]))
        metrics.write_report(f"{run}/test", figures, ["a", "b"], title="t")
    local = fake_gcs / "bucket" / "run"
    assert not (local / workdir.LOCK_FILE).exists()
    assert json.loads((local / "config.json").read_text()) == workdir.config_to_dict(config)
    assert [r["mode"] for r in workdir.read_jsonl(local / workdir.PROVENANCE_FILE)] == ["train"]
    assert workdir.read_jsonl(local / "metrics.jsonl") == [{"step": 1}, {"step": 2}]
    assert json.loads((local / "final_metrics.json").read_text())["validation"]["miou"] == 0.5
    assert (local / "test" / "per_class.csv").read_text().splitlines()[0] == (
        "class,iou,accuracy,frequency"
    )
    assert (local / "test" / "report.md").read_text().startswith("# t")


def test_gs_lock_of_a_dead_process_on_this_host_is_taken_over_and_another_hosts_is_not(
    fake_gcs,
):
    run = "gs://bucket/run"
    lock_path = fake_gcs / "bucket" / "run" / workdir.LOCK_FILE
    lock_path.parent.mkdir(parents=True)
    lock_path.write_text(json.dumps({"host": socket.gethostname(), "pid": dead_pid()}))
    with workdir.WorkdirLock(run):
        assert json.loads(lock_path.read_text())["pid"] == os.getpid()
    lock_path.write_text(json.dumps({"host": "elsewhere", "pid": 12, "since": "then"}))
    with pytest.raises(workdir.WorkdirError) as error:
        workdir.WorkdirLock(run).acquire()
    assert str(error.value) == (
        f"workdir {run} is in use by process 12 on elsewhere since then; wait for it or use "
        f"another --workdir (if process 12 on elsewhere is no longer running, delete "
        f"{run}/{workdir.LOCK_FILE})"
    )


# ---------------------------------------------------------------------------------------------
# Start-up errors.


def test_model_names_of_the_config_check_are_the_model_registry():
    config = tiny_config()
    for name in models.MODELS:
        config.model.name = name
        config_lib.validate_config(config)
    config.model.name = "unet_large"
    with pytest.raises(config_lib.ConfigError, match="did you mean 'unet_small'"):
        config_lib.validate_config(config)
