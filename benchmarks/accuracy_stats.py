"""Statistics of the accuracy study: mean ± sample std over seeds, and percentile bootstrap
confidence intervals of a mean — of one variant's accuracy, or of its per-seed difference
to DTL on the same seeds (paired: a seed that is hard for both methods cancels out).

With few seeds a bootstrap CI is coarse: 3 seeds have only 10 distinct resamples, so the
interval's ends are among a handful of values (often the smallest and largest seed).
"""

from __future__ import annotations

import math
import statistics

import numpy as np

RESAMPLES = 10_000
RNG_SEED = 0  # fixed: the same inputs give the same interval on every machine and rerun


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def bootstrap_ci(
    values: list[float], level: float = 0.95, resamples: int = RESAMPLES, seed: int = RNG_SEED
) -> tuple[float, float, float]:
    """``(mean, low, high)``: the mean of ``values`` and the percentile bootstrap interval
    of that mean (``resamples`` draws of ``len(values)`` values with replacement)."""
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or x.size == 0 or not np.isfinite(x).all():
        raise ValueError(f"bootstrap_ci needs finite values, got {values!r}")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(resamples, x.size))].mean(axis=1)
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(x.mean()), float(low), float(high)


def paired_bootstrap_ci(
    a: dict[int, float], b: dict[int, float], level: float = 0.95, **kw
) -> tuple[float, float, float, int] | None:
    """The mean per-seed difference ``a − b`` over the seeds both have, its bootstrap
    interval (seeds resampled with replacement, each keeping its pair) and the number of
    pairs: ``(mean, low, high, n)``; ``None`` without a common seed."""
    seeds = sorted(set(a) & set(b))
    diffs = [a[s] - b[s] for s in seeds if math.isfinite(a[s]) and math.isfinite(b[s])]
    if not diffs:
        return None
    return (*bootstrap_ci(diffs, level, **kw), len(diffs))
