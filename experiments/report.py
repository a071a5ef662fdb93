r"""Tables and plots from finished training workdirs (a sweep's, or any).

    python experiments/report.py --workdir=workdirs/study \
        --out=experiments/results/embedded.md --figures=docs/figures --prefix=embedded_

Reads every run directory under ``--workdir`` that holds ``final_metrics.json`` (the trainer
writes it last, so its presence means the run finished) and its ``config.json``. Runs whose
configs are equal except for the seed (and data paths) form one *arm*; arms with the same loss
(``loss.name``, plus ``loss.class_weights`` for weighted CE) form a *family*.

Selection without peeking: within each family the arm with the best mean ``--select_metric``
(default mIoU) on ``--select_split`` (validation) over its seeds is selected; every figure of
the main tables is then on ``--report_split`` (test). The table of every arm shows both splits.
Aggregates are mean ± sample std (ddof=1) over seeds, in %.

Writes the markdown report (``--out``; also a ``.json`` of the same numbers next to it) and,
with ``--figures``, three PNGs:

* ``<prefix>per_class_iou.png``: per-class IoU of CE and the selected TCE (and Stochastic TCE);
* ``<prefix>tradeoff.png``: worst-class IoU and IoU std against mIoU, one point per arm (a
  line through the t values of each tilted loss), error bars over seeds;
* ``<prefix>curves.png``: per-class training loss and class weights over the steps for CE and
  the selected TCE / Stochastic TCE arms (mean over seeds).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

FINAL_FILE = "final_metrics.json"
CONFIG_FILE = "config.json"
# Config fields that do not define an arm: the seed, and where the data happen to live.
IGNORED_KEYS = ("seed", "data.data_dir", "data.manual_dir")
SUMMARY = (
    ("miou", "mIoU"),
    ("pixel_accuracy", "pixel acc."),
    ("iou_std", "IoU std"),
    ("worst_iou", "worst-class IoU"),
    ("worst25_miou", "worst-25% mIoU"),
)
# Figures where lower is better (for selection).
LOWER_IS_BETTER = ("iou_std", "iou_gap")
FAMILY_ORDER = ("ce", "tce", "stochastic_tce", "weighted_ce", "focal", "lovasz")
DISPLAY = {
    "ce": "CE",
    "tce": "TCE",
    "stochastic_tce": "Stochastic TCE",
    "focal": "focal",
    "lovasz": "Lovász-softmax",
    "weighted_ce": "weighted CE",
}


# ---------------------------------------------------------------------------------------------
# Reading and grouping.


@dataclasses.dataclass
class Run:
    path: str
    config: dict[str, Any]  # flattened: "loss.t" -> 2.0
    final: dict[str, dict[str, float]]  # split -> flat figures

    @property
    def seed(self) -> Any:
        return self.config.get("seed")


@dataclasses.dataclass
class ArmResult:
    family: str
    label: str  # e.g. "t=2"; "" when the family has one arm
    key: tuple  # the arm's config (sorted items, ignored keys removed)
    runs: list[Run]

    @property
    def name(self) -> str:
        return family_display(self.family) + (f" ({self.label})" if self.label else "")

    @property
    def seeds(self) -> list:
        return [r.seed for r in self.runs]

    def values(self, split: str, key: str) -> np.ndarray:
        """The figure of each seed (NaN where a run lacks it)."""
        return np.array([r.final.get(split, {}).get(key, np.nan) for r in self.runs], float)

    def stat(self, split: str, key: str) -> tuple[float, float, int]:
        """``(mean, sample std (ddof=1; NaN for one seed), number of seeds with the figure)``."""
        return mean_std(self.values(split, key))


def mean_std(values: Iterable[float]) -> tuple[float, float, int]:
    v = np.asarray(list(values), float)
    v = v[~np.isnan(v)]
    if v.size == 0:
        return math.nan, math.nan, 0
    std = float(np.std(v, ddof=1)) if v.size > 1 else math.nan
    return float(np.mean(v)), std, int(v.size)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _hashable(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_hashable(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _hashable(v)) for k, v in value.items()))
    return value


def find_runs(root: str) -> tuple[list[Run], list[str]]:
    """Finished runs under ``root`` and the directories of unfinished ones (sorted paths)."""
    finished, unfinished = [], []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "checkpoints")
        if FINAL_FILE in filenames:
            with open(os.path.join(dirpath, CONFIG_FILE)) as f:
                config = flatten(json.load(f))
            with open(os.path.join(dirpath, FINAL_FILE)) as f:
                final = json.load(f)
            finished.append(Run(dirpath, config, final))
        elif CONFIG_FILE in filenames or "run_spec.json" in filenames:
            unfinished.append(dirpath)
    return sorted(finished, key=lambda r: r.path), sorted(unfinished)


def family_of(config: dict[str, Any]) -> str:
    name = str(config.get("loss.name", "?"))
    if name == "weighted_ce":
        return f"weighted_ce:{config.get('loss.class_weights', 'inverse_frequency')}"
    return name


def family_display(family: str) -> str:
    name, _, variant = family.partition(":")
    text = DISPLAY.get(name, name)
    return f"{text} ({variant.replace('_', ' ')})" if variant else text


def _family_sort_key(family: str) -> tuple:
    name = family.partition(":")[0]
    return (FAMILY_ORDER.index(name) if name in FAMILY_ORDER else len(FAMILY_ORDER), family)


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list | tuple):
        return "(" + ",".join(_format_value(v) for v in value) + ")"
    return str(value)


def group_runs(runs: Sequence[Run], ignored: Sequence[str] = IGNORED_KEYS) -> list[ArmResult]:
    """Arms (equal configs but for the seed), labelled by what varies within their family."""
    by_key: dict[tuple, list[Run]] = {}
    for run in runs:
        key = tuple(sorted(
            (k, _hashable(v)) for k, v in run.config.items() if k not in ignored
        ))
        by_key.setdefault(key, []).append(run)
    arms = [
        ArmResult(family_of(group[0].config), "", key, sorted(group, key=lambda r: str(r.seed)))
        for key, group in by_key.items()
    ]
    for arm in arms:
        seeds = arm.seeds
        if len(set(map(str, seeds))) != len(seeds):
            paths = ", ".join(r.path for r in arm.runs)
            raise ValueError(
                f"Runs with the same config and seed appear twice ({paths}); "
                "point --workdir at one sweep, or remove the duplicates."
            )
    families: dict[str, list[ArmResult]] = {}
    for arm in arms:
        families.setdefault(arm.family, []).append(arm)
    for members in families.values():
        varying = varying_keys([dict(a.key) for a in members])
        for arm in members:
            config = dict(arm.key)
            arm.label = ", ".join(
                f"{k.removeprefix('loss.')}={_format_value(config.get(k, '-'))}" for k in varying
            )
    return sorted(arms, key=lambda a: (_family_sort_key(a.family), _arm_sort_key(a)))


def _arm_sort_key(arm: ArmResult) -> tuple:
    parts = []
    for k, v in arm.key:
        if isinstance(v, int | float) and not isinstance(v, bool):
            parts.append((k, 0, float(v), ""))
        else:
            parts.append((k, 1, 0.0, str(v)))
    return tuple(parts)


def varying_keys(configs: Sequence[dict[str, Any]]) -> list[str]:
    """Keys whose value is not the same in every config (missing counts as a value)."""
    keys = sorted(set().union(*configs)) if configs else []
    missing = object()
    return [k for k in keys if len({repr(c.get(k, missing)) for c in configs}) > 1]


def select(arms: Sequence[ArmResult], split: str, metric: str) -> dict[str, ArmResult]:
    """Per family, the arm with the best mean ``metric`` on ``split`` (first of equals)."""
    sign = -1.0 if metric in LOWER_IS_BETTER else 1.0
    chosen: dict[str, ArmResult] = {}
    for arm in arms:
        mean = arm.stat(split, metric)[0]
        if math.isnan(mean):
            raise ValueError(
                f"{arm.name} has no {metric!r} on split {split!r} (in {arm.runs[0].path}); "
                "select on a split every run evaluated (config.data.final_eval_splits)."
            )
        best = chosen.get(arm.family)
        if best is None or sign * mean > sign * best.stat(split, metric)[0]:
            chosen[arm.family] = arm
    return chosen


def class_names(arms: Sequence[ArmResult], split: str) -> list[str]:
    """Class names in the order of the first run's ``iou/<class>`` keys (others appended)."""
    names: list[str] = []
    for arm in arms:
        for run in arm.runs:
            for key in run.final.get(split, {}):
                if key.startswith("iou/") and key[4:] not in names:
                    names.append(key[4:])
    return names


