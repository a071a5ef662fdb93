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
Aggregates are mean ± sample std (ddof=1) over seeds, in %.

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
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import textwrap
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from scipy import stats

from tce_jax import workdir
from tce_jax.metrics import markdown_table

FINAL_FILE = "final_metrics.json"
CONFIG_FILE = "config.json"
# Config fields that do not define an arm: the seed, and where the data happen to live.
IGNORED_KEYS = ("seed", "data.data_dir", "data.manual_dir")
# The field selection picks within a family: arms that differ only here are one family.
TUNED_KEY = "loss.t"
# Fields that belong to the method compared (the loss and Stochastic TCE's sampler); arms that
# differ elsewhere are not compared like for like (the report warns).
METHOD_PREFIXES = ("loss.", "data.class_aware_sampling", "data.sampling_")
SUMMARY = (
    ("miou", "mIoU"),
    ("pixel_accuracy", "pixel acc."),
    ("iou_std", "IoU std"),
    ("worst_iou", "worst-class IoU"),
    ("worst25_miou", "worst-25% mIoU"),
)
# The figures of the primary questions (docs/experiments.md): fairness first, then its cost.
PRIMARY = ("worst25_miou", "miou")
# Figures where lower is better (for selection).
LOWER_IS_BETTER = ("iou_std", "iou_gap")
CONFIDENCE = 0.95
REFERENCE_LOSS = "ce"
LOSS_ORDER = ("ce", "tce", "stochastic_tce", "weighted_ce", "focal", "lovasz")
TILTED_LOSSES = ("tce", "stochastic_tce")
LOSS_DISPLAY = {
    "ce": "CE",
    "tce": "TCE",
    "stochastic_tce": "Stochastic TCE",
    "weighted_ce": "weighted CE",
    "focal": "focal",
    "lovasz": "Lovász-softmax",
}
ESTIMATOR_DISPLAY = {"ema": "EMA", "tilted": "tilted estimate"}


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
    family: str  # the family's display name, unique in a report, e.g. "TCE (uniform prior)"
    label: str  # e.g. "t=2"; "" for a loss without a tilt
    key: tuple  # the arm's config (sorted items, ignored keys removed)
    runs: list[Run]
    family_size: int = 1  # arms in the family (selection chose among them)

    @property
    def config(self) -> dict[str, Any]:
        return dict(self.key)

    @property
    def loss(self) -> str:
        return str(self.config.get("loss.name", "?"))

    @property
    def name(self) -> str:
        return self.family + (f", {self.label}" if self.label else "")

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


def _hashable(value: Any) -> Any:
    if isinstance(value, list | tuple):
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
                config = workdir.absent_field_values() | workdir.flatten(json.load(f))
            with open(os.path.join(dirpath, FINAL_FILE)) as f:
                final = json.load(f)
            finished.append(Run(dirpath, config, final))
        elif CONFIG_FILE in filenames or "run_spec.json" in filenames:
            unfinished.append(dirpath)
    return sorted(finished, key=lambda r: r.path), sorted(unfinished)


def describe_family(config: dict[str, Any]) -> str:
    """A readable name for the method of ``config`` (its loss fields and sampler)."""
    loss = str(config.get("loss.name", "?"))
    text = LOSS_DISPLAY.get(loss, loss)
    variant = []
    if loss == "weighted_ce":
        variant.append(str(config.get("loss.class_weights")).replace("_", " "))
    if loss == "stochastic_tce":
        variant += _stochastic_variant(config)
    if loss in TILTED_LOSSES and config.get("loss.class_weighting") != "frequency":
        variant.append(f"{config.get('loss.class_weighting')} prior")
    return f"{text} ({', '.join(variant)})" if variant else text


