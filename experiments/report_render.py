"""The text of a report (`experiments/report.py`): the markdown tables and the JSON of the
same numbers."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

from experiments.report_runs import (
    TUNED_KEY,
    ArmResult,
    class_names,
    reference_arm,
    selected_arms,
    varying_keys,
)
from experiments.report_stats import (
    CONFIDENCE,
    Interval,
    difference,
    paired_differences,
    paired_seeds,
    t_interval,
)
from tce_jax.metrics import markdown_table

# Fields that belong to the method compared (the loss, the sampler and the samplers' own
# settings); arms that differ elsewhere are not compared like for like (the report warns).
METHOD_PREFIXES = (
    "loss.",
    "data.class_aware_sampling",
    "data.sampling",  # and data.sampling_* (Stochastic TCE's tilted sampler)
    "data.rcs_",
    "data.repeat_factor_",
)
SUMMARY = (
    ("miou", "mIoU"),
    ("pixel_accuracy", "pixel acc."),
    ("iou_std", "IoU std"),
    ("worst_iou", "worst-class IoU"),
    ("worst25_miou", "worst-25% mIoU"),
)
# The fine-grained figures (Wang et al., NeurIPS 2023; docs/maths.md), columns where the runs
# have them (runs from before they were computed do not).
FINE_GRAINED = (
    ("image_miou", "mIoU^I"),
    ("class_miou", "mIoU^C"),
    ("image_miou_worst5", "worst-5% mIoU^I"),
    ("class_miou_worst5", "worst-5% mIoU^C"),
)
# The figures of the primary questions (docs/experiments.md): fairness first, then its cost.
PRIMARY = ("worst25_miou", "miou")


def summary_columns(arms: Sequence[ArmResult], split: str) -> tuple[tuple[str, str], ...]:
    """The figures of the tables: SUMMARY, then the fine-grained ones some run has on `split`."""
    present = {k for a in arms for r in a.runs for k in r.final.get(split, {})}
    return SUMMARY + tuple((k, n) for k, n in FINE_GRAINED if k in present)


def pm(stat: tuple[float, float, int], scale: float = 100.0) -> str:
    mean, std, n = stat
    if n == 0:
        return "n/a"
    if n == 1 or math.isnan(std):
        return f"{scale * mean:.1f}"
    return f"{scale * mean:.1f} ± {scale * std:.1f}"


def interval_text(iv: Interval, scale: float = 100.0) -> str:
    """``+3.1 [-0.4, +6.6]`` (bold when the interval excludes 0); ``+3.1 (n=1)``; ``n/a``."""
    if iv.n == 0:
        return "n/a"
    if iv.n < 2:
        return f"{scale * iv.mean:+.1f} (n={iv.n})"
    text = f"{scale * iv.mean:+.1f} [{scale * iv.low:+.1f}, {scale * iv.high:+.1f}]"
    return f"**{text}**" if iv.excludes_zero else text


def verdict(iv: Interval, reference_name: str) -> str:
    """The mechanical statement about one paired difference."""
    if iv.n < 2:
        return f"not shown (fewer than 2 paired seeds: no interval; n={iv.n})"
    text = interval_text(iv).strip("*")
    if iv.excludes_zero:
        direction = "higher" if iv.mean > 0 else "lower"
        return f"{direction} than {reference_name} (interval excludes 0: {text} pp)"
    return f"not shown (interval contains 0: {text} pp)"


def verdict_word(iv: Interval) -> str:
    if not iv.excludes_zero:
        return "not shown"
    return "higher" if iv.mean > 0 else "lower"


def _seeds_text(arm: ArmResult) -> str:
    return str(len(arm.runs))


def _pairs_text(arm: ArmResult, reference: ArmResult) -> str:
    seeds = paired_seeds(arm, reference)
    return f"{len(seeds)} ({', '.join(map(str, seeds))})"


def _config_text(arm: ArmResult) -> str:
    if arm.family_size > 1:
        return f"{arm.label} (of {arm.family_size})"
    return arm.label or "-"


def _summary_block(selected: Sequence[ArmResult], reference: ArmResult, split: str) -> list[str]:
    names = dict(SUMMARY)
    lines = [
        f"## Summary ({split}; mechanical, from the intervals below)",
        "",
        f"For each selected arm and the two primary figures: the 95% t-interval of the paired "
        f"difference from {reference.name} excludes 0 (higher / lower than {reference.name}), "
        "or it contains 0 (not shown; this is not evidence of no effect).",
        "",
    ]
    for arm in selected:
        parts = [
            f"{names[k]}: {verdict(difference(arm, reference, split, k), reference.name)}"
            for k in PRIMARY
        ]
        lines.append(
            f"* **{arm.name}** ({len(paired_seeds(arm, reference))} pairs): "
            + "; ".join(parts)
            + "."
        )
    return lines + [""]


def _difference_sections(
    selected: Sequence[ArmResult],
    reference: ArmResult,
    split: str,
    select_split: str,
    metric_name: str,
    names: Sequence[str],
    columns: Sequence[tuple[str, str]],
) -> list[str]:
    """The summary, the paired-difference table and its per-class version (non-CE arms)."""
    others = [a for a in selected if a is not reference]
    if not others:
        return []
    lines = _summary_block(others, reference, split)
    header = ["loss", "configuration", "pairs (seeds)"] + [n for _, n in columns]
    rows = [
        [a.family, _config_text(a), _pairs_text(a, reference)]
        + [interval_text(difference(a, reference, split, k)) for k, _ in columns]
        for a in others
    ]
    tuned = [a for a in others if a.family_size > 1]
    lines += [
        f"## Paired differences from {reference.name} ({split}, percentage points)",
        "",
        f"Per seed, arm minus {reference.name} (same seed; only seeds both ran count); the mean "
        f"over those seeds and its two-sided {CONFIDENCE:.0%} t-interval "
        "`mean ± t(0.975, n-1) s / sqrt(n)`. **Bold**: the interval excludes 0. IoU std: lower "
        "is fairer, so a negative difference is the fairer direction.",
        "",
        markdown_table(header, rows, left=3),
        "",
    ]
    for a in tuned:
        lines.append(
            f"{a.name} was selected among {a.family_size} values of t by {select_split} "
            f"{metric_name}; its {split} intervals are not corrected for that selection."
        )
    if tuned:
        lines.append("")
    header = ["class"] + [a.name for a in others]
    rows = [
        [c] + [interval_text(difference(a, reference, split, f"iou/{c}")) for a in others]
        for c in names
    ]
    lines += [
        f"## Per-class IoU, paired differences from {reference.name} ({split}, percentage points)",
        "",
        markdown_table(header, rows),
        "",
    ]
    return lines


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
    selected = selected_arms(arms, chosen)
    reference = reference_arm(arms, chosen)
    names = class_names(selected, report_split)
    columns = summary_columns(arms, report_split)
    metric_name = dict(SUMMARY + FINE_GRAINED).get(metric, metric)
    lines = [f"# {title}", ""]
    n_runs = sum(len(a.runs) for a in arms)
    seeds = sorted({str(s) for a in arms for s in a.seeds})
    lines += [
        f"{n_runs} finished runs, {len(arms)} configurations in {len(chosen)} families, seeds "
        f"{', '.join(seeds)}" + (f" (from `{root}`)" if root else "") + ".",
        f"Selection: a family is the configurations that differ only in `{TUNED_KEY}`; in each, "
        f"the one with the best mean {metric_name} on the **{select_split}** split over its "
        f"seeds. All figures below are on the **{report_split}** split unless marked, in %.",
        "",
    ]
    differing = [
        k for k in varying_keys([a.config for a in arms]) if not k.startswith(METHOD_PREFIXES)
    ]
    if differing:
        lines += [
            f"**Warning**: the configurations also differ outside the loss and sampler, in "
            f"{', '.join(f'`{k}`' for k in differing)}; comparisons across them are not like "
            "for like.",
            "",
        ]
    if reference is None:
        lines += ["No CE run: no paired differences.", ""]
    else:
        lines += _difference_sections(
            selected, reference, report_split, select_split, metric_name, names, columns
        )

    header = ["loss", f"selected on {select_split}", "seeds"] + [n for _, n in columns]
    rows = [
        [a.family, _config_text(a), _seeds_text(a)]
        + [pm(a.stat(report_split, k)) for k, _ in columns]
        for a in selected
    ]
    lines += [
        f"## Selected configurations ({report_split}, mean ± sample std over seeds)",
        "",
        markdown_table(header, rows, left=2),
        "",
    ]
    header = ["class"] + [a.name for a in selected]
    rows = [[c] + [pm(a.stat(report_split, f"iou/{c}")) for a in selected] for c in names]
    lines += [
        f"## Per-class IoU ({report_split}, selected configurations, mean ± std)",
        "",
        markdown_table(header, rows),
        "",
    ]

    header = [
        "loss",
        "configuration",
        "seeds",
        f"{select_split} {metric_name}",
        f"{select_split} worst-class IoU",
    ] + [n for _, n in columns]
    rows = []
    for a in arms:
        mark = " (selected)" if chosen.get(a.family) is a and a.family_size > 1 else ""
        rows.append(
            [
                a.family,
                (a.label or "-") + mark,
                _seeds_text(a),
                pm(a.stat(select_split, metric)),
                pm(a.stat(select_split, "worst_iou")),
            ]
            + [pm(a.stat(report_split, k)) for k, _ in columns]
        )
    lines += [
        f"## Every configuration ({report_split}, except the two {select_split} columns)",
        "",
        markdown_table(header, rows, left=2),
        "",
    ]
    if unfinished:
        lines += ["## Unfinished runs (not included)", ""]
        lines += [f"* `{p}`" for p in unfinished] + [""]
    return "\n".join(lines)


def _number(x: float) -> float | None:
    return None if math.isnan(x) else float(x)


def _interval_json(iv: Interval) -> dict[str, Any]:
    return {
        "mean": _number(iv.mean),
        "std": _number(iv.std),
        "n": iv.n,
        "ci_low": _number(iv.low),
        "ci_high": _number(iv.high),
        "excludes_zero": iv.excludes_zero,
    }


def summary_json(arms, chosen, select_split, report_split, metric, root=".") -> dict[str, Any]:
    """The report's numbers, machine-readable (fractions, not %; null for undefined).

    Per arm and split: every figure's mean, sample std, n and 95% t-interval of the arm's own
    values; with a CE reference, the paired differences from it (seeds, per-seed differences,
    mean, std and 95% t-interval).
    """
    splits = sorted({s for a in arms for r in a.runs for s in r.final})
    reference = reference_arm(arms, chosen)

    def figure(a: ArmResult, split: str, key: str) -> dict[str, Any]:
        m, sd, n = a.stat(split, key)
        iv = t_interval(a.values(split, key))
        return {
            "mean": _number(m),
            "std": _number(sd),
            "n": n,
            "ci_low": _number(iv.low),
            "ci_high": _number(iv.high),
        }

    def paired(a: ArmResult, split: str, key: str) -> dict[str, Any]:
        seeds, diffs = paired_differences(a, reference, split, key)
        return {
            "seeds": seeds,
            "differences": [float(d) for d in diffs],
            **_interval_json(t_interval(diffs)),
        }

    def arm_entry(a: ArmResult) -> dict[str, Any]:
        keys = sorted({k for r in a.runs for s in r.final.values() for k in s})
        entry = {
            "family": a.family,
            "label": a.label,
            "name": a.name,
            "loss": a.loss,
            "selected": chosen.get(a.family) is a,
            "seeds": a.seeds,
            "runs": [os.path.relpath(r.path, root) for r in a.runs],
            "figures": {s: {k: figure(a, s, k) for k in keys} for s in splits},
        }
        if reference is not None and a is not reference:
            entry["difference_from_reference"] = {
                s: {k: paired(a, s, k) for k in keys} for s in splits
            }
        return entry

    summary = []
    if reference is not None:
        for a in selected_arms(arms, chosen):
            if a is not reference:
                for k in PRIMARY:
                    iv = difference(a, reference, report_split, k)
                    summary.append(
                        {"arm": a.name, "figure": k, "result": verdict_word(iv), "n": iv.n}
                    )
    return {
        "select_split": select_split,
        "report_split": report_split,
        "select_metric": metric,
        "confidence": CONFIDENCE,
        "reference": None if reference is None else reference.name,
        "summary": summary,
        "arms": [arm_entry(a) for a in arms],
    }