# ---------------------------------------------------------------------------------------------
# Markdown.


def pm(stat: tuple[float, float, int], scale: float = 100.0) -> str:
    mean, std, n = stat
    if n == 0:
        return "n/a"
    if n == 1 or math.isnan(std):
        return f"{scale * mean:.1f}"
    return f"{scale * mean:.1f} ± {scale * std:.1f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], left: int = 1) -> str:
    widths = [max(3, len(h)) for h in header]
    for row in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]

    def line(cells):
        return "| " + " | ".join(
            c.ljust(w) if i < left else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ) + " |"

    rule = "|" + "|".join(
        f" {'-' * w} " if i < left else f" {'-' * (w - 1)}: " for i, w in enumerate(widths)
    ) + "|"
    return "\n".join([line(header), rule, *(line(r) for r in rows)])


def _seeds_text(arm: ArmResult) -> str:
    return str(len(arm.runs))


def render_markdown(
    arms: Sequence[ArmResult],
    chosen: dict[str, ArmResult],
    *,
    select_split: str,
    report_split: str,
    metric: str,
    title: str,
    unfinished: Sequence[str] = (),
    root: str = "",
) -> str:
    families = sorted(chosen, key=_family_sort_key)
    selected = [chosen[f] for f in families]
    names = class_names(selected, report_split)
    metric_name = dict(SUMMARY).get(metric, metric)
    lines = [f"# {title}", ""]
    n_runs = sum(len(a.runs) for a in arms)
    seeds = sorted({str(s) for a in arms for s in a.seeds})
    lines += [
        f"{n_runs} finished runs, {len(arms)} configurations, seeds {', '.join(seeds)}"
        + (f" (from `{root}`)" if root else "") + ".",
        f"Selection: for each loss, the configuration with the best mean {metric_name} on the "
        f"**{select_split}** split over its seeds; all figures below are on the **{report_split}**"
        f" split unless marked. Mean ± sample std (ddof=1) over seeds, in %.",
        "",
    ]
    differing = [k for k in varying_keys([dict(a.key) for a in arms]) if not k.startswith("loss.")]
    if differing:
        lines += [
            f"**Warning**: the configurations also differ outside `loss.*`, in "
            f"{', '.join(f'`{k}`' for k in differing)}; comparisons across them are not like "
            "for like.",
            "",
        ]
    header = ["loss", f"selected on {select_split}", "seeds"] + [n for _, n in SUMMARY]
    rows = [
        [family_display(a.family), a.label or "-", _seeds_text(a)]
        + [pm(a.stat(report_split, k)) for k, _ in SUMMARY]
        for a in selected
    ]
    lines += [f"## Selected configurations ({report_split})", "", _table(header, rows, left=2), ""]

    header = ["class"] + [a.name for a in selected]
    rows = [[c] + [pm(a.stat(report_split, f"iou/{c}")) for a in selected] for c in names]
    lines += [f"## Per-class IoU ({report_split}, selected configurations)", "",
              _table(header, rows), ""]

    header = ["loss", "configuration", "seeds", f"{select_split} {metric_name}",
              f"{select_split} worst-class IoU"] + [n for _, n in SUMMARY]
    rows = []
    family_sizes = {f: sum(a.family == f for a in arms) for f in chosen}
    for a in arms:
        mark = " (selected)" if chosen.get(a.family) is a and family_sizes[a.family] > 1 else ""
        rows.append(
            [family_display(a.family), (a.label or "-") + mark, _seeds_text(a),
             pm(a.stat(select_split, metric)), pm(a.stat(select_split, "worst_iou"))]
            + [pm(a.stat(report_split, k)) for k, _ in SUMMARY]
        )
    lines += [
        f"## Every configuration ({report_split}, except the two {select_split} columns)",
        "",
        _table(header, rows, left=2),
        "",
    ]
    if unfinished:
        lines += ["## Unfinished runs (not included)", ""]
        lines += [f"* `{p}`" for p in unfinished] + [""]
    return "\n".join(lines)


