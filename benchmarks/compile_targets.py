"""The recipes compiled for the accelerators users book: what fits, and a bound on the time.

    JAX_PLATFORMS=cpu python benchmarks/compile_targets.py \
        [--targets=h100:1x1x8,a100-80gb:1x1x8,v5e:2x4,v4:2x2x1] [--recipes=cityscapes,ade20k] \
        [--only=cityscapes/h100:1x1x8/train]

Each recipe of `RECIPES` (DeepLabV3+, and SegFormer with its smallest and largest encoders; the
config as shipped, with its `slide` variant so that both evaluations are compiled) is compiled
for each target without the devices (`tce_jax.compile_mode`, as `--mode=compile` does; needs
`pip install -e '.[compile-gpu,compile-tpu]'`): the train step, the whole-image eval step and
the sliding-window eval step; and the DeepLabV3+ variants' train steps (R50, bf16,
`grad_accum_steps=2`) for one GPU and one TPU target. Each row of
benchmarks/results/compile_targets.md is written as soon as its step has compiled, and rows
already there are not compiled again (delete a row to redo it): a full run takes hours on a
few CPU cores, so it can stop and resume. `--only` keeps the steps whose
`recipe/target/step` contains any of its comma-separated parts.
"""

import argparse
import os
import platform
import re
import sys
import time
from typing import NamedTuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the CUDA plugin only compiles

TARGETS = ("h100:1x1x8", "a100-80gb:1x1x8", "v5e:2x4", "v4:2x2x1")
STEPS = ("train", "eval (whole)", "eval (sliding)")


class Recipe(NamedTuple):
    """A row group: the config (`path:variants`), dotted overrides, and which targets and steps
    it is compiled for (a variant only changes the train step; one GPU and one TPU target)."""

    config: str
    overrides: dict = {}
    targets: tuple[str, ...] = TARGETS
    steps: tuple[str, ...] = STEPS


_VARIANT_TARGETS = ("h100:1x1x8", "v4:2x2x1")
RECIPES = {
    "cityscapes": Recipe("configs/cityscapes.py:tce,slide"),
    "ade20k": Recipe("configs/ade20k.py:tce,slide"),
    # The variants: a smaller backbone, bf16 compute, and the global
    # batch as two micro-batches (exact gradient accumulation).
    "cityscapes r50": Recipe("configs/cityscapes.py:tce,r50", {}, _VARIANT_TARGETS, ("train",)),
    "cityscapes bf16": Recipe("configs/cityscapes.py:tce,bf16", {}, _VARIANT_TARGETS, ("train",)),
    # Two micro-batches need a per-device batch of 2 or more: 4 GPUs for the global batch of 8.
    "cityscapes accum 2": Recipe(
        "configs/cityscapes.py:tce", {"grad_accum_steps": 2}, ("h100:1x1x4", "v4:2x2x1"), ("train",)
    ),
    # SegFormer's recipes, smallest and largest encoder (Cityscapes' evaluates by sliding window).
    "cityscapes_segformer_b0": Recipe("configs/cityscapes.py:tce,segformer_b0"),
    "cityscapes_segformer_b5": Recipe("configs/cityscapes.py:tce,segformer_b5"),
    "ade20k_segformer_b0": Recipe("configs/ade20k.py:tce,segformer_b0,slide"),
    "ade20k_segformer_b5": Recipe("configs/ade20k.py:tce,segformer_b5,slide"),
}
FILE = "compile_targets.md"
COLUMNS = (
    "recipe", "target", "step", "fits", "GiB per device", "TFLOP per device", "step time bound",
    "run estimate", "compiled in",
)  # fmt: skip
_ROW = re.compile(r"^\| (?P<recipe>[^|]+) \| (?P<target>[^|]+) \| (?P<step>[^|]+) \|")


def read_rows(path) -> dict[tuple[str, str, str], str]:
    """The table rows already measured, by (recipe, target, step)."""
    rows = {}
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                match = _ROW.match(line)
                if match and match["recipe"] in RECIPES:
                    rows[match["recipe"], match["target"], match["step"]] = line.rstrip("\n")
    return rows


