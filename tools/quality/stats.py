"""Pure statistics of the quality study: paired differences, bootstrap CIs, TOST equivalence (no torch, no scipy).

Every comparison is paired by seed: arm and reference share the seed's data order and LoRA init, so the
per-seed difference removes the seed's own noise. With 5 seeds a percentile bootstrap is a description of
the spread, not a test; the equivalence verdict therefore uses Student's t (TOST), whose small-sample
calibration is exact for normal differences.
"""

from __future__ import annotations

import math
import random
from typing import Sequence


def mean(values: Sequence[float]) -> float:
    return math.fsum(values) / len(values)


def sample_sd(values: Sequence[float]) -> float:
    if len(values) < 2:
        return 0.0
    centre = mean(values)
    return math.sqrt(math.fsum((v - centre) ** 2 for v in values) / (len(values) - 1))


def paired_relative(arm: Sequence[float], reference: Sequence[float]) -> list[float]:
    """Per-seed relative difference arm / reference - 1 (e.g. +0.01: the arm's task loss is 1% higher)."""
    if len(arm) != len(reference):
        raise ValueError(f"paired samples differ in length: {len(arm)} vs {len(reference)}")
    return [a / r - 1.0 for a, r in zip(arm, reference)]


def bootstrap_ci(
    differences: Sequence[float], confidence: float = 0.95, resamples: int = 10_000, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of paired differences; `seed` makes it reproducible."""
    n = len(differences)
    if n == 0:
        return (math.nan, math.nan)
    rng = random.Random(seed)
    means = sorted(math.fsum(rng.choice(differences) for _ in range(n)) / n for _ in range(resamples))
    tail = (1.0 - confidence) / 2.0
    low_index = min(resamples - 1, max(0, int(math.floor(tail * resamples))))
    high_index = min(resamples - 1, max(0, int(math.ceil((1.0 - tail) * resamples)) - 1))
    return (means[low_index], means[high_index])


# ---------------------------------------------------------------- Student's t
def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return h


def incomplete_beta(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with `df` degrees of freedom."""
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    tail = 0.5 * incomplete_beta(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The t with t_cdf(t, df) = p (bisection: monotone, and precision matters more than speed here)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p}")
    low, high = -1e3, 1e3
    for _ in range(200):
        middle = (low + high) / 2.0
        if t_cdf(middle, df) < p:
            low = middle
        else:
            high = middle
    return (low + high) / 2.0


def t_interval(differences: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
    """Two-sided Student-t interval of the mean difference."""
    n = len(differences)
    if n < 2:
        return (math.nan, math.nan)
    centre, se = mean(differences), sample_sd(differences) / math.sqrt(n)
    half = t_quantile(1.0 - (1.0 - confidence) / 2.0, n - 1) * se
    return (centre - half, centre + half)


def tost(differences: Sequence[float], margin: float = 0.01, alpha: float = 0.05) -> dict:
    """Two one-sided t-tests: is the mean paired difference inside (-margin, +margin)?

    Equivalent at level alpha when both one-sided nulls (mean <= -margin, mean >= +margin) are rejected,
    i.e. when the (1 - 2 alpha) t interval lies inside the margins. `p` is the larger one-sided p-value.
    """
    n = len(differences)
    result = {"n": n, "margin": margin, "alpha": alpha, "mean": mean(differences) if n else math.nan}
    if n < 2:
        return {**result, "p": math.nan, "equivalent": None, "interval": (math.nan, math.nan)}
    se = sample_sd(differences) / math.sqrt(n)
    centre = result["mean"]
    if se == 0.0:  # identical differences: inside or outside the margins with certainty
        inside = -margin < centre < margin
        return {**result, "p": 0.0 if inside else 1.0, "equivalent": inside, "interval": (centre, centre)}
    df = n - 1
    p_lower = 1.0 - t_cdf((centre + margin) / se, df)  # H0: mean <= -margin
    p_upper = t_cdf((centre - margin) / se, df)  # H0: mean >= +margin
    p = max(p_lower, p_upper)
    return {
        **result,
        "p": p,
        "p_lower": p_lower,
        "p_upper": p_upper,
        "equivalent": p < alpha,
        "interval": t_interval(differences, 1.0 - 2.0 * alpha),
    }


def compare(arm: Sequence[float], reference: Sequence[float], margin: float = 0.01, seed: int = 0) -> dict:
    """Paired relative differences of arm vs reference: mean, bootstrap and t 95% CIs, TOST at +-margin."""
    differences = paired_relative(arm, reference)
    return {
        "differences": differences,
        "mean": mean(differences) if differences else math.nan,
        "bootstrap_ci95": bootstrap_ci(differences, 0.95, seed=seed),
        "t_ci95": t_interval(differences, 0.95),
        "tost": tost(differences, margin),
    }


def interpolate(curve: Sequence[tuple[float, float]], x: float) -> float:
    """Linear interpolation of a (x, y) curve sorted by x; clamped at the ends."""
    if not curve:
        return math.nan
    if x <= curve[0][0]:
        return curve[0][1]
    for (x0, y0), (x1, y1) in zip(curve, curve[1:]):
        if x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0) if x1 > x0 else y1
    return curve[-1][1]


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both axes (lower is better on both)."""
    front = []
    for i, (x, y) in enumerate(points):
        if not any((x2 <= x and y2 <= y) and (x2 < x or y2 < y) for j, (x2, y2) in enumerate(points) if j != i):
            front.append(i)
    return front
