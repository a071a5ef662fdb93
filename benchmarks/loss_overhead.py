"""Overhead of tilted_ce over plain cross-entropy: jitted value-and-gradient w.r.t. the logits.

Baseline: ``optax.losses.softmax_cross_entropy_with_integer_labels(logits, labels).mean()``.
Candidates: ``tce_jax.losses.tilted_ce`` (t=1, 'frequency') and, for reference, our
``cross_entropy``. Every function is ``jax.jit(jax.value_and_grad(f))``, timed in one process
with ``block_until_ready``; the repetitions of all functions are interleaved (in a rotating
order) so that drift of these shared machines hits them alike. We report medians and the ratio of
the candidate's median to the baseline's (targets: tilted_ce <= 1.05 in float32, <= 1.15 in
bfloat16).

It runs on whatever ``jax.default_backend()`` is (printed with the device kind): on CPU the
shapes below, on a GPU or TPU the accelerator-sized ``ACCELERATOR_SHAPES`` (Cityscapes- and
ADE20K-like batches), where the per-class sums take their scatter-free form.

Labels are all valid (the optax baseline has no ignore label). Run as a plain script, without
the test conftest (that one disables XLA optimisations)::

    python benchmarks/loss_overhead.py            # ~2-4 minutes on 2 CPU cores
    python benchmarks/loss_overhead.py --quick    # small shapes, a few seconds

The markdown table is printed and written to ``benchmarks/results/loss_overhead.md``
(``loss_overhead_quick.md`` with ``--quick``).
"""

import argparse
import datetime
import os
import pathlib
import platform
import statistics
import time

# XLA logs a "constant folding is taking > 1s" alarm while compiling the optax baseline's
# gradient (a scatter on a constant); it is about compile time, which this benchmark does not
# measure.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from tce_jax.losses import cross_entropy, tilted_ce  # noqa: E402

SHAPES = [(2, 512, 1024, 19), (4, 256, 256, 150)]  # CPU
ACCELERATOR_SHAPES = [(8, 512, 1024, 19), (8, 512, 512, 150)]  # GPU, TPU
QUICK_SHAPES = [(2, 64, 128, 19), (2, 32, 32, 150)]
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
TARGETS = {"float32": 1.05, "bfloat16": 1.15}  # tilted_ce / baseline
RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def optax_ce(logits, labels):
    return optax.losses.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def our_tce(logits, labels):
    return tilted_ce(logits, labels, t=1.0, class_weighting="frequency")


def our_ce(logits, labels):
    return cross_entropy(logits, labels)


FUNCTIONS = {"optax CE (baseline)": optax_ce, "tilted_ce": our_tce, "cross_entropy": our_ce}


def make_inputs(shape, dtype, seed=0):
    rng = np.random.default_rng(seed)
    num_classes = shape[-1]
    # Skewed class frequencies, as in segmentation data.
    p = np.exp(-0.2 * np.arange(num_classes))
    labels = rng.choice(num_classes, size=shape[:-1], p=p / p.sum()).astype(np.int32)
    logits = rng.normal(size=shape).astype(np.float32)
    return jax.device_put(jnp.asarray(logits, dtype)), jax.device_put(jnp.asarray(labels))


def time_once(fn, *args) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - start


def bench(shape, dtype, reps, warmup=2):
    logits, labels = make_inputs(shape, dtype)
    compiled = {name: jax.jit(jax.value_and_grad(f)) for name, f in FUNCTIONS.items()}
    for fn in compiled.values():
        for _ in range(1 + warmup):  # compile, then warm up
            time_once(fn, logits, labels)
    names = list(compiled)
    times = {name: [] for name in names}
    for rep in range(reps):
        shift = rep % len(names)  # rotate the order: no function always runs first
        for name in names[shift:] + names[:shift]:
            times[name].append(time_once(compiled[name], logits, labels))
    return {name: statistics.median(ts) for name, ts in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, few repetitions")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions per function")
    parser.add_argument("--output", type=pathlib.Path, default=None, help="markdown file")
    args = parser.parse_args()
    backend = jax.default_backend()
    device = jax.devices()[0]
    print(f"backend {backend}, device kind {device.device_kind}, {jax.device_count()} device(s)",
          flush=True)
    if args.quick:
        shapes = QUICK_SHAPES
    else:
        shapes = SHAPES if backend == "cpu" else ACCELERATOR_SHAPES
    reps = args.reps or (5 if args.quick else 21)
    output = args.output or RESULTS / ("loss_overhead_quick.md" if args.quick else
                                       "loss_overhead.md")

    baseline = next(iter(FUNCTIONS))
    header = ["shape", "dtype"] + [f"{n} ms" for n in FUNCTIONS] + [
        f"{n} / baseline" for n in FUNCTIONS if n != baseline]
    rows = []
    worst = dict.fromkeys(DTYPES, 0.0)
    for shape in shapes:
        for dtype_name, dtype in DTYPES.items():
            medians = bench(shape, dtype, reps)
            ratios = [medians[n] / medians[baseline] for n in FUNCTIONS if n != baseline]
            worst[dtype_name] = max(worst[dtype_name], ratios[0])
            rows.append([str(shape), dtype_name] + [f"{medians[n] * 1e3:.1f}" for n in FUNCTIONS]
                        + [f"{r:.3f}" for r in ratios])
            print(" | ".join(rows[-1]), flush=True)

    verdicts = [
        f"{name} <= {TARGETS[name]}: worst {worst[name]:.3f} "
        f"({'met' if worst[name] <= TARGETS[name] else 'MISSED'})"
        for name in DTYPES
    ]
    lines = [
        "# Loss overhead: jitted value_and_grad w.r.t. logits",
        "",
        f"Backend `{backend}` ({device.device_kind}). Median of {reps} interleaved repetitions; "
        f"`tilted_ce` with t=1.0, 'frequency'; baseline `{baseline}` = optax "
        "`softmax_cross_entropy_with_integer_labels(...).mean()`.",
        f"Targets, tilted_ce / baseline: {'; '.join(verdicts)}.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] * len(header)) + "|",
        *["| " + " | ".join(r) + " |" for r in rows],
        "",
        f"jax {jax.__version__}, optax {optax.__version__}, backend {jax.default_backend()} "
        f"({device.device_kind}, {jax.device_count()} device(s)), {os.cpu_count()} CPU core(s), "
        f"Python {platform.python_version()}, "
        f"{datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%d %H:%M UTC')}.",
        "Absolute times on shared machines are noise; compare the ratios.",
        "",
    ]
    table = "\n".join(lines)
    print()
    print(table)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(table)
    print(f"written to {output}")


if __name__ == "__main__":
    main()
