"""Statistics of the forgetting benchmark: bootstrap intervals paired by seed, matched-gain forgetting, the Pareto
front and the validation choice of each method's setting.

Bootstrap (:class:`Bootstrap`): every replicate resamples the seeds with replacement and, within each seed, that
seed's held-out rows with replacement (the A rows and the B rows separately). One resample is drawn per group of runs
(a pair and a B length) and shared by every method, so a paired difference between two methods uses the same seeds
and the same rows on both sides. A statistic is the mean over the (resampled) seeds of the mean over the
(resampled) rows; its 95 % interval is the 2.5th and 97.5th percentiles over the replicates. Everything here is
linear in the per-row scores, so forgetting (A after B − A after A, per row), learning (B after B − B after A) and
the paired difference against another method (method − other, per row) are each one vector per seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Bootstrap", "Interval", "matched_forgetting", "percentile_interval", "pareto_front", "choose_settings",
           "interpolate_at"]

LEVEL = 0.95


@dataclass
class Interval:
    """A point estimate and its bootstrap interval (``lo``, ``hi``); ``n_seeds`` seeds went into it."""

    mean: float
    lo: float
    hi: float
    n_seeds: int

    @property
    def excludes_zero(self) -> bool:
        """True when the whole interval lies on one side of 0 (an effect, not "no difference")."""
        return self.lo > 0 or self.hi < 0

    def to_dict(self) -> dict:
        return {"mean": self.mean, "lo": self.lo, "hi": self.hi, "n_seeds": self.n_seeds}


class Bootstrap:
    """Resampling indices shared by every statistic of one group of runs.

    Args:
        rows: seed → number of held-out rows of each role (e.g. ``{0: {"a": 128, "b": 128}, 1: {...}}``).
        reps: bootstrap replicates (default 2000).
        seed: the generator's seed (default 0), so intervals are reproducible.
    """

    def __init__(self, rows: dict[int, dict[str, int]], reps: int = 2000, seed: int = 0):
        self.seeds = sorted(rows)
        self.reps = reps
        rng = np.random.default_rng(seed)
        self.seed_idx = rng.integers(0, len(self.seeds), size=(reps, len(self.seeds)))
        self.row_idx = {(s, role): rng.integers(0, n, size=(reps, n))
                        for s in self.seeds for role, n in sorted(rows[s].items())}

    def replicates(self, role: str, values: dict[int, np.ndarray]) -> np.ndarray:
        """The statistic of every replicate: ``values`` (seed → per-row values of ``role``'s rows, every seed of
        this bootstrap) averaged over the resampled rows, then over the resampled seeds; shape ``(reps,)``."""
        per_seed = np.stack([np.asarray(values[s], dtype=float)[self.row_idx[(s, role)]].mean(axis=1)
                             for s in self.seeds])  # (seeds, reps)
        return per_seed[self.seed_idx.T, np.arange(self.reps)].mean(axis=0)

    def interval(self, role: str, values: dict[int, np.ndarray]) -> Interval:
        """Mean over seeds of the per-seed mean of ``values``, with its bootstrap interval."""
        point = float(np.mean([np.mean(values[s]) for s in self.seeds]))
        lo, hi = percentile_interval(self.replicates(role, values))
        return Interval(point, lo, hi, len(self.seeds))


def percentile_interval(reps: np.ndarray) -> tuple[float, float]:
    """The central :data:`LEVEL` interval (e.g. 2.5th and 97.5th percentiles) of bootstrap replicates."""
    tail = 100 * (1 - LEVEL) / 2
    lo, hi = np.percentile(reps, [tail, 100 - tail])
    return float(lo), float(hi)


def interpolate_at(gains, forgettings, reference: float) -> float | None:
    """Forgetting at B gain ``reference`` by linear interpolation along a method's grid (its settings' mean gains
    and forgettings), or None when ``reference`` lies outside the gains the grid reached (no extrapolation). Several
    settings at the same gain are averaged first."""
    gains, forgettings = np.asarray(gains, dtype=float), np.asarray(forgettings, dtype=float)
    if gains.size == 0 or not gains.min() <= reference <= gains.max():
        return None
    xs = np.unique(gains)
    ys = np.array([forgettings[gains == x].mean() for x in xs])
    return float(np.interp(reference, xs, ys))


def matched_forgetting(gains: np.ndarray, forgettings: np.ndarray, reference: np.ndarray) -> dict | None:
    """A method's forgetting at a reference B gain, with its bootstrap interval.

    Args:
        gains, forgettings: shape ``(settings, 1 + reps)``: column 0 the point estimates of each setting of the
            method's grid, the other columns the same statistic in each bootstrap replicate.
        reference: shape ``(1 + reps,)``: the B gain to match (e.g. "none"'s learning), point and replicates.

    Returns:
        ``{"forgetting": value at the point estimates, "lo", "hi": the interval over the replicates where the
        reference lies inside the grid's gains, "defined": the share of such replicates}``; ``lo``/``hi`` are None
        when that share is below 95 % (the grid does not reliably reach the reference), "replicates": the value in
        each replicate (NaN where undefined)}. None when the point estimate's reference lies outside the grid.
    """
    point = interpolate_at(gains[:, 0], forgettings[:, 0], float(reference[0]))
    if point is None:
        return None
    values = [interpolate_at(gains[:, k], forgettings[:, k], float(reference[k])) for k in range(1, gains.shape[1])]
    replicates = np.array([np.nan if v is None else v for v in values], dtype=float)
    defined = replicates[np.isfinite(replicates)]
    share = len(defined) / max(len(values), 1)
    lo, hi = percentile_interval(defined) if share >= LEVEL and len(defined) else (None, None)
    return {"forgetting": point, "lo": lo, "hi": hi, "defined": share, "replicates": replicates}


def pareto_front(points: list[tuple[float, float]]) -> list[bool]:
    """Which of ``points`` ((A accuracy kept, B gain), higher is better on both) no other point dominates (at least
    as good on both and better on one)."""
    front = []
    for i, (a, b) in enumerate(points):
        front.append(not any((a2 >= a and b2 >= b) and (a2 > a or b2 > b) for j, (a2, b2) in enumerate(points)
                             if j != i))
    return front


def choose_settings(scores: dict[str, dict[str, float]]) -> dict[str, str]:
    """The best setting of each line of a method's grid by its validation score (higher is better; ties: the first
    setting in grid order).

    Args:
        scores: line → {setting label → validation score (e.g. the mean over seeds of the average of A's and B's
            validation accuracy after B)}, in grid order.

    Returns:
        line → the chosen setting label.
    """
    return {line: max(by_setting, key=lambda k: (by_setting[k], -list(by_setting).index(k)))
            for line, by_setting in scores.items() if by_setting}
