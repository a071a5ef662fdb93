"""--mode=compile: the trainer's steps compiled for GPU and TPU targets from this CPU machine.

The compile tests need the compile-only toolchains (``tce_jax[compile-gpu]``,
``tce_jax[compile-tpu]``) and skip without them. They compile with XLA's optimizations on (the
test session turns most of them off) and check the *optimized* programs, so that a float
scatter XLA introduces is caught too (tests/test_lowering.py checks the StableHLO before XLA's
passes).
"""

import dataclasses

import jax
import numpy as np
import pytest
from run_utils import run_main_in_process
from toolchains import compile_mesh, skip_without_toolchain

from configs import cityscapes, default
from tce_jax import compile_check, compile_mode, datasets, input_pipeline, programs, targets

# The TPU target is a two-host v4 slice: of the TPU generations, v4 compiles fastest here
# (the tiny train and eval steps in 14 CPU-seconds; 24 for a v5e:2x2).
GPU, TPU = "h100:1x1x2", "v4:2x2x2"
# A per-class statistic has C elements, a confusion matrix C * C (as in test_lowering.py).
SMALL_FACTOR = 4


def _shapes(tree) -> dict:
    return {k: (tuple(v.shape), np.dtype(v.dtype)) for k, v in tree.items()}


def test_abstract_batches_and_nominal_geometry_are_the_input_pipelines(prepared):
    """What the compile mode lowers for is what the trainer feeds: the same batch shapes and
    dtypes, and (for a dataset of one image size) the same evaluation geometry."""
    config, builder, spec = prepared
    data = input_pipeline.Dataset(builder, spec, config, input_pipeline.Layout(1, 0, 1))
    with data.train_iterator() as batches:
        assert _shapes(next(batches)) == _shapes(programs.train_batch_shapes(config))
    geometry = data.eval_geometry(config.data.eval_split)
    assert compile_mode.nominal_eval_geometry(config) == geometry
    with data.eval_iterator(config.data.eval_split, geometry) as batches:
        assert _shapes(next(batches)) == _shapes(programs.eval_batch_shapes(config, geometry))


def test_nominal_geometry_of_the_recipes():
    cs = cityscapes.get_config("tce")
    assert compile_mode.nominal_eval_geometry(cs) == input_pipeline.EvalGeometry(
        (1024, 2048), (1024, 2048), resize=False
    )
    cs.data.eval_canvas = (1024, 2048)
    assert compile_mode.nominal_eval_geometry(cs).canvas == (1024, 2048)
    folder = default.get_config("tiny")
    folder.data.name = "folder"
    with pytest.raises(compile_mode.CompileModeError, match="--config.data.eval_canvas=H,W"):
        compile_mode.nominal_eval_geometry(folder)


def _report(name, peak_gib, devices=8, target="v5e:2x4"):
    target = targets.parse_target(target)
    census = compile_check.Census((), ())
    return compile_check.CompileReport(
        name, target, devices, int(peak_gib * 2**30), 0, 0, 0, 1e12, "test", "float32", census, 1
    )


def test_shortfall_names_the_amount_and_the_fixes():
    config = cityscapes.get_config("tce")
    config.global_batch_size = 32  # 4 per device on 8 chips
    train = _report("train step", 20.5)
    assert not train.fits
    message = compile_mode.shortfall(config, train)
    assert message == (
        "the train step needs 20.50 GiB per device on v5e:2x4, 4.50 GiB more than the 16.00 "
        "GiB of a v5e: use --config.mixed_precision=True or --config.grad_accum_steps=2 (same "
        "gradients, smaller batches) or a smaller per-device batch (--config.global_batch_size, "
        "now 4 per device)"
    )
    config.mixed_precision = True
    evaluation = compile_mode.shortfall(config, _report("eval (whole) step", 17))
    assert "mixed_precision" not in evaluation
    assert "--config.data.eval_batch_size (now 8)" in evaluation
    assert "--config.data.eval_mode=sliding" in evaluation


def test_cli_errors_are_one_line(monkeypatch):
    tiny = "--config=configs/default.py:tiny"
    cases = {
        ("--mode=compile",): "error: --mode=compile needs --target",
        ("--mode=compile", "--target=h200:1x1x8"): "error: Unknown target 'h200:1x1x8'",
        (): "error: Flag --workdir must have a value other than None",
    }
    for args, start in cases.items():
        result = run_main_in_process(tiny, *args)
        assert result.returncode == 1 and "Traceback" not in result.stderr
        assert result.stderr.strip().splitlines()[-1].startswith(start), result.stderr
    monkeypatch.setattr(targets, "_installed", lambda module: False)
    monkeypatch.setattr(targets.shutil, "which", lambda name: None)
    result = run_main_in_process(tiny, "--mode=compile", "--target=v5e:2x4")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "error: Compiling for v5e:2x4 needs libtpu: pip install 'tce_jax[compile-tpu]'"
    ]


