"""Student-t confidence intervals over seeds, shared by the experiment reports."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence


def t_quantile(level: float, df: int) -> float:
    """t with P(|T| ≤ t) = `level` for Student's t with `df` degrees of freedom, e.g.
    t_quantile(0.95, 4) = 2.7764 (scipy's `t.ppf(0.975, 4)`)."""
    from scipy import stats  # a dependency of jax

    if not 0 < level < 1 or df < 1:
        raise ValueError(f"t_quantile(level={level}, df={df}): expected 0 < level < 1, df ≥ 1.")
    return float(stats.t.ppf((1 + level) / 2, df))


def mean_ci(values: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """(mean, half-width of the Student-t `level` confidence interval); 0 for one value."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, 0.0
    t = t_quantile(level, len(values) - 1)
    return mean, t * statistics.stdev(values) / math.sqrt(len(values))
