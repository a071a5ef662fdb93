"""Train-step and input-pipeline throughput, as ratios measured in one process.

    python benchmarks/train_step.py [--config=configs/default.py] [--steps=20] [--repeats=5] \
        [--models=unet,segformer_b0]

* steps/s of the TCE and Stochastic TCE train steps relative to the CE step (target >= 0.97),
  for each model of `--models` (default: the config's and SegFormer-B0, `SEGFORMER`): all the
  compiled steps are timed in interleaved rounds so that machine load drifts cancel;
* input-pipeline examples/s relative to what the CE train step consumes (target >= 2x).

It runs on whatever `jax.default_backend()` is (printed with the device kind). On CPU the
config's crop and batch are used; on a GPU or TPU accelerator-sized ones (`ACCELERATOR_CROP`,
`ACCELERATOR_BATCH`, Cityscapes-like) unless `--crop_size` / `--batch_size` say otherwise.

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
    parser.add_argument("--models", default="", help="model names, comma-separated (default: "
                        f"the config's and {SEGFORMER})")
    parser.add_argument("--crop_size", default="", help="H,W (default: the config's on CPU, "
                        f"{ACCELERATOR_CROP} on GPU/TPU)")
    parser.add_argument("--batch_size", type=int, default=0, help="global batch (default: the "
                        f"config's on CPU, {ACCELERATOR_BATCH} on GPU/TPU)")
    args = parser.parse_args()

    import results_file

    from experiments.train_run import load_config
    from tce_jax import config_lib, input_pipeline, startup
    from tce_jax import parallel as parallel_lib

    config = load_config(args.config)
    if args.data_dir:
        config.data.data_dir = args.data_dir
    startup.start(config)
    import jax

    backend = jax.default_backend()
    device_kind = jax.devices()[0].device_kind
    print(f"backend {backend}, device kind {device_kind}, {jax.device_count()} device(s)",
          flush=True)
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
    layout = input_pipeline.Layout(num_shards, jax.process_index(), jax.process_count())
    dataset = input_pipeline.Dataset.load(config, layout)
    spec = dataset.spec
    parallel = parallel_lib.create_parallel(config)
    data = dataset.train_iterator()
    batch = parallel.put_batch(next(data))

    models = args.models.split(",") if args.models else [config.model.name, SEGFORMER]
    models = list(dict.fromkeys(models))  # the config's model may be the SegFormer
    steps = {}
    for model in models:
        model_config = config.copy_and_resolve_references()
        model_config.model.name = model
        for name in LOSSES:
            steps[model, name] = build_step(model_config, name, parallel, spec.num_classes)
    seconds = {key: [] for key in steps}
    for key, (state, step) in steps.items():  # compile and warm up
        steps[key] = (time_steps(state, step, batch, 2)[0], step)
    for _ in range(args.repeats):
        for key, (state, step) in steps.items():
            state, per_step = time_steps(state, step, batch, args.steps)
            steps[key] = (state, step)
            seconds[key].append(per_step)
    median = {key: statistics.median(v) for key, v in seconds.items()}

    # Input pipeline alone: examples/s once warmed up.
    for _ in range(3):
        next(data)
    n_batches = max(args.steps, 20)
    start = time.perf_counter()
    for _ in range(n_batches):
        next(data)
    pipeline_rate = n_batches * config.global_batch_size / (time.perf_counter() - start)
    consumed_rate = config.global_batch_size / median[models[0], "ce"]

    h, w = config.data.crop_size
    lines = [
        f"Config `{args.config}`: {', '.join(models)}, global batch {config.global_batch_size}"
        f" of {h}x{w}, {spec.num_classes} classes, backend `{backend}` ({device_kind}, "
        f"{jax.device_count()} device(s)), parallelism {config.parallelism}; median of "
        f"{args.repeats} interleaved rounds of {args.steps} steps.",
        "",
        "| model | train step | ms/step | steps/s relative to CE | target |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for model, name in steps:
        ratio = median[model, "ce"] / median[model, name]
        target = "" if name == "ce" else f">= {TARGET}"
        ms = 1000 * median[model, name]
        lines.append(f"| {model} | {name} | {ms:.1f} | {ratio:.3f} | {target} |")
    lines += [
        "",
        f"| input pipeline | examples/s | relative to {models[0]}'s CE step consumption | "
        "target |",
        "| --- | ---: | ---: | ---: |",
        f"| train iterator | {pipeline_rate:.0f} | {pipeline_rate / consumed_rate:.2f}x | >= 2x |",
    ]
    results_file.write("train_step.md", "\n".join(lines))


if __name__ == "__main__":
    main()