def _stochastic_variant(config: dict[str, Any]) -> list[str]:
    estimator = str(config.get("loss.estimator"))
    sampling = bool(config.get("data.class_aware_sampling"))
    ce_batch = config.get("loss.batch_loss") == "ce"
    if sampling and ce_batch and estimator == "tilted":
        return ["TERM: tilted sampling, CE batch loss"]
    return (
        [ESTIMATOR_DISPLAY.get(estimator, f"{estimator} estimate")]
        + (["tilted sampling"] if sampling else [])
        + (["CE batch loss"] if ce_batch else [])
    )


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list | tuple):
        return "(" + ",".join(_format_value(v) for v in value) + ")"
    return str(value)


def _family_key(arm_key: tuple) -> tuple:
    return tuple((k, v) for k, v in arm_key if k != TUNED_KEY)


def family_names(family_keys: Sequence[tuple]) -> dict[tuple, str]:
    """Display names; families that would share one are told apart by the fields that differ."""
    base = {key: describe_family(dict(key)) for key in family_keys}
    names = {}
    for key, text in base.items():
        same = [dict(k) for k, t in base.items() if t == text]
        differing = varying_keys(same) if len(same) > 1 else []
        config = dict(key)
        extra = ", ".join(
            f"{k.removeprefix('loss.')}={_format_value(config.get(k, '-'))}" for k in differing
        )
        if not extra:
            names[key] = text
        elif text.endswith(")"):
            names[key] = f"{text[:-1]}; {extra})"
        else:
            names[key] = f"{text} ({extra})"
    return names


