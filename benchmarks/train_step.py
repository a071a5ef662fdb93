"""Train-step and input-pipeline throughput, as ratios measured in one process.

    python benchmarks/train_step.py [--config=configs/default.py] [--steps=20] [--repeats=5]
        [--models=unet,segformer_b0] [--synthetic=C] [--crop_size=H,W] [--batch_size=N]

* steps/s of the TCE and Stochastic TCE train steps relative to the CE step (target >= 0.97),
  for each model of `--models` (default: the config's and SegFormer-B0, `SEGFORMER`): all the
  compiled steps are timed in interleaved rounds so that machine load drifts cancel;
* input-pipeline examples/s relative to what the CE train step consumes (target >= 2x).

It runs on whatever `jax.default_backend()` is (printed with the device kind). On CPU the
config's crop and batch are used; on a GPU or TPU accelerator-sized ones (`ACCELERATOR_CROP`,
`ACCELERATOR_BATCH`, Cityscapes-like) unless `--crop_size` / `--batch_size` say otherwise.

`--synthetic=C` times the steps on a random batch of C classes instead of the dataset's, and
skips the input pipeline: what runs on a machine without TensorFlow or the data (a lent GPU).
On an accelerator each step's peak device memory is reported too (the allocator's peak after
its timed rounds, and what XLA's `memory_analysis` of the compiled step says), to set beside
the compile-only prediction of `--mode=compile`.

Writes a markdown table to benchmarks/results/train_step.md.
"""

import argparse
import functools
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

LOSSES = ("ce", "tce", "stochastic_tce")
TARGET = 0.97  # steps/s relative to the CE step
ACCELERATOR_CROP = (512, 1024)
ACCELERATOR_BATCH = 8
SEGFORMER = "segformer_b0"  # the transformer timed next to the config's model


def build_step(config, loss_name, parallel, num_classes, **step_kwargs):
    """(initial state, compiled train step) of `config` with loss `loss_name`; `step_kwargs`
    go to `steps.train_step` (e.g. gradient accumulation)."""
    import jax

    from tce_jax import objectives, steps

    config = config.copy_and_resolve_references()
    config.loss.name = loss_name
    model = steps.create_model(config, num_classes, parallel.axis_name)
    tx = steps.create_optimizer(config, steps.create_learning_rate_schedule(config))
    init = functools.partial(steps.init_state, config, model, tx, num_classes)
    state = parallel.device_state(parallel.compile_init(init)(jax.random.key(0)))
    step = parallel.compile_train(
        functools.partial(
            steps.train_step,
            model=model,
            tx=tx,
            loss_fn=objectives.create_loss_fn(config),
            axis_name=parallel.axis_name,
            **step_kwargs,
        )
    )
    return state, step


