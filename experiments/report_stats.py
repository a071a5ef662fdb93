"""Paired statistics of a report (`experiments/report.py`): Student's t-intervals of an arm's
own values and of its per-seed differences from the reference arm."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from typing import Any

import numpy as np
from scipy import stats

from experiments.report_runs import ArmResult, mean_std

CONFIDENCE = 0.95


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
