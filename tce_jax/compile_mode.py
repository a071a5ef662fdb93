r"""`--mode=compile`: a run's steps compiled for accelerators this machine does not have.

    python -m tce_jax.main --config=configs/cityscapes.py:tce --mode=compile --target=v5e:2x4
    python -m tce_jax.main --config=configs/ade20k.py:tce --mode=compile --target=h100:1x1x8

The train step, the whole-image eval step (and the sliding-window one when the config evaluates
so) and the predict step are built by `tce_jax.programs.Programs`, as the trainer builds them,
with the config's parallelism over the target's compile-only devices (`tce_jax.targets`), and
compiled for abstract inputs of the shapes the input pipeline delivers. For each,
`tce_jax.compile_check` reports memory per device against the device's, FLOPs, a lower bound
on the step time and a census of the optimized program; the run's training time is estimated
from the train step's bound at `UTILISATION`. Nothing is read or written: no data, no workdir.

Evaluation batches need the split's image sizes, which only the prepared data hold: the
compile mode takes them from `config.data.eval_canvas` when set, else from
`NOMINAL_EVAL_SIZES` (see there), by the trainer's own rule (`input_pipeline.canvas_geometry`).

A step that does not fit, or that scatters floats into a few elements, ends the command with
exit status 1 and one line saying what to change (`CompileModeError`).
"""

from __future__ import annotations

from collections.abc import Iterator

import ml_collections

from tce_jax import compile_check, config_lib, datasets, input_pipeline, parallel, targets
from tce_jax.datasets import cityscapes, street_scenes
from tce_jax.programs import Programs

# The share of the step-time bound (peak FLOP/s or bandwidth) a real step reaches; 0.4 is a
# typical model FLOP utilisation of convolutional networks on GPUs and TPUs.
UTILISATION = 0.4

# Evaluation image sizes (height, width) per dataset, for compiling without the data. Cityscapes
# and the embedded datasets have one size. ADE20K's vary: most validation images are 4:3 with
# a short side of 512, landscape or portrait, so the nominal canvas holds both (704x704 after
# rounding up to 32); the real canvas is the largest image of the split (larger: set
# --config.data.eval_canvas to bound it, e.g. 2048,2048).
NOMINAL_EVAL_SIZES: dict[str, tuple[tuple[int, int], ...]] = {
    "cityscapes": ((cityscapes.HEIGHT, cityscapes.WIDTH),),
    "ade20k": ((512, 683), (683, 512)),
    "street_scenes": ((street_scenes.HEIGHT, street_scenes.WIDTH),),
    "street_scenes_small": ((street_scenes.HEIGHT, street_scenes.WIDTH),),
    "street_scenes_rare": ((street_scenes.HEIGHT, street_scenes.WIDTH),),
    "street_scenes_rare_small": ((street_scenes.HEIGHT, street_scenes.WIDTH),),
}


class CompileModeError(ValueError):
    """What `--mode=compile` refuses or finds wrong; the message (one line) says what to do."""


def nominal_eval_geometry(config: ml_collections.ConfigDict) -> input_pipeline.EvalGeometry:
    """The evaluation geometry of `config.data.eval_canvas` (labels of the same size) or of the
    dataset's `NOMINAL_EVAL_SIZES`."""
    data = config.data
    if data.eval_canvas:
        sizes = (tuple(data.eval_canvas),)
    elif data.name in NOMINAL_EVAL_SIZES:
        sizes = NOMINAL_EVAL_SIZES[data.name]
    else:
        raise CompileModeError(
            f"config.data.name={data.name!r}: its image sizes are known only from its data; "
            "pass --config.data.eval_canvas=H,W (the largest evaluation image) to compile "
            "without them."
        )
    return input_pipeline.canvas_geometry(sizes, data, "nominal evaluation image")


def parse_target(text: str) -> targets.Target:
    try:
        return targets.parse_target(text)
    except ValueError as error:
        raise CompileModeError(str(error)) from None