def row(recipe: str, config, report) -> str:
    from tce_jax import compile_mode

    gib = 2**30
    estimate = ""
    if report.name == "train step":
        hours = compile_mode.run_hours(config, report)
        estimate = f"{hours:.1f} h ({config.num_train_steps // 1000}k steps)"
    cells = (
        recipe,
        report.target.name,
        report.name.removesuffix(" step"),
        "yes" if report.fits else "**no**",
        f"{report.peak_bytes / gib:.2f} of {report.memory_bytes / gib:.0f}",
        f"{report.flops / 1e12:.2f}",
        f"{report.step_seconds_bound * 1e3:.0f} ms",
        estimate,
        f"{report.compile_seconds / 60:.1f} min",
    )
    return "| " + " | ".join(cells) + " |"


def write(path, rows: dict, command: str) -> None:
    import jax

    from tce_jax import compile_mode

    order = {key: i for i, key in enumerate(_all_keys(RECIPES))}
    keys = sorted(rows, key=lambda k: order.get(k, len(order)))
    missing = [k for k in _all_keys(RECIPES) if k not in rows]
    lines = [
        "Compiled without the devices by `python benchmarks/compile_targets.py` (each row as its "
        f"step compiled; last run: `{command}`; JAX {jax.__version__}, {platform.machine()}, "
        f"{os.cpu_count()} CPU cores); recipes as shipped "
        f"({', '.join(f'`{r.config}`' for r in RECIPES.values() if not r.overrides)}; "
        "`accum 2`: `--config.grad_accum_steps=2`), float32 unless `bf16`, global batch and eval "
        "batch as the config says, evaluation on the nominal canvas of "
        "`compile_mode.NOMINAL_EVAL_SIZES` (Cityscapes 1024x2048, ADE20K 704x704).",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: |",
        *(rows[k] for k in keys),
        "",
        "GiB per device: arguments + outputs + temporaries - donated, of the device's memory "
        "(GPU: without cuDNN/cuBLAS workspace, which XLA sizes only when autotuning on a "
        "device). TFLOP per device and step: XLA's count (GPU: of the unoptimized program); "
        "a loop (sliding windows) counts its body once, so eval figures are lower bounds. "
        "Step time bound: FLOPs at peak rate or the step's inputs and outputs at full memory "
        f"bandwidth, whichever is longer. Run estimate: steps x bound / {compile_mode.UTILISATION}"
        " utilisation, training only.",
        "",
        "Not compiled yet: "
        + ("; ".join("/".join(k) for k in missing) if missing else "nothing (all compiled)."),
    ]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def _all_keys(recipes: dict[str, Recipe]):
    return [(n, t, s) for n, r in recipes.items() for t in r.targets for s in r.steps]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--targets", default="", help="keep these targets (default: each recipe's own)"
    )
    parser.add_argument("--recipes", default=",".join(RECIPES))
    parser.add_argument("--only", default="", help="recipe/target/step substrings, commas")
    args = parser.parse_args()

    import results_file

    from experiments.train_run import apply_overrides, load_config
    from tce_jax import compile_mode, config_lib

    path = results_file.RESULTS / FILE
    rows = read_rows(path)
    only = [part for part in args.only.split(",") if part]
    command = "python benchmarks/compile_targets.py" + "".join(
        f" {a}" for a in sys.argv[1:] if a.startswith("--")
    )
    targets = args.targets.split(",") if args.targets else None
    for recipe in args.recipes.split(","):
        spec = RECIPES[recipe]
        config = apply_overrides(load_config(spec.config), spec.overrides)
        config_lib.validate_config(config)
        for target in (t for t in spec.targets if targets is None or t in targets):
            for step in spec.steps:
                key = (recipe, target, step)
                if key in rows or (only and not any(p in "/".join(key) for p in only)):
                    continue
                print(f"compiling {'/'.join(key)} ...", flush=True)
                start = time.perf_counter()
                try:
                    (report,) = compile_mode.compile_steps(config, target, only=(step,))
                    print(report.summary(), flush=True)
                    rows[key] = row(recipe, config, report)
                except Exception as error:  # recorded: XLA's refusal is a result too
                    first = (str(error).strip().splitlines() or [type(error).__name__])[0]
                    first = first.replace("|", "/")
                    minutes = (time.perf_counter() - start) / 60
                    print(f"  failed: {first}", flush=True)
                    cells = (*key, f"fails: {first[:120]}", "", "", "", "", f"{minutes:.1f} min")
                    rows[key] = "| " + " | ".join(cells) + " |"
                write(path, rows, command)
    print(path.read_text(), end="")


if __name__ == "__main__":
    main()