def group_runs(runs: Sequence[Run], ignored: Sequence[str] = IGNORED_KEYS) -> list[ArmResult]:
    """Arms (equal configs but for the seed) in families (equal configs but for ``loss.t``)."""
    by_key: dict[tuple, list[Run]] = {}
    for run in runs:
        key = tuple(sorted(
            (k, _hashable(v)) for k, v in run.config.items() if k not in ignored
        ))
        by_key.setdefault(key, []).append(run)
    arms = [
        ArmResult("", "", key, sorted(group, key=lambda r: str(r.seed)))
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
    families: dict[tuple, list[ArmResult]] = {}
    for arm in arms:
        families.setdefault(_family_key(arm.key), []).append(arm)
    names = family_names(list(families))
    for key, members in families.items():
        for arm in members:
            arm.family, arm.family_size = names[key], len(members)
            tilted = arm.loss in TILTED_LOSSES or len(members) > 1
            arm.label = f"t={_format_value(_tilt(arm))}" if tilted else ""
    return sorted(arms, key=lambda a: (_family_rank(a), _tilt(a) or 0.0))


def _tilt(arm: ArmResult) -> float | None:
    value = arm.config.get(TUNED_KEY)
    return float(value) if isinstance(value, int | float) else None


def _family_rank(arm: ArmResult) -> tuple:
    """Report order: by loss (CE first), then the plain variant before the others."""
    config = arm.config
    return (
        LOSS_ORDER.index(arm.loss) if arm.loss in LOSS_ORDER else len(LOSS_ORDER),
        config.get("loss.class_weighting") != "frequency" and arm.loss in TILTED_LOSSES,
        bool(config.get("data.class_aware_sampling")),
        config.get("loss.estimator") != "ema" and arm.loss == "stochastic_tce",
        config.get("loss.batch_loss") != "tilted" and arm.loss == "stochastic_tce",
        arm.family,
    )


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


def selected_arms(arms: Sequence[ArmResult], chosen: dict[str, ArmResult]) -> list[ArmResult]:
    """The selected arm of each family, in report order."""
    return [a for a in arms if chosen.get(a.family) is a]


def reference_arm(arms: Sequence[ArmResult], chosen: dict[str, ArmResult]) -> ArmResult | None:
    """The selected arm of the first CE family (None without CE runs): what others pair with."""
    return next((a for a in selected_arms(arms, chosen) if a.loss == REFERENCE_LOSS), None)


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
# Paired statistics.


def t_quantile(df: int, confidence: float = CONFIDENCE) -> float:
    """The two-sided ``confidence`` quantile of Student's t with ``df`` degrees of freedom."""
    return float(stats.t.ppf(0.5 + confidence / 2, df))


@dataclasses.dataclass(frozen=True)
class Interval:
    """Mean of ``n`` values and its t-interval (``low``/``high`` NaN when ``n < 2``)."""

    mean: float
    std: float  # sample std (ddof=1) of the values
    low: float
    high: float
    n: int

    @property
    def excludes_zero(self) -> bool:
        return self.n >= 2 and (self.low > 0 or self.high < 0)


def t_interval(values: Iterable[float], confidence: float = CONFIDENCE) -> Interval:
    """``mean ± t_{(1+confidence)/2, n-1} s / sqrt(n)`` over the non-NaN values."""
    mean, std, n = mean_std(values)
    if n < 2:
        return Interval(mean, math.nan, math.nan, math.nan, n)
    half = t_quantile(n - 1, confidence) * std / math.sqrt(n)
    return Interval(mean, std, mean - half, mean + half, n)


def paired_differences(
    arm: ArmResult, reference: ArmResult, split: str, key: str
) -> tuple[list[Any], np.ndarray]:
    """Seeds both arms ran (with the figure) and, per seed, ``arm - reference``."""
    ref = {str(r.seed): r.final.get(split, {}).get(key, math.nan) for r in reference.runs}
    seeds, diffs = [], []
    for run in arm.runs:
        value = run.final.get(split, {}).get(key, math.nan)
        other = ref.get(str(run.seed), math.nan)
        if not (math.isnan(value) or math.isnan(other)):
            seeds.append(run.seed)
            diffs.append(value - other)
    return seeds, np.array(diffs, float)


def difference(arm: ArmResult, reference: ArmResult, split: str, key: str) -> Interval:
    """Mean paired difference ``arm - reference`` and its 95% t-interval."""
    return t_interval(paired_differences(arm, reference, split, key)[1])


def paired_seeds(arm: ArmResult, reference: ArmResult) -> list[Any]:
    ref = {str(s) for s in reference.seeds}
    return [s for s in arm.seeds if str(s) in ref]


# ---------------------------------------------------------------------------------------------
# Markdown.


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


def _summary_block(
    selected: Sequence[ArmResult], reference: ArmResult, split: str
) -> list[str]:
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
        lines.append(f"* **{arm.name}** ({len(paired_seeds(arm, reference))} pairs): "
                     + "; ".join(parts) + ".")
    return lines + [""]


def _difference_sections(
    selected: Sequence[ArmResult],
    reference: ArmResult,
    split: str,
    select_split: str,
    metric_name: str,
    names: Sequence[str],
) -> list[str]:
    """The summary, the paired-difference table and its per-class version (non-CE arms)."""
    others = [a for a in selected if a is not reference]
    if not others:
        return []
    lines = _summary_block(others, reference, split)
    header = ["loss", "configuration", "pairs (seeds)"] + [n for _, n in SUMMARY]
    rows = [
        [a.family, _config_text(a), _pairs_text(a, reference)]
        + [interval_text(difference(a, reference, split, k)) for k, _ in SUMMARY]
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
        f"## Per-class IoU, paired differences from {reference.name} ({split}, percentage "
        "points)",
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
    metric_name = dict(SUMMARY).get(metric, metric)
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
            selected, reference, report_split, select_split, metric_name, names
        )

    header = ["loss", f"selected on {select_split}", "seeds"] + [n for _, n in SUMMARY]
    rows = [
        [a.family, _config_text(a), _seeds_text(a)]
        + [pm(a.stat(report_split, k)) for k, _ in SUMMARY]
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
    lines += [f"## Per-class IoU ({report_split}, selected configurations, mean ± std)", "",
              markdown_table(header, rows), ""]

    header = ["loss", "configuration", "seeds", f"{select_split} {metric_name}",
              f"{select_split} worst-class IoU"] + [n for _, n in SUMMARY]
    rows = []
    for a in arms:
        mark = " (selected)" if chosen.get(a.family) is a and a.family_size > 1 else ""
        rows.append(
            [a.family, (a.label or "-") + mark, _seeds_text(a),
             pm(a.stat(select_split, metric)), pm(a.stat(select_split, "worst_iou"))]
            + [pm(a.stat(report_split, k)) for k, _ in SUMMARY]
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
    return {"mean": _number(iv.mean), "std": _number(iv.std), "n": iv.n,
            "ci_low": _number(iv.low), "ci_high": _number(iv.high),
            "excludes_zero": iv.excludes_zero}


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
        return {"mean": _number(m), "std": _number(sd), "n": n,
                "ci_low": _number(iv.low), "ci_high": _number(iv.high)}

    def paired(a: ArmResult, split: str, key: str) -> dict[str, Any]:
        seeds, diffs = paired_differences(a, reference, split, key)
        return {"seeds": seeds, "differences": [float(d) for d in diffs],
                **_interval_json(t_interval(diffs))}

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
                    summary.append({"arm": a.name, "figure": k, "result": verdict_word(iv),
                                    "n": iv.n})
    return {
        "select_split": select_split,
        "report_split": report_split,
        "select_metric": metric,
        "confidence": CONFIDENCE,
        "reference": None if reference is None else reference.name,
        "summary": summary,
        "arms": [arm_entry(a) for a in arms],
    }


# ---------------------------------------------------------------------------------------------
# Plots.


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
    fig, ax = plt.subplots(figsize=(min(max(9.0, 0.16 * len(names) * len(arms)), 30.0), 4.2),
                           dpi=90)
    for i, arm in enumerate(arms):
        values = np.array([100 * arm.values(split, f"iou/{c}") for c in names], float)
        mean, low, high = _mean_and_range(values.reshape(len(names), len(arm.runs)))
        ax.bar(x + (i - (len(arms) - 1) / 2) * width, mean, width, yerr=[low, high], capsize=1.5,
               error_kw={"lw": 0.8}, label=f"{arm.name}  (mIoU {pm(arm.stat(split, 'miou'))})",
               color=f"C{i % 10}", hatch=("", "//")[(i // 10) % 2])
    ax.set_xticks(x, [n.replace("_", " ") for n in names], rotation=30, ha="right")
    ax.set_ylabel(f"IoU on {split} (%)")
    ax.set_ylim(0, 100)
    ax.grid(axis="y", alpha=0.3)
    n = max(len(a.runs) for a in arms)
    ax.set_title(f"Per-class IoU of the selected configurations: mean over {n} seeds, "
                 "error bars from the lowest to the highest seed", fontsize=10)
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
            for j, (xj, yj) in enumerate(points) if j != i
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
        ax.errorbar(100 * x.mean, 100 * y.mean, xerr=_half_width(x), yerr=_half_width(y),
                    fmt=markers[i % len(markers)], color=f"C{i % 10}", capsize=3, ms=7, lw=1,
                    label=f"{arm.name} (n={min(x.n, y.n)})")
    front = pareto_front(points)
    ax.plot([points[i][0] for i in front], [points[i][1] for i in front], "--", color="0.4",
            lw=1, zorder=0, label="Pareto front of the means")
    ax.set_xlabel(f"mIoU on {split} (%), mean over seeds")
    ax.set_ylabel(f"worst-25% mIoU on {split} (%), mean over seeds")
    ax.set_title("Fairness against accuracy (up and right is better)\nerror bars: 95% t-interval "
                 "of each arm's own values over seeds, not of its difference from CE",
                 fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
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
    width = 3.2 * len(arms) + 1.6
    fig, axes = plt.subplots(2, len(arms), figsize=(width, 5.6), dpi=80, squeeze=False,
                             sharex="col")
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
    paths = [os.path.join(out_dir, f"{prefix}{name}.png") for name in ("per_class_iou",
                                                                        "frontier")]
    plot_per_class(selected, split, paths[0])
    plot_frontier(selected, split, paths[1])
    tilted = [a for a in selected if a.loss in (REFERENCE_LOSS, *TILTED_LOSSES)]
    if tilted:
        paths.append(os.path.join(out_dir, f"{prefix}curves.png"))
        plot_curves(tilted, paths[-1])
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