def compile_steps(
    config: ml_collections.ConfigDict, target: str, *, only=None
) -> Iterator[compile_check.CompileReport]:
    """Compiles the run's steps for `target` (a target string) one by one and yields each
    report: "train", "eval (whole)", "eval (sliding)" (when `config.data.eval_mode` is
    sliding) and "predict"; `only` (names) restricts them. `config` is taken as checked."""
    parsed = parse_target(target)
    devices = targets.compile_devices(parsed)
    processes = len({d.process_index for d in devices})
    config_lib.validate_layout(config, num_devices=len(devices), num_processes=processes)
    spec = datasets.get_dataset_spec(config.data.name, config)
    geometry = nominal_eval_geometry(config)
    programs = Programs(config, spec, parallel.create_parallel(config, devices))
    modes = ("whole", "sliding") if config.data.eval_mode == "sliding" else ("whole",)
    jobs = {"train": lambda: (programs.train, programs.train_inputs())}
    for mode in modes:
        jobs[f"eval ({mode})"] = lambda mode=mode: (
            programs.eval_step(geometry, mode),
            programs.eval_inputs(geometry),
        )
    jobs["predict"] = lambda: (programs.predict_step(geometry), programs.predict_inputs(geometry))
    dtype = "bfloat16" if config.mixed_precision else "float32"
    for name, job in jobs.items():
        if only is not None and name not in only:
            continue
        jitted, args = job()
        try:
            yield compile_check.compile_report(
                jitted, args, parsed, name=f"{name} step", compute_dtype=dtype
            )
        except Exception as error:
            if config.parallelism != "pmap":
                raise
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error)
            raise CompileModeError(
                f"XLA cannot compile the pmap program for {parsed.name} without its devices "
                f"({first}); compile with --config.parallelism=jit (the same steps over a mesh)."
            ) from None


def run_hours(config: ml_collections.ConfigDict, train: compile_check.CompileReport) -> float:
    """Training time (hours) of `config.num_train_steps` steps at `UTILISATION` of the train
    step's bound (evaluation excluded)."""
    return config.num_train_steps * train.step_seconds_bound / UTILISATION / 3600


def shortfall(config: ml_collections.ConfigDict, report: compile_check.CompileReport) -> str:
    """One line: how much more memory `report`'s step needs than a device has, and the config
    changes that reduce it."""
    gib = compile_check.GIB
    short = (report.peak_bytes - report.memory_bytes) / gib
    fixes = []
    if report.name.startswith("train"):
        per_device = config.global_batch_size // report.devices
        accum = config.grad_accum_steps
        larger = next((k for k in range(accum + 1, per_device + 1) if per_device % k == 0), None)
        if larger:
            fixes.append(f"--config.grad_accum_steps={larger} (same gradients, smaller batches)")
        fixes.append(
            f"a smaller per-device batch (--config.global_batch_size, now {per_device} per device)"
        )
    else:
        fixes.append(f"a smaller --config.data.eval_batch_size (now {config.data.eval_batch_size})")
        if config.data.eval_mode != "sliding":
            fixes.append("--config.data.eval_mode=sliding")
    if not config.mixed_precision:
        fixes.insert(0, "--config.mixed_precision=True")
    return (
        f"the {report.name} needs {report.peak_bytes / gib:.2f} GiB per device on "
        f"{report.target.name}, {short:.2f} GiB more than the "
        f"{report.memory_bytes / gib:.2f} GiB of a {report.target.accelerator.name}: use "
        + " or ".join(fixes)
    )


def run(config: ml_collections.ConfigDict, target: str) -> None:
    """Prints each step's report and the run's estimate; `CompileModeError` (one line) when a
    step does not fit or scatters floats into a few elements."""
    targets.check_toolchain(parse_target(target))  # both before anything else
    geometry = nominal_eval_geometry(config)
    print(
        f"Compiling for {target} ({config.parallelism}); evaluation batches of "
        f"{config.data.eval_batch_size} on a {geometry.canvas[0]}x{geometry.canvas[1]} canvas, "
        f"labels {geometry.label_shape[0]}x{geometry.label_shape[1]} (compile_mode."
        "NOMINAL_EVAL_SIZES or config.data.eval_canvas).",
        flush=True,
    )
    reports = []
    for report in compile_steps(config, target):
        print(report.summary(), flush=True)
        reports.append(report)
    train = reports[0]
    print(
        f"Training estimate: {config.num_train_steps} steps x "
        f"{train.step_seconds_bound * 1e3:.3g} ms (bound) / {UTILISATION} utilisation = "
        f"{run_hours(config, train):.1f} h (evaluation excluded)."
        + (
            " GPU memory excludes cuDNN/cuBLAS workspace (no autotuning without a device)."
            if train.target.accelerator.platform == "cuda"
            else ""
        ),
        flush=True,
    )
    for report in reports:
        if not report.fits:
            raise CompileModeError(shortfall(config, report))
        if report.census.errors:
            raise CompileModeError(f"the {report.name}: {report.census.errors[0]}")
