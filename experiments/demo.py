"""The embedded demo: CE and TCE trained with the same budget and seed, compared per class.

    bash scripts/demo.sh            # sets up .venv, then runs this file
    python experiments/demo.py --workdir=workdirs/demo [--steps=N] [--data_dir=DIR]

Each loss trains with `configs/default.py` (only `loss.name` differs) for the demo's budget,
`BUDGET`. The two trainings run at once, as a two-run sweep (`experiments/sweep.py`, one
compute thread each: on 2 CPU cores that trains faster in all than one run after the other),
in `<workdir>/{ce,tce}/seed0`. The run directories keep the checkpoints, TensorBoard events,
reports and the training log (`train.log`); a finished run is not trained again, an interrupted
one resumes from its latest checkpoint.
"""

import argparse
import json
import math
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from experiments import sweep  # noqa: E402 (after the path)

LOSSES = ("ce", "tce")
CONFIG = "configs/default.py"
# Three quarters of the steps of `configs/default.py` (600, the embedded study's budget), so that
# the demo fits in 5 minutes on 2 cores. With 450 steps TCE still leads CE by 10 points of test
# worst-25% mIoU (0.0 vs 10.2) and 5 of mIoU; with 300 by only 6.6 (0.0 vs 6.6).
BUDGET = {"num_train_steps": 450, "eval_every_steps": 450, "checkpoint_every_steps": 150}


def demo_runs(steps: int | None, data_dir: str) -> list[sweep.Run]:
    """The demo's two runs, seed 0: CE and TCE with `BUDGET` (or `steps` steps)."""
    common = dict(BUDGET)
    if steps:
        common["num_train_steps"] = steps
    if data_dir:
        common["data.data_dir"] = data_dir
    grid = sweep.Grid(config=CONFIG, arms=sweep.make_arms(LOSSES), seeds=[0], common=common)
    return sweep.expand(grid)


def prepare_dataset(data_dir: str):
    """Generates the embedded dataset once, here, rather than in both trainings at the same
    time; returns its class names."""
    from configs import default
    from tce_jax import startup
    from tce_jax.datasets import preparation

    config = default.get_config()
    config.data.data_dir = data_dir
    startup.start(config)
    _, spec = preparation.load_builder(config)
    return spec.class_names


def final_figures(run_dir: str, split: str, class_names) -> dict:
    """The figures of `split` in a finished run's `final_metrics.json`, in the form of
    `metrics.segmentation_figures` that `metrics.format_table` reads (NaN where absent), with
    the fine-grained figures the file has."""
    from tce_jax import metrics, workdir

    with open(os.path.join(run_dir, workdir.FINAL_METRICS_FILE)) as f:
        flat = json.load(f)[split]

    figures = {key: flat.get(key, math.nan) for key in metrics.SUMMARY_KEYS}
    figures.update({key: flat[key] for key in metrics.FINE_GRAINED_KEYS if key in flat})
    figures["iou"] = [flat.get(f"iou/{name}", math.nan) for name in class_names]
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=os.path.join(ROOT, "workdirs", "demo"))
    parser.add_argument("--steps", type=int, default=None, help="override num_train_steps")
    parser.add_argument("--data_dir", default="", help="TFDS data dir (default: TFDS's)")
    args = parser.parse_args()

    runs = demo_runs(args.steps, args.data_dir)
    workdir = os.path.abspath(args.workdir)
    class_names = prepare_dataset(args.data_dir)
    try:
        result = sweep.execute(workdir, runs, jobs=len(runs))
    except RuntimeError as e:
        print(f"[demo] {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    if result["failed"]:
        return 1

    from configs import default
    from tce_jax import metrics

    split = default.get_config().data.final_eval_splits[-1]
    results = {
        run.arm: final_figures(sweep.run_dir(workdir, run), split, class_names) for run in runs
    }
    print(f"\nPer-class IoU and fairness figures on the {split} split (%):\n")
    print(metrics.format_table(results, class_names))
    return 0


if __name__ == "__main__":
    sys.exit(main())
