r"""Tables and plots from finished training workdirs (a sweep's, or any).

    python experiments/report.py --workdir=workdirs/study \
        --out=experiments/results/embedded.md --figures=docs/figures --prefix=embedded_

Reads every run directory under ``--workdir`` that holds ``final_metrics.json`` (the trainer
writes it last, so its presence means the run finished) and its ``config.json`` (fields that an
older config.json lacks take the value the code had before the field existed: the defaults of
``tce_jax.config_lib.get_base_config``, except ``tce_jax.workdir.BEHAVIOUR_BEFORE_FIELD``).
Runs whose configs are equal except for the seed (and data paths) form one *arm*; arms whose
configs are equal except for ``loss.t`` form a *family* (e.g. TCE at t = 1, 2, 5), named from
its loss fields ("TCE", "TCE (uniform prior)", "Stochastic TCE (EMA)", ...).

Selection without peeking: within each family the arm with the best mean ``--select_metric``
(default mIoU) on ``--select_split`` (validation) over its seeds is selected; every figure of
the main tables is then on ``--report_split`` (test). The table of every arm shows both splits.
Aggregates are mean ± sample std (ddof=1) over seeds, in %. The tables' figures are mIoU, pixel
accuracy, IoU std, worst-class IoU and worst-25% mIoU, then the fine-grained mIoU^I, mIoU^C and
their worst-5% figures where the runs have them (docs/comparison.md).

Paired statistics: each selected arm is paired with the CE family's selected arm by seed (only
seeds both have count); per figure, the per-seed differences arm - CE, their mean and the
two-sided 95% t-interval ``mean ± t_{0.975, n-1} s / sqrt(n)`` (``s`` the sample std of the
differences), in percentage points. An interval that excludes 0 is shown in bold; the summary
block states, mechanically, for the two primary figures (worst-25% mIoU and mIoU) whether the
interval is above or below 0, or "not shown" when it contains 0.

Writes the markdown report (``--out``; also a ``.json`` of the same numbers next to it) and,
with ``--figures``, three PNGs:

* ``<prefix>per_class_iou.png``: per-class IoU of every selected arm (mean over seeds, the
  seeds' min-max as error bars);
* ``<prefix>frontier.png``: the fairness-accuracy frontier, worst-25% mIoU against mIoU, one
  point per selected arm at its mean with the 95% t-interval of its own values over seeds on
  both axes, and the Pareto front of the means;
* ``<prefix>curves.png``: per-class training loss and class weights over the steps for the
  selected CE, TCE and Stochastic TCE arms (mean over seeds).

This file is the command line; the work is in ``report_runs.py`` (reading, grouping, selection),
``report_stats.py`` (t-intervals), ``report_render.py`` (markdown, JSON) and ``report_plots.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)  # run as a script: the report's modules are experiments.report_*

# After the path of this checkout:
from experiments.report_plots import make_plots  # noqa: E402
from experiments.report_render import render_markdown, summary_json  # noqa: E402
from experiments.report_runs import find_runs, group_runs, select  # noqa: E402
from tce_jax import workdir  # noqa: E402


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", required=True, help="directory holding the run dirs")
    parser.add_argument("--out", default="", help="markdown file to write (default: stdout)")
    parser.add_argument("--figures", default="", help="directory for the PNGs (none if empty)")
    parser.add_argument("--prefix", default="", help="prefix of the PNG file names")
    parser.add_argument("--select_split", default="validation")
    parser.add_argument("--report_split", default="test")
    parser.add_argument(
        "--select_metric",
        default="miou",
        help="figure that selects hyper-parameters (miou, worst_iou, ...)",
    )
    parser.add_argument("--title", default="Results")
    args = parser.parse_args(argv)
    if args.select_split == args.report_split:
        print(
            f"[report] warning: selecting and reporting on the same split "
            f"({args.select_split!r}) overstates the selected configurations.",
            file=sys.stderr,
        )

    runs, unfinished = find_runs(args.workdir)
    if not runs:
        print(
            f"[report] no finished run (no {workdir.FINAL_METRICS_FILE}) under {args.workdir}",
            file=sys.stderr,
        )
        return 1
    missing = [r.path for r in runs if args.report_split not in r.final]
    if missing:
        print(
            f"[report] split {args.report_split!r} missing from {len(missing)} run(s), e.g. "
            f"{missing[0]}; pass --report_split with a split every run evaluated.",
            file=sys.stderr,
        )
        return 1
    arms = group_runs(runs)
    chosen = select(arms, args.select_split, args.select_metric)
    text = render_markdown(
        arms,
        chosen,
        select_split=args.select_split,
        report_split=args.report_split,
        metric=args.select_metric,
        title=args.title,
        unfinished=unfinished,
        root=os.path.relpath(args.workdir),
    )
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text)
        with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
            json.dump(
                summary_json(
                    arms,
                    chosen,
                    args.select_split,
                    args.report_split,
                    args.select_metric,
                    root=args.workdir,
                ),
                f,
                indent=1,
            )
        print(f"[report] wrote {args.out}")
    else:
        print(text)
    if args.figures:
        for path in make_plots(arms, chosen, args.report_split, args.figures, args.prefix):
            print(f"[report] wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