def summary_json(arms, chosen, select_split, report_split, metric, root=".") -> dict[str, Any]:
    """The report's numbers, machine-readable (fractions, not %; null for undefined)."""

    def number(x: float) -> float | None:
        return None if math.isnan(x) else x

    splits = sorted({s for a in arms for r in a.runs for s in r.final})

    def arm_entry(a: ArmResult) -> dict[str, Any]:
        keys = sorted({k for r in a.runs for s in r.final.values() for k in s})
        return {
            "family": a.family,
            "label": a.label,
            "selected": chosen.get(a.family) is a,
            "seeds": a.seeds,
            "runs": [os.path.relpath(r.path, root) for r in a.runs],
            "figures": {
                s: {
                    k: {"mean": number(m), "std": number(sd), "n": n}
                    for k in keys
                    for m, sd, n in [a.stat(s, k)]
                }
                for s in splits
            },
        }

    return {
        "select_split": select_split,
        "report_split": report_split,
        "select_metric": metric,
        "arms": [arm_entry(a) for a in arms],
    }


# ---------------------------------------------------------------------------------------------
# Plots.


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_per_class(arms: Sequence[ArmResult], split: str, path: str) -> None:
    """Grouped bars of per-class IoU (mean ± std over seeds) for the given arms."""
    plt = _pyplot()
    names = class_names(arms, split)
    x = np.arange(len(names))
    width = 0.8 / max(len(arms), 1)
    fig, ax = plt.subplots(figsize=(min(max(9.0, 0.3 * len(names) * len(arms)), 40.0), 3.6),
                           dpi=100)
    for i, arm in enumerate(arms):
        stats = [arm.stat(split, f"iou/{c}") for c in names]
        mean = np.array([100 * s[0] for s in stats])
        std = np.array([100 * s[1] if s[2] > 1 else 0.0 for s in stats])
        ax.bar(x + (i - (len(arms) - 1) / 2) * width, mean, width, yerr=std, capsize=2,
               label=f"{arm.name}  mIoU {pm(arm.stat(split, 'miou'))}", color=f"C{i}")
    ax.set_xticks(x, [n.replace("_", " ") for n in names], rotation=30, ha="right")
    ax.set_ylabel(f"IoU on {split} (%)")
    ax.set_ylim(0, 100)
    ax.grid(axis="y", alpha=0.3)
    n = max(len(a.runs) for a in arms)
    ax.set_title(f"Per-class IoU, mean ± std over {n} seeds", fontsize=10)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _tilt(arm: ArmResult) -> float | None:
    value = dict(arm.key).get("loss.t")
    return float(value) if isinstance(value, int | float) else None


