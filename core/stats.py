"""Paired comparison of two runs on the same prompts and seeds: mean difference, win rate,
seeded percentile-bootstrap 95% CIs (Efron & Tibshirani 1993, ch. 13), Markdown table, plot.

Win rate of B over A: mean over pairs of 1[b > a] + 0.5 * 1[b == a] (ties split, as the
papers' pairwise preference rates count them). The bootstrap resamples PAIRS (rows), so the
pairing by prompt and seed is kept.

Over several training runs (one per training seed, each scored on the same prompts and seeds),
`pooled_compare` pools the pairs of all runs and bootstraps in two stages (Davison & Hinkley
1997, §3.8, nested resampling): training runs with replacement, then the pairs within each drawn
run, so the CI covers the spread between training seeds as well as between images.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .atomic import atomic_path


@dataclass
class PairedStats:
    """B compared with A on n paired samples."""

    n: int
    mean_a: float
    mean_b: float
    mean_diff: float  # mean(b - a)
    diff_ci_low: float
    diff_ci_high: float
    win_rate: float  # P(b > a), ties count half
    ci_low: float
    ci_high: float
    ties: int
    n_boot: int
    seed: int

    def as_dict(self) -> dict:
        return asdict(self)


def win_scores(a, b) -> np.ndarray:
    """Per-pair win score of b over a: 1 win, 0.5 tie, 0 loss [N]."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return (b > a).astype(np.float64) + 0.5 * (b == a)


def bootstrap_ci(values, *, n_boot: int = 5000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean of `values` [N] (seeded; rows resampled with replacement)."""
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1 or len(v) == 0:
        raise ValueError(f"bootstrap_ci needs a non-empty 1-D array, got shape {v.shape}")
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot)
    chunk = max(1, 2_000_000 // len(v))  # bound memory: [chunk, N] indices at a time
    for s in range(0, n_boot, chunk):
        k = min(chunk, n_boot - s)
        means[s:s + k] = v[rng.integers(0, len(v), size=(k, len(v)))].mean(1)
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def grouped_bootstrap_means(groups, *, n_boot: int = 5000, seed: int = 0) -> np.ndarray:
    """Two-stage bootstrap replicates [n_boot] of the mean of `groups` [G, N] (G runs of N rows).

    One replicate: draw G groups with replacement, then N rows with replacement inside each drawn
    group; the replicate is the mean of the G·N drawn values. With G = 1 it is the row bootstrap.
    """
    v = np.asarray(groups, dtype=np.float64)
    if v.ndim != 2 or v.shape[0] == 0 or v.shape[1] == 0:
        raise ValueError(f"grouped bootstrap needs a non-empty [groups, rows] array, got shape {v.shape}")
    G, N = v.shape
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot)
    chunk = max(1, 2_000_000 // (G * N))  # bound memory: [chunk, G, N] indices at a time
    for s in range(0, n_boot, chunk):
        k = min(chunk, n_boot - s)
        g = rng.integers(0, G, size=(k, G, 1))  # [k, G, 1] drawn runs
        r = rng.integers(0, N, size=(k, G, N))  # [k, G, N] drawn rows inside each
        means[s:s + k] = v[g, r].mean((1, 2))
    return means


def grouped_bootstrap_ci(groups, *, n_boot: int = 5000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile CI of the mean of `groups` [G, N] from `grouped_bootstrap_means`."""
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(grouped_bootstrap_means(groups, n_boot=n_boot, seed=seed), [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def pooled_compare(a, b, *, n_boot: int = 5000, seed: int = 0, level: float = 0.95) -> PairedStats:
    """B over A pooled over G training runs: a, b [G, N], row j of run g paired (same prompt and seed).

    Point estimates over all G·N pairs; CIs by the two-stage bootstrap (module docstring), the same
    resampled runs and rows for the difference and the win rate.
    """
    return _compare(a, b, 2, grouped_bootstrap_ci, "pooled_compare", "two [runs, pairs] arrays of the same shape",
                    n_boot=n_boot, seed=seed, level=level)


def paired_compare(a, b, *, n_boot: int = 5000, seed: int = 0, level: float = 0.95) -> PairedStats:
    """Mean difference and win rate of B over A with bootstrap CIs (same resampled rows for both)."""
    return _compare(a, b, 1, bootstrap_ci, "paired_compare", "two 1-D arrays of the same length",
                    n_boot=n_boot, seed=seed, level=level)


def _compare(a, b, ndim: int, ci, name: str, want: str, *, n_boot: int, seed: int, level: float) -> PairedStats:
    """The checks and estimates shared by `paired_compare` (ndim 1) and `pooled_compare` (ndim 2, `ci` grouped)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != ndim:
        raise ValueError(f"{name} needs {want}, got {a.shape} and {b.shape}")
    if a.size == 0:
        raise ValueError(f"{name}: no pairs")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError(f"{name}: scores contain NaN or inf")
    diff, wins = b - a, win_scores(a, b)
    d_lo, d_hi = ci(diff, n_boot=n_boot, seed=seed, level=level)
    w_lo, w_hi = ci(wins, n_boot=n_boot, seed=seed, level=level)
    return PairedStats(int(a.size), float(a.mean()), float(b.mean()), float(diff.mean()), d_lo, d_hi,
                       float(wins.mean()), w_lo, w_hi, int((a == b).sum()), n_boot, seed)


def right_to_wrong(correct_base, correct_other) -> int:
    """Samples (same prompt and seed) the base got right and the other run gets wrong."""
    cb, co = np.asarray(correct_base, dtype=bool), np.asarray(correct_other, dtype=bool)
    if cb.shape != co.shape:
        raise ValueError(f"right_to_wrong: shapes differ {cb.shape} vs {co.shape}")
    return int((cb & ~co).sum())


def markdown_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """A Markdown table; `columns` = [(key, header)], floats printed with 3 decimals."""
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3f}"
        return "" if v is None else str(v)
    head = "| " + " | ".join(h for _, h in columns) + " |"
    sep = "| " + " | ".join("---" for _ in columns) + " |"
    body = ["| " + " | ".join(fmt(r.get(k)) for k, _ in columns) + " |" for r in rows]
    return "\n".join([head, sep, *body]) + "\n"


def plot_comparison(named: dict[str, PairedStats], path: str | Path, title: str = "") -> Path:
    """Two panels: win rate vs the baseline and mean score difference, each with its 95% CI (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(named)
    fig, axes = plt.subplots(1, 2, figsize=(max(6, 1.6 * len(names) + 3), 3.2))
    for ax, key, lo, hi, ref, label in (
        (axes[0], "win_rate", "ci_low", "ci_high", 0.5, "win rate vs baseline"),
        (axes[1], "mean_diff", "diff_ci_low", "diff_ci_high", 0.0, "mean score difference"),
    ):
        vals = np.array([getattr(named[n], key) for n in names])
        err = np.array([[v - getattr(named[n], lo), getattr(named[n], hi) - v] for n, v in zip(names, vals)]).T
        ax.bar(range(len(names)), vals, yerr=err, capsize=4, color="#4c72b0")
        ax.axhline(ref, color="k", lw=0.8, ls="--")
        ax.set_xticks(range(len(names)), names, rotation=20)
        ax.set_title(label, fontsize=10)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
    return path
