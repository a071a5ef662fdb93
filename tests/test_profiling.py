"""`config.profile_steps`: a trace of a few training steps for TensorBoard's Profile tab (a
training run's trace: tests/test_train.py)."""

import glob
import os

import jax.numpy as jnp

from tce_jax import profiling


def traces(logdir) -> list[str]:
    return glob.glob(os.path.join(logdir, "plugins", "profile", "*", "*.xplane.pb"))


def test_profiler_traces_the_steps_after_warm_up(tmp_path, capsys):
    profiler = profiling.StepProfiler(str(tmp_path), 2, start_step=10)
    state = jnp.zeros(3)
    for step in range(11, 13):  # warm-up: nothing traced yet
        state = state + 1
        profiler(step, state)
        assert not os.path.exists(tmp_path / "plugins") and (profiler.running == (step == 12))
    for step in range(13, 17):
        state = state + 1
        profiler(step, state)
    profiler.close(state)
    assert len(traces(tmp_path)) == 1
    assert "Profile of steps 13-14 written" in capsys.readouterr().out


def test_profiler_off_or_too_short(tmp_path, capsys):
    for num_steps, enabled in ((0, True), (5, False)):
        profiler = profiling.StepProfiler(str(tmp_path), num_steps, start_step=0, enabled=enabled)
        for step in range(1, 10):
            profiler(step, None)
        profiler.close()
    short = profiling.StepProfiler(str(tmp_path), 5, start_step=0)
    short(1, None)
    short.close()
    assert not traces(tmp_path)
    assert "No profile" in capsys.readouterr().out


def test_profiler_stops_a_trace_left_open_at_the_end(tmp_path):
    profiler = profiling.StepProfiler(str(tmp_path), 10, start_step=0)
    for step in range(1, 5):
        profiler(step, jnp.zeros(1))
    assert profiler.running
    profiler.close(jnp.zeros(1))
    assert not profiler.running and len(traces(tmp_path)) == 1
