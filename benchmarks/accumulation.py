"""Exact gradient accumulation: step time and compiled memory against the one-pass step.

    python benchmarks/accumulation.py [--config=configs/default.py] [--loss=tce] \
        [--accum=1,2,4,8] [--steps=5] [--repeats=3]

For each `grad_accum_steps` k: the compiled step's temporary memory (XLA's
`memory_analysis().temp_size_in_bytes`: activations and workspace, the part that k divides)
and its median time per step, both relative to k = 1. The steps are timed in interleaved
rounds on the same random batch (no dataset needed), so that machine load drifts cancel.
Expected: time ratio about 1 + (forward / (forward + backward)), since pass 2 recomputes the
forward pass; temporary memory falling with k. On CPU the time ratio is far higher: XLA:CPU
runs convolutions inside loop bodies several times slower (jax-ml/jax issue 12868).

Writes a markdown table to benchmarks/results/accumulation.md.
"""

import argparse
import os
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import results_file  # noqa: E402
from train_step import build_step, time_steps  # noqa: E402

from experiments.train_run import load_config  # noqa: E402


def build(config, k: int, parallel, num_classes: int, batch):
    from tce_jax import objectives

    kwargs = {}
    if k > 1:
        kwargs = dict(grad_accum_steps=k, decomposition=objectives.create_decomposition(config))
    state, step = build_step(config, config.loss.name, parallel, num_classes, **kwargs)
    compiled = step.lower(state, batch).compile()
    return state, compiled, compiled.memory_analysis().temp_size_in_bytes


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/default.py")
    parser.add_argument("--loss", default="tce")
    parser.add_argument("--accum", default="1,2,4,8", help="grad_accum_steps values; 1 first")
    parser.add_argument("--steps", type=int, default=5, help="steps per timed round")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--num_classes", type=int, default=19)
    args = parser.parse_args()

    import jax
    import numpy as np

    from tce_jax import config_lib
    from tce_jax import parallel as parallel_lib

    config = load_config(args.config)
    config.loss.name = args.loss
    ks = [int(k) for k in args.accum.split(",")]
    config_lib.validate_config(config)
    parallel = parallel_lib.create_parallel(config)
    h, w = config.data.crop_size
    rng = np.random.default_rng(0)
    host_batch = {
        "image": rng.normal(size=(config.global_batch_size, h, w, 3)).astype(np.float32),
        "label": rng.integers(0, args.num_classes, (config.global_batch_size, h, w), np.int32),
    }
    batch = parallel.put_batch(host_batch)
    runs = {}
    for k in ks:
        config.grad_accum_steps = k
        config_lib.validate_layout(config, num_devices=jax.device_count(), num_processes=1)
        runs[k] = build(config, k, parallel, args.num_classes, batch)
    seconds = {k: [] for k in ks}
    states = {k: time_steps(runs[k][0], runs[k][1], batch, 1)[0] for k in ks}  # warm up
    for _ in range(args.repeats):
        for k in ks:
            states[k], per_step = time_steps(states[k], runs[k][1], batch, args.steps)
            seconds[k].append(per_step)
    median = {k: statistics.median(v) for k, v in seconds.items()}
    base = ks[0]
    lines = [
        f"Config `{args.config}`, loss {args.loss}: {config.model.name}, global batch "
        f"{config.global_batch_size} of {h}x{w}, {jax.device_count()} "
        f"{jax.devices()[0].platform} device(s); median of {args.repeats} interleaved rounds "
        f"of {args.steps} steps.",
        "",
        f"| grad_accum_steps | ms/step | time relative to k={base} | temp memory (MiB) "
        f"| memory relative to k={base} |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    for k in ks:
        memory = runs[k][2]
        lines.append(
            f"| {k} | {1000 * median[k]:.1f} | {median[k] / median[base]:.2f} | "
            f"{memory / 2**20:.1f} | {memory / runs[base][2]:.2f} |"
        )
    results_file.write("accumulation.md", "\n".join(lines))


if __name__ == "__main__":
    main()