def plot_tradeoff(arms: Sequence[ArmResult], split: str, path: str) -> None:
    """Fairness figures against mIoU, one point per arm; tilted families joined along t."""
    plt = _pyplot()
    panels = (("worst_iou", "worst-class IoU", "higher is fairer"),
              ("worst25_miou", "worst-25% mIoU", "higher is fairer"),
              ("iou_std", "std of per-class IoU", "lower is fairer"))
    fig, axes = plt.subplots(1, len(panels), figsize=(13, 4.2), dpi=90)
    families: dict[str, list[ArmResult]] = {}
    for arm in arms:
        families.setdefault(arm.family, []).append(arm)
    markers = "osD^v<>pPX*h"
    for ax, (key, label, direction) in zip(axes, panels, strict=True):
        for i, family in enumerate(sorted(families, key=_family_sort_key)):
            members = families[family]
            tilted = all(_tilt(a) is not None for a in members) and len(members) > 1
            if tilted:
                members = sorted(members, key=_tilt)
            xs = [a.stat(split, "miou") for a in members]
            ys = [a.stat(split, key) for a in members]
            x = np.array([100 * s[0] for s in xs])
            y = np.array([100 * s[0] for s in ys])
            xerr = np.array([100 * s[1] if s[2] > 1 else 0.0 for s in xs])
            yerr = np.array([100 * s[1] if s[2] > 1 else 0.0 for s in ys])
            ax.errorbar(x, y, xerr=xerr, yerr=yerr, fmt=("-" if tilted else "") + markers[i % 12],
                        color=f"C{i}", capsize=2, ms=5, lw=1, label=family_display(family))
            if tilted:
                for a, xi, yi in zip(members, x, y, strict=True):
                    ax.annotate(f"t={_tilt(a):g}", (xi, yi), fontsize=7, xytext=(3, 3),
                                textcoords="offset points", color=f"C{i}")
        ax.set_xlabel(f"mIoU on {split} (%)")
        ax.set_ylabel(f"{label} on {split} (%)")
        ax.set_title(direction, fontsize=9)
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6), fontsize=8)
    n = max(len(a.runs) for a in arms)
    fig.suptitle(f"Fairness against accuracy (error bars: std over {n} seeds)", fontsize=10)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path)
    plt.close(fig)


