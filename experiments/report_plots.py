"""The figures of a report (`experiments/report.py`): per-class IoU, the fairness-accuracy
frontier and the training curves."""

from __future__ import annotations

import os
import textwrap
from collections.abc import Sequence
from typing import Any

import numpy as np

from experiments.report_render import pm
from experiments.report_runs import (
    REFERENCE_LOSS,
    TILTED_LOSSES,
    ArmResult,
    class_names,
    selected_arms,
)
from experiments.report_stats import Interval, t_interval
from tce_jax import workdir


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _mean_and_range(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row of ``values[class, seed]``: the mean over seeds and its distances to the min and max.

    NaN seeds are skipped; a row without any value draws as 0 (no bar).
    """
    filled = np.where(np.isnan(values).all(axis=1, keepdims=True), 0.0, values)
    mean = np.nanmean(filled, axis=1)
    return mean, mean - np.nanmin(filled, axis=1), np.nanmax(filled, axis=1) - mean


def plot_per_class(arms: Sequence[ArmResult], split: str, path: str) -> None:
    """Grouped bars of per-class IoU: mean over seeds, the seeds' min-max as error bars."""
    plt = _pyplot()
    names = class_names(arms, split)
    x = np.arange(len(names))
    width = 0.8 / max(len(arms), 1)
    fig, ax = plt.subplots(
        figsize=(min(max(9.0, 0.16 * len(names) * len(arms)), 30.0), 4.2), dpi=90
    )
    for i, arm in enumerate(arms):
        values = np.array([100 * arm.values(split, f"iou/{c}") for c in names], float)
        mean, low, high = _mean_and_range(values.reshape(len(names), len(arm.runs)))
        ax.bar(
            x + (i - (len(arms) - 1) / 2) * width,
            mean,
            width,
            yerr=[low, high],
            capsize=1.5,
            error_kw={"lw": 0.8},
            label=f"{arm.name}  (mIoU {pm(arm.stat(split, 'miou'))})",
            color=f"C{i % 10}",
            hatch=("", "//")[(i // 10) % 2],
        )
    ax.set_xticks(x, [n.replace("_", " ") for n in names], rotation=30, ha="right")
    ax.set_ylabel(f"IoU on {split} (%)")
    ax.set_ylim(0, 100)
    ax.grid(axis="y", alpha=0.3)
    n = max(len(a.runs) for a in arms)
    ax.set_title(
        f"Per-class IoU of the selected configurations: mean over {n} seeds, "
        "error bars from the lowest to the highest seed",
        fontsize=10,
    )
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both coordinates (higher is better), by x.

    A point is dominated when another is at least as high on both and higher on one.
    """
    front = []
    for i, (xi, yi) in enumerate(points):
        dominated = any(
            xj >= xi and yj >= yi and (xj > xi or yj > yi)
            for j, (xj, yj) in enumerate(points)
            if j != i
        )
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: (points[i][0], -points[i][1]))


def _half_width(iv: Interval) -> float:
    return 0.0 if iv.n < 2 else 100 * (iv.high - iv.mean)


def plot_frontier(arms: Sequence[ArmResult], split: str, path: str) -> None:
    """Worst-25% mIoU against mIoU, one point per arm at its mean with 95% t-intervals."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9.5, 5.2), dpi=90)
    markers = "osD^v<>pPX*h"
    points = []
    for i, arm in enumerate(arms):
        x = t_interval(arm.values(split, "miou"))
        y = t_interval(arm.values(split, "worst25_miou"))
        points.append((100 * x.mean, 100 * y.mean))
        ax.errorbar(
            100 * x.mean,
            100 * y.mean,
            xerr=_half_width(x),
            yerr=_half_width(y),
            fmt=markers[i % len(markers)],
            color=f"C{i % 10}",
            capsize=3,
            ms=7,
            lw=1,
            label=f"{arm.name} (n={min(x.n, y.n)})",
        )
    front = pareto_front(points)
    ax.plot(
        [points[i][0] for i in front],
        [points[i][1] for i in front],
        "--",
        color="0.4",
        lw=1,
        zorder=0,
        label="Pareto front of the means",
    )
    ax.set_xlabel(f"mIoU on {split} (%), mean over seeds")
    ax.set_ylabel(f"worst-25% mIoU on {split} (%), mean over seeds")
    ax.set_title(
        "Fairness against accuracy (up and right is better)\nerror bars: 95% t-interval "
        "of each arm's own values over seeds, not of its difference from CE",
        fontsize=9,
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def records_by_step(path: str) -> dict[Any, dict[str, Any]]:
    """``{step: record}`` of a ``*.jsonl`` log (the last record of a step wins after a resume);
    empty when the run logged none."""
    if not os.path.exists(path):
        return {}
    return {record["step"]: record for record in workdir.read_jsonl(path)}


def training_curves(arm: ArmResult, prefix: str) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Steps and, per class, the mean over seeds of ``train/<prefix>/<class>`` at those steps.

    Only the steps every seed logged are kept.
    """
    per_run = []
    for run in arm.runs:
        per_run.append(records_by_step(os.path.join(run.path, workdir.TRAIN_METRICS_FILE)))
    steps = sorted(set.intersection(*(set(r) for r in per_run))) if per_run else []
    tag = f"train/{prefix}/"
    classes = []
    for records in per_run:
        for record in records.values():
            for k in record:
                if k.startswith(tag) and k[len(tag) :] not in classes:
                    classes.append(k[len(tag) :])
    curves = {
        c: np.array(
            [np.nanmean([records[s].get(tag + c, np.nan) for records in per_run]) for s in steps]
        )
        if steps
        else np.array([])
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
    width = 3.2 * len(arms) + 1.6
    fig, axes = plt.subplots(
        2, len(arms), figsize=(width, 5.6), dpi=80, squeeze=False, sharex="col"
    )
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
                ax.plot(
                    steps,
                    values,
                    lw=1.2,
                    color=colours[i % 10],
                    ls=("-", "--")[(i // 10) % 2],
                    label=name.replace("_", " "),
                )
            if curves and legend is None:
                legend = ax.get_legend_handles_labels()
            if prefix == "class_weight" and curves:
                ax.set_yscale("log")
            ax.grid(alpha=0.3)
            if row == 0:
                ax.set_title(textwrap.fill(arm.name, 36), fontsize=8)
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
    fig.tight_layout(rect=(0, 0, 1 - 1.5 / width, 1))
    fig.savefig(path)
    plt.close(fig)


def make_plots(arms, chosen, split: str, out_dir: str, prefix: str = "") -> list[str]:
    """Writes the three PNGs (those that the finished runs allow); returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    selected = selected_arms(arms, chosen)
    paths = [os.path.join(out_dir, f"{prefix}{name}.png") for name in ("per_class_iou", "frontier")]
    plot_per_class(selected, split, paths[0])
    plot_frontier(selected, split, paths[1])
    tilted = [a for a in selected if a.loss in (REFERENCE_LOSS, *TILTED_LOSSES)]
    if tilted:
        paths.append(os.path.join(out_dir, f"{prefix}curves.png"))
        plot_curves(tilted, paths[-1])
    return paths
