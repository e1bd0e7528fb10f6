"""Uncertainty of evaluation results: bootstrap intervals over games and seeds, and the paired difference of two
methods evaluated on the same seeds and games.

Outcomes are arrays `[seeds, games]` (e.g. 1.0 for a won game, or its Score), with the same game order in every
row. A bootstrap replicate draws seeds with replacement and, independently, games with replacement (the same
game draw for every seed, since the games are shared), and takes the mean; the interval is the percentile range.
Both sources of variation count: which seeds trained the students and which games the benchmark happens to hold.
"""
from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Interval:
    mean: float
    low: float
    high: float

    def __str__(self) -> str:
        return f"{self.mean:.1f} [{self.low:.1f}, {self.high:.1f}]"


def _replicates(outcomes: np.ndarray, n: int, seed: int) -> np.ndarray:
    outcomes = np.asarray(outcomes, np.float64)
    if outcomes.ndim != 2 or 0 in outcomes.shape:
        raise ValueError(f"outcomes must be a non-empty [seeds, games] array, got shape {outcomes.shape}")
    s, g = outcomes.shape
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, s, size=(n, s))
    cols = rng.integers(0, g, size=(n, g))
    # Each replicate: every seed's mean over the drawn games, then the mean over the drawn seeds.
    per_seed = outcomes[:, cols].mean(axis=2).T  # [n, seeds]
    return np.take_along_axis(per_seed, rows, axis=1).mean(axis=1)


def bootstrap(outcomes, n: int = 2000, level: float = 0.95, seed: int = 0) -> Interval:
    """Mean of `outcomes` [seeds, games] with its bootstrap percentile interval at `level`."""
    reps = _replicates(outcomes, n, seed)
    tail = 100 * (1 - level) / 2
    return Interval(float(np.mean(outcomes)), float(np.percentile(reps, tail)), float(np.percentile(reps, 100 - tail)))


def paired_difference(a, b, n: int = 2000, level: float = 0.95, seed: int = 0) -> Interval:
    """Mean of a - b with its interval, a and b [seeds, games] on the same seeds and games (row i of both from
    seed i, column j from game j): the pairing removes the variation both share (hard games, lucky seeds)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired outcomes need the same seeds and games; got shapes {a.shape} and {b.shape}")
    return bootstrap(a - b, n, level, seed)