def read_jsonl(path: str) -> list[dict[str, Any]]:
    """Records of a ``*.jsonl`` file, one per step (the last one wins after a resume)."""
    by_step: dict[Any, dict[str, Any]] = {}
    if not os.path.exists(path):
        return []
    with open(path) as f:
        for line in f:
            if line.strip():
                record = json.loads(line)
                by_step[(record.get("step"), record.get("split"))] = record
    return sorted(by_step.values(), key=lambda r: r.get("step", 0))


def training_curves(arm: ArmResult, prefix: str) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Steps and, per class, the mean over seeds of ``train/<prefix>/<class>`` at those steps.

    Only the steps every seed logged are kept.
    """
    per_run = []
    for run in arm.runs:
        records = read_jsonl(os.path.join(run.path, "train_metrics.jsonl"))
        per_run.append({r["step"]: r for r in records})
    steps = sorted(set.intersection(*(set(r) for r in per_run))) if per_run else []
    tag = f"train/{prefix}/"
    classes = []
    for records in per_run:
        for record in records.values():
            for k in record:
                if k.startswith(tag) and k[len(tag):] not in classes:
                    classes.append(k[len(tag):])
    curves = {
        c: np.array([
            np.nanmean([records[s].get(tag + c, np.nan) for records in per_run]) for s in steps
        ]) if steps else np.array([])
        for c in classes
    }
    return np.array(steps), curves


def _curve_classes(arms: Sequence[ArmResult], max_classes: int) -> list[str] | None:
    """All classes, or the ``max_classes`` with the highest final loss in the first arm."""
    steps, curves = training_curves(arms[0], "class_loss")
    if len(curves) <= max_classes:
        return None
    final = {name: values[-1] for name, values in curves.items() if values.size}
    return sorted(final, key=final.get, reverse=True)[:max_classes]


def plot_curves(arms: Sequence[ArmResult], path: str, max_classes: int = 20) -> None:
    """Rows: per-class training loss, class weights; one column per arm.

    With more than ``max_classes`` classes, only those with the highest final training loss
    in the first arm are drawn (said in the title).
    """
    plt = _pyplot()
    fig, axes = plt.subplots(2, len(arms), figsize=(3.6 * len(arms) + 1.6, 5.6), dpi=80,
                             squeeze=False, sharex="col")
    keep = _curve_classes(arms, max_classes)
    legend = None
    colours = plt.get_cmap("tab10").colors
    for col, arm in enumerate(arms):
        for row, (prefix, label) in enumerate(
            (("class_loss", "per-class loss (CE)"), ("class_weight", "class weight"))
        ):
            ax = axes[row, col]
            steps, curves = training_curves(arm, prefix)
            if keep is not None:
                curves = {k: v for k, v in curves.items() if k in keep}
            if not curves:
                ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
            for i, (name, values) in enumerate(curves.items()):
                ax.plot(steps, values, lw=1.2, color=colours[i % 10],
                        ls=("-", "--")[(i // 10) % 2], label=name.replace("_", " "))
            if curves and legend is None:
                legend = ax.get_legend_handles_labels()
            if prefix == "class_weight" and curves:
                ax.set_yscale("log")
            ax.grid(alpha=0.3)
            if row == 0:
                ax.set_title(arm.name, fontsize=10)
            else:
                ax.set_xlabel("step")
            if col == 0:
                ax.set_ylabel(label)
    if legend:
        fig.legend(*legend, loc="center right", fontsize=8)
    n = max(len(a.runs) for a in arms)
    title = f"Training curves (mean over {n} seeds, averaged over each logging interval)"
    if keep is not None:
        title += f"; the {len(keep)} classes of highest final loss in {arms[0].name}"
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1 - 1.5 / (3.6 * len(arms) + 1.6), 1))
    fig.savefig(path)
    plt.close(fig)


def make_plots(arms, chosen, split: str, out_dir: str, prefix: str = "") -> list[str]:
    """Writes the three PNGs (those that the finished runs allow); returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    compared = [chosen[f] for f in ("ce", "tce", "stochastic_tce") if f in chosen]
    if compared:
        path = os.path.join(out_dir, f"{prefix}per_class_iou.png")
        plot_per_class(compared, split, path)
        paths.append(path)
        path = os.path.join(out_dir, f"{prefix}curves.png")
        plot_curves(compared, path)
        paths.append(path)
    path = os.path.join(out_dir, f"{prefix}tradeoff.png")
    plot_tradeoff(arms, split, path)
    paths.append(path)
    return paths