@pytest.fixture
def optimized():
    """XLA's optimizations on, as a real run compiles (conftest turns most of them off)."""
    before = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", False)
    yield
    jax.config.update("jax_disable_most_optimizations", before)


def _small_float_scatters(report, num_classes: int) -> list[str]:
    """Float scatters of the optimized program into at most SMALL_FACTOR * C * C elements."""
    return [
        f"{s.name} -> {s.shape}"
        for s in report.census.float_scatters
        if sum(n for *_, n in compile_check._arrays(s.shape)) <= SMALL_FACTOR * num_classes**2
    ]


def _assert_compiled_cleanly(reports, target: str, config) -> None:
    """Each report is of the target's every device, with costs, no census error and no small
    float scatter; a train step all-reduces its gradients."""
    num_classes = datasets.get_dataset_spec(config.data.name).num_classes
    for report in reports:
        assert report.devices == targets.parse_target(target).chips
        assert report.flops > 0 and report.step_seconds_bound > 0
        assert not report.census.errors, report.summary()
        assert not _small_float_scatters(report, num_classes), report.summary()
    if reports[0].name == "train step":  # the gradients' all-reduce
        assert "all-reduce" in {c.kind for c in reports[0].census.collectives}


# (target, config, steps): for a TPU (slower to compile here) the tiny config's train and
# whole-image eval steps; Cityscapes' tiny sliding-window evaluation, whose predictions are
# resized to 1024x2048 label maps, for both. (Every step of the tiny config for a GPU: through
# the command line, in test_cli_compiles_every_step_and_refuses_one_that_does_not_fit.
# SegFormer's steps: StableHLO in tests/test_lowering.py, the optimized programs of its recipes
# in benchmarks/compile_targets.py; a tiny SegFormer compile here took about 50 CPU-seconds per
# target.)
CASES = [
    pytest.param(
        GPU,
        cityscapes.get_config("tce,slide,tiny"),
        ("eval (sliding)",),
        marks=skip_without_toolchain(GPU),
    ),
    pytest.param(
        TPU,
        default.get_config("tiny"),
        ("train", "eval (whole)"),
        marks=skip_without_toolchain(TPU),
    ),
    pytest.param(
        TPU,
        cityscapes.get_config("tce,slide,tiny"),
        ("eval (sliding)",),
        marks=skip_without_toolchain(TPU),
    ),
]


# Compiles for GPU and TPU targets are `slow` (left out of the quick loop, conftest.py): JAX's
# compilation cache keeps no program compiled without the device, so every run compiles them
# again (21 CPU-seconds for the two TPU cases).
@pytest.mark.slow
@pytest.mark.parametrize("target, config, only", CASES)
def test_tiny_steps_compile_without_small_float_scatters(optimized, target, config, only):
    compile_mesh(target)  # skips when this process started JAX on a GPU backend
    reports = list(compile_mode.compile_steps(config, target, only=only))
    assert [r.name for r in reports] == [f"{name} step" for name in only]
    assert all(r.fits for r in reports)
    _assert_compiled_cleanly(reports, target, config)


@pytest.mark.slow
@skip_without_toolchain(GPU)
def test_cli_compiles_every_step_and_refuses_one_that_does_not_fit(optimized, monkeypatch):
    """The tiny config's every step compiled for a GPU through the command line, as cleanly as
    the cases above; with a device memory of 1 KiB the run is refused in one line."""
    compile_mesh(GPU)
    h100 = targets.ACCELERATORS["h100"]
    small = dataclasses.replace(h100, memory_bytes=1024)
    monkeypatch.setitem(targets.ACCELERATORS, "h100", small)
    reports = []
    compile_report = compile_check.compile_report

    def recorded(*args, **kwargs):
        reports.append(compile_report(*args, **kwargs))
        return reports[-1]

    monkeypatch.setattr(compile_check, "compile_report", recorded)
    result = run_main_in_process(
        "--config=configs/default.py:tiny", "--mode=compile", f"--target={GPU}"
    )
    assert [r.name for r in reports] == ["train step", "eval (whole) step", "predict step"]
    _assert_compiled_cleanly(reports, GPU, default.get_config("tiny"))
    assert all(r.peak_bytes <= h100.memory_bytes for r in reports)  # each fits a real H100
    assert result.returncode == 1
    assert "train step on h100:1x1x2 (2 x h100)" in result.stdout
    assert "Training estimate: 6 steps x" in result.stdout
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: the train step needs ") and "GiB more than the" in last
    assert "--config.grad_accum_steps=2" in last and "--config.mixed_precision=True" in last
