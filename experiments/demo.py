"""The embedded demo: CE and TCE trained with the same budget and seed, compared per class.

    bash scripts/demo.sh            # sets up .venv, then runs this file
    python experiments/demo.py --workdir=workdirs/demo [--steps=N]

Each loss trains with `configs/default.py` (only `loss.name` differs); the workdirs keep the
checkpoints, TensorBoard events and reports, and a finished run is not trained again.
"""

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

LOSSES = ("ce", "tce")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=os.path.join(ROOT, "workdirs", "demo"))
    parser.add_argument("--steps", type=int, default=None, help="override num_train_steps")
    parser.add_argument("--data_dir", default="", help="TFDS data dir (default: TFDS's)")
    args = parser.parse_args()

    from configs import default
    from tce_jax import metrics, startup, train

    startup.start(default.get_config())
    results, spec = {}, None
    for loss in LOSSES:
        config = default.get_config(loss)
        config.data.data_dir = args.data_dir
        if args.steps:
            config.num_train_steps = args.steps
        workdir = os.path.join(args.workdir, loss)
        start = time.time()
        print(f"=== training {loss} (t={config.loss.t}) in {workdir}", flush=True)
        figures = train.train_and_evaluate(config, workdir)
        print(f"=== {loss} done in {time.time() - start:.0f} s", flush=True)
        results[loss] = figures[config.data.final_eval_splits[-1]]
        if spec is None:
            from tce_jax import datasets

            spec = datasets.get_dataset_spec(config.data.name)
    split = default.get_config().data.final_eval_splits[-1]
    print(f"\nPer-class IoU and fairness figures on the {split} split (%):\n")
    print(metrics.format_table(results, spec.class_names))


if __name__ == "__main__":
    main()