# ---------------------------------------------------------------------------------------------
# Command line.


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
    parser.add_argument("--select_metric", default="miou",
                        help="figure that selects hyper-parameters (miou, worst_iou, ...)")
    parser.add_argument("--title", default="Results")
    args = parser.parse_args(argv)
    if args.select_split == args.report_split:
        print(f"[report] warning: selecting and reporting on the same split "
              f"({args.select_split!r}) overstates the selected configurations.", file=sys.stderr)

    runs, unfinished = find_runs(args.workdir)
    if not runs:
        print(f"[report] no finished run (no {FINAL_FILE}) under {args.workdir}", file=sys.stderr)
        return 1
    missing = [r.path for r in runs if args.report_split not in r.final]
    if missing:
        print(f"[report] split {args.report_split!r} missing from {len(missing)} run(s), e.g. "
              f"{missing[0]}; pass --report_split with a split every run evaluated.",
              file=sys.stderr)
        return 1
    arms = group_runs(runs)
    chosen = select(arms, args.select_split, args.select_metric)
    text = render_markdown(
        arms, chosen, select_split=args.select_split, report_split=args.report_split,
        metric=args.select_metric, title=args.title, unfinished=unfinished,
        root=os.path.relpath(args.workdir),
    )
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text)
        with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
            json.dump(summary_json(arms, chosen, args.select_split, args.report_split,
                                   args.select_metric, root=args.workdir), f, indent=1)
        print(f"[report] wrote {args.out}")
    else:
        print(text)
    if args.figures:
        for path in make_plots(arms, chosen, args.report_split, args.figures, args.prefix):
            print(f"[report] wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
