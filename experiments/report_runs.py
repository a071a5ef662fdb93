"""Finished runs of a report (`experiments/report.py`): reading them, grouping them into arms
(equal configs but for the seed) and families (equal but for `loss.t`), and the selection.

Loss names, their order and tilts come from the registry `tce_jax.objectives.OBJECTIVES`: a new
loss needs no edit here (at most a display name in `LOSS_DISPLAY`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from flax import traverse_util

from tce_jax import objectives, workdir

# Config fields that do not define an arm: the seed, and where the data happen to live.
IGNORED_KEYS = ("seed", "data.data_dir", "data.manual_dir")
# The field selection picks within a family: arms that differ only here are one family.
TUNED_KEY = "loss.t"
# Figures where lower is better (for selection).
LOWER_IS_BETTER = ("iou_std", "iou_gap")
REFERENCE_LOSS = "ce"
LOSS_ORDER = tuple(objectives.OBJECTIVES)  # report order of the families: the registry's
TILTED_LOSSES = objectives.TILTED_LOSSES
# Display names where the loss's name is not the one to print.
LOSS_DISPLAY = {
    "ce": "CE",
    "tce": "TCE",
    "stochastic_tce": "Stochastic TCE",
    "weighted_ce": "weighted CE",
    "lovasz": "Lovász-softmax",
    "ohem": "OHEM CE",
    "recall": "recall loss",
    "class_balanced": "class-balanced CE",
    "dice": "Dice",
}
# The samplers (`data.sampling`) other than uniform epochs and tilted class-aware sampling, which
# the Stochastic TCE family names itself.
SAMPLER_DISPLAY = {"rcs": "Rare Class Sampling", "repeat_factor": "repeat-factor sampling"}
ESTIMATOR_DISPLAY = {"ema": "EMA", "tilted": "tilted estimate"}


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
        if workdir.FINAL_METRICS_FILE in filenames:
            with open(os.path.join(dirpath, workdir.CONFIG_FILE)) as f:
                config = json.load(f)
            config = workdir.absent_field_values() | traverse_util.flatten_dict(config, sep=".")
            with open(os.path.join(dirpath, workdir.FINAL_METRICS_FILE)) as f:
                final = json.load(f)
            finished.append(Run(dirpath, config, final))
        elif workdir.CONFIG_FILE in filenames or "run_spec.json" in filenames:
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
    if _sampler(config) in SAMPLER_DISPLAY:
        variant.append(SAMPLER_DISPLAY[_sampler(config)])
    return f"{text} ({', '.join(variant)})" if variant else text


def _sampler(config: dict[str, Any]) -> str:
    """The run's sampler as `tce_jax.sampling.method` reads it (runs from before
    `data.sampling` existed have only `data.class_aware_sampling`)."""
    if config.get("data.class_aware_sampling"):
        return "tilted"
    return str(config.get("data.sampling", "uniform"))


def _stochastic_variant(config: dict[str, Any]) -> list[str]:
    estimator = str(config.get("loss.estimator"))
    sampling = _sampler(config) == "tilted"
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
        key = tuple(sorted((k, _hashable(v)) for k, v in run.config.items() if k not in ignored))
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
        _sampler(config) != "uniform",
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
