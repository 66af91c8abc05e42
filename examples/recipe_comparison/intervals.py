"""95% intervals of the recipe comparison, recomputable from ``report.json``.

Accuracies and tokens per forward: a two-stage (hierarchical) percentile bootstrap. One resample
draws the adaptation seeds with replacement, then, independently within each drawn seed, that
seed's problems with replacement, and computes the statistic over every drawn (seed, problem)
cell: accuracy = right answers / problems, tokens per forward = generated tokens / forward
passes (a ratio of sums, as the point estimate is). The interval is the 2.5% and 97.5% quantiles
of :data:`RESAMPLES` resamples drawn from a generator seeded with :data:`BOOTSTRAP_SEED`, so the
same data give the same interval. The point estimate is the statistic on all cells (every seed
has the same problems, so the accuracy is the mean over seeds of the per-seed accuracies).

Losses (held-out AR loss, block NLL bound, single-stream loss): one number per seed (each is an
average over the same held-out windows with the same noise), so the interval is Student's t over
seeds, ``mean +- t_{0.975, n-1} * sd / sqrt(n)``; with one seed there is none.

Paired differences (row A minus row B, both rows over the seeds they share): accuracies by the
same bootstrap with the same drawn seeds and problems for both rows (every row is evaluated on
the same problems, and seed ``s`` of every row trains on the same data order); losses by the t
interval of the per-seed differences. A difference "separates" the rows when its interval
excludes 0. No correction for the number of comparisons is made.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np

CONFIDENCE = 0.95
RESAMPLES = 10000
BOOTSTRAP_SEED = 29
_CHUNK = 500  # resamples drawn at once (bounds memory: chunk x seeds x problems)

METHOD = {
    "accuracy": "two-stage percentile bootstrap: seeds with replacement, then problems with replacement within each "
                f"drawn seed; {RESAMPLES} resamples, numpy default_rng({BOOTSTRAP_SEED})",
    "tokens_per_forward": "the same bootstrap, of generated tokens / forward passes over the drawn cells",
    "loss": "Student's t interval over adaptation seeds (mean +- t_0.975,n-1 * sd / sqrt(n)); none with one seed",
    "paired": "A - B over the seeds both rows have: accuracies by the same bootstrap with identical draws for A and "
              "B; losses by the t interval of the per-seed differences",
    "confidence": CONFIDENCE,
}


def _as_cells(values: Sequence[Sequence[float]], what: str) -> np.ndarray:
    """``values[seed][problem]`` as a float array; every seed must have the same problems."""
    lengths = {len(v) for v in values}
    if not values or len(lengths) != 1 or 0 in lengths:
        raise ValueError(f"{what}: expected the same non-zero number of problems for every seed, "
                         f"found {sorted(lengths)} over {len(values)} seed(s)")
    return np.asarray(values, dtype=np.float64)


def _draws(rng: np.random.Generator, n: int, seeds: int, problems: int):
    si = rng.integers(0, seeds, size=(n, seeds))
    pi = rng.integers(0, problems, size=(n, seeds, problems))
    return si[:, :, None], pi


def _bootstrap(pairs: list[tuple[np.ndarray, np.ndarray]], sign: Sequence[float], resamples: int,
               seed: int) -> np.ndarray:
    """The resampled statistic ``sum_k sign[k] * sum(num_k) / sum(den_k)`` with one draw of
    (seeds, problems-within-seeds) shared by every ``(num_k, den_k)``."""
    S, P = pairs[0][0].shape
    rng = np.random.default_rng(seed)
    out = np.empty(resamples)
    for start in range(0, resamples, _CHUNK):
        n = min(_CHUNK, resamples - start)
        si, pi = _draws(rng, n, S, P)
        stat = np.zeros(n)
        for (num, den), s in zip(pairs, sign):
            stat += s * num[si, pi].sum(axis=(1, 2)) / den[si, pi].sum(axis=(1, 2))
        out[start:start + n] = stat
    return out


def _interval(samples: np.ndarray) -> tuple[float, float]:
    a = (1 - CONFIDENCE) / 2
    lo, hi = np.quantile(samples, [a, 1 - a])
    return float(lo), float(hi)


def _entry(mean: float, lo: Optional[float], hi: Optional[float], n_seeds: int, **extra) -> dict:
    return dict(mean=float(mean), lo=lo, hi=hi, seeds=n_seeds, **extra)


def ratio_interval(num: Sequence[Sequence[float]], den: Optional[Sequence[Sequence[float]]] = None, *,
                   resamples: int = RESAMPLES, seed: int = BOOTSTRAP_SEED) -> dict:
    """``sum(num) / sum(den)`` (``den`` all ones: the mean) over ``[seed][problem]`` cells with
    its bootstrap interval (module docstring)."""
    n = _as_cells(num, "numerator")
    d = np.ones_like(n) if den is None else _as_cells(den, "denominator")
    if d.shape != n.shape:
        raise ValueError(f"numerator {n.shape} and denominator {d.shape} differ in shape")
    lo, hi = _interval(_bootstrap([(n, d)], [1.0], resamples, seed))
    return _entry(n.sum() / d.sum(), lo, hi, n.shape[0], problems=n.shape[1])


def paired_ratio_interval(num_a, num_b, den_a=None, den_b=None, *, resamples: int = RESAMPLES,
                          seed: int = BOOTSTRAP_SEED) -> dict:
    """A - B of two ratio statistics over the same ``[seed][problem]`` cells, with the bootstrap
    interval of the difference under identical draws for A and B."""
    a, b = _as_cells(num_a, "row A"), _as_cells(num_b, "row B")
    if a.shape != b.shape:
        raise ValueError(f"paired rows must have the same seeds and problems, found {a.shape} and {b.shape}")
    da = np.ones_like(a) if den_a is None else _as_cells(den_a, "row A denominator")
    db = np.ones_like(b) if den_b is None else _as_cells(den_b, "row B denominator")
    lo, hi = _interval(_bootstrap([(a, da), (b, db)], [1.0, -1.0], resamples, seed))
    return _entry(a.sum() / da.sum() - b.sum() / db.sum(), lo, hi, a.shape[0], problems=a.shape[1])


def t_interval(values: Sequence[float]) -> dict:
    """Mean of per-seed values with Student's t interval (None bounds with fewer than 2)."""
    from scipy import stats

    x = [float(v) for v in values]
    if not x:
        raise ValueError("t interval of no values")
    mean = sum(x) / len(x)
    if len(x) < 2:
        return _entry(mean, None, None, len(x))
    sd = math.sqrt(sum((v - mean) ** 2 for v in x) / (len(x) - 1))
    half = float(stats.t.ppf(1 - (1 - CONFIDENCE) / 2, len(x) - 1)) * sd / math.sqrt(len(x))
    return _entry(mean, mean - half, mean + half, len(x))


def excludes_zero(entry: dict) -> Optional[bool]:
    """Whether an interval lies wholly on one side of 0 (None without an interval)."""
    if entry["lo"] is None:
        return None
    return entry["lo"] > 0 or entry["hi"] < 0