def time_steps(state, step, batch, n):
    import jax

    start = time.perf_counter()
    for _ in range(n):
        state, metrics = step(state, batch)
    jax.block_until_ready((state, metrics))
    return state, (time.perf_counter() - start) / n


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/default.py")
    parser.add_argument("--steps", type=int, default=20, help="steps per timed round")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds")
    parser.add_argument("--data_dir", default="")
    parser.add_argument(
        "--models",
        default="",
        help=f"model names, comma-separated (default: the config's and {SEGFORMER})",
    )
    parser.add_argument(
        "--crop_size",
        default="",
        help=f"H,W (default: the config's on CPU, {ACCELERATOR_CROP} on GPU/TPU)",
    )
    parser.add_argument(
        "--batch_size",
        type=int,
        default=0,
        help=f"global batch (default: the config's on CPU, {ACCELERATOR_BATCH} on GPU/TPU)",
    )
    parser.add_argument(
        "--synthetic",
        type=int,
        default=0,
        help="C: a random batch of C classes, no input pipeline (no TensorFlow needed)",
    )
    parser.add_argument(
        "--output", default="", help="results file (default: benchmarks/results/train_step.md)"
    )
    args = parser.parse_args()

    import results_file

    from experiments.train_run import load_config
    from tce_jax import config_lib
    from tce_jax import parallel as parallel_lib

    config = load_config(args.config)
    if args.data_dir:
        config.data.data_dir = args.data_dir
    if args.synthetic:
        config_lib.validate_config(config)  # startup.start without TensorFlow
    else:
        from tce_jax import startup

        startup.start(config)
    import jax

    backend = jax.default_backend()
    device_kind = jax.devices()[0].device_kind
    print(
        f"backend {backend}, device kind {device_kind}, {jax.device_count()} device(s)", flush=True
    )
    # The sizes below are valid for every config: no second validation.
    on_accelerator = backend != "cpu"
    if args.crop_size:
        config.data.crop_size = tuple(int(v) for v in args.crop_size.split(","))
    elif on_accelerator:
        config.data.crop_size = ACCELERATOR_CROP
    if args.batch_size:
        config.global_batch_size = args.batch_size
    elif on_accelerator:
        config.global_batch_size = ACCELERATOR_BATCH
    num_shards = config_lib.validate_layout(
        config, num_devices=jax.device_count(), num_processes=jax.process_count()
    )
    parallel = parallel_lib.create_parallel(config)
    if args.synthetic:
        num_classes, data = args.synthetic, None
        batch = parallel.put_batch(synthetic_batch(config, num_classes))
    else:
        from tce_jax import input_pipeline

        layout = input_pipeline.Layout(num_shards, jax.process_index(), jax.process_count())
        dataset = input_pipeline.Dataset.load(config, layout)
        num_classes = dataset.spec.num_classes
        data = dataset.train_iterator()
        batch = parallel.put_batch(next(data))

    models = args.models.split(",") if args.models else [config.model.name, SEGFORMER]
    models = list(dict.fromkeys(models))  # the config's model may be the SegFormer
    steps = {}
    for model in models:
        model_config = config.copy_and_resolve_references()
        model_config.model.name = model
        for name in LOSSES:  # compiled once, ahead of time: the timed executable is measured
            state, step = build_step(model_config, name, parallel, num_classes)
            steps[model, name] = (state, step.lower(state, batch).compile())
    compiled_gib = {key: compiled_memory_gib(step) for key, (_, step) in steps.items()}
    peak_gib = {}
    seconds = {key: [] for key in steps}
    for key, (state, step) in steps.items():  # warm up
        steps[key] = (time_steps(state, step, batch, 2)[0], step)
    for _ in range(args.repeats):
        for key, (state, step) in steps.items():
            state, per_step = time_steps(state, step, batch, args.steps)
            steps[key] = (state, step)
            seconds[key].append(per_step)
            peak_gib[key] = peak_memory_gib()  # the allocator's peak so far, this step's included
    median = {key: statistics.median(v) for key, v in seconds.items()}

    h, w = config.data.crop_size
    source = f"a random batch of {num_classes} classes" if args.synthetic else "the dataset"
    lines = [
        f"Config `{args.config}`: {', '.join(models)}, global batch {config.global_batch_size}"
        f" of {h}x{w} ({source}), {num_classes} classes, backend `{backend}` ({device_kind}, "
        f"{jax.device_count()} device(s)), parallelism {config.parallelism}, "
        f"{'bf16' if config.mixed_precision else 'float32'}, JAX {jax.__version__}; median of "
        f"{args.repeats} interleaved rounds of {args.steps} steps.",
        "",
        "| model | train step | ms/step | steps/s relative to CE | target | compiled GiB | "
        "peak GiB |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for model, name in steps:
        ratio = median[model, "ce"] / median[model, name]
        target = "" if name == "ce" else f">= {TARGET}"
        lines.append(
            f"| {model} | {name} | {1000 * median[model, name]:.1f} | {ratio:.3f} | {target} | "
            f"{compiled_gib[model, name]} | {peak_gib[model, name]} |"
        )
    lines += [
        "",
        "compiled GiB: arguments + outputs + temporaries - aliased of the compiled step per "
        "device (XLA's `memory_analysis`); peak GiB: the device allocator's peak bytes in use "
        "after the step's rounds (cumulative over the steps timed before it; CPU: not "
        "reported).",
    ]
    if data is not None:
        ce_seconds = median[models[0], "ce"]
        lines += ["", *pipeline_lines(data, config.global_batch_size, ce_seconds, args.steps)]
    if args.output:
        with open(args.output, "w") as f:
            f.write("\n".join(lines) + "\n")
        print("\n".join(lines))
    else:
        results_file.write("train_step.md", "\n".join(lines))


def synthetic_batch(config, num_classes: int) -> dict:
    """A global batch of uniform random uint8 images and labels, as the input pipeline gives
    them (no photometric draws)."""
    import numpy as np

    h, w = config.data.crop_size
    rng = np.random.default_rng(0)
    n = config.global_batch_size
    return {
        "image": rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8),
        "label": rng.integers(0, num_classes, (n, h, w), dtype=np.int32),
    }


def compiled_memory_gib(compiled) -> str:
    """What XLA plans for one device of the compiled step (arguments + outputs + temporaries -
    aliased), as "x.xx"; "" where the backend does not say."""
    analysis = compiled.memory_analysis()
    if analysis is None:
        return ""
    total = (
        analysis.argument_size_in_bytes
        + analysis.output_size_in_bytes
        + analysis.temp_size_in_bytes
        - analysis.alias_size_in_bytes
    )
    return f"{total / 2**30:.2f}"


def peak_memory_gib() -> str:
    import jax

    stats = jax.devices()[0].memory_stats()
    if not stats or "peak_bytes_in_use" not in stats:
        return ""
    return f"{stats['peak_bytes_in_use'] / 2**30:.2f}"


def pipeline_lines(data, batch_size: int, ce_seconds: float, steps: int) -> list[str]:
    """The input pipeline alone: examples/s once warmed up, against what the CE step eats."""
    for _ in range(3):
        next(data)
    n_batches = max(steps, 20)
    start = time.perf_counter()
    for _ in range(n_batches):
        next(data)
    pipeline_rate = n_batches * batch_size / (time.perf_counter() - start)
    consumed_rate = batch_size / ce_seconds
    return [
        "| input pipeline | examples/s | relative to CE step consumption | target |",
        "| --- | ---: | ---: | ---: |",
        f"| train iterator | {pipeline_rate:.0f} | {pipeline_rate / consumed_rate:.2f}x | >= 2x |",
    ]


if __name__ == "__main__":
    main()
