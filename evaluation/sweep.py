"""Choosing the NPO strength: sample a small (alpha, beta) grid on validation seeds, score every
setting with the chosen scorer and a guard scorer against plain CFG on the same prompts and
seeds, and name the strongest setting that does not lower the guard.

Negative model of a setting: theta + alpha*eta + beta*delta (METHODS.md "NPO guidance at
sampling time"; eta = --pos-offset, delta = --neg-offset). "Does not lower the guard": the
guard's mean difference to plain CFG is >= -tolerance (default 0.02, the digits-world target's
accuracy rule). Only a setting that beats plain CFG on the scorer is recommended: its paired win
rate against CFG is above 0.5 and its mean difference is positive (a tie or worse is not worth a
negative model). "Strongest": the largest beta among the settings that beat CFG and keep the guard
(then the largest alpha); none (use plain CFG) when no setting does.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

# render(alpha, beta) -> PIL images of the validation jobs; None, None = plain CFG (the base)
Render = Callable[[float | None, float | None], list]


@dataclass(frozen=True)
class Setting:
    alpha: float
    beta: float

    @property
    def label(self) -> str:
        return f"alpha={self.alpha:g} beta={self.beta:g}"


def grid(alphas: list[float], betas: list[float]) -> list[Setting]:
    if not alphas or not betas:
        raise ValueError("sweep: give at least one alpha and one beta")
    if any(b <= 0 for b in betas):
        raise ValueError(f"sweep: betas must be > 0 (beta = 0 is plain CFG, the baseline itself), got {betas}")
    return [Setting(float(a), float(b)) for a in dict.fromkeys(alphas) for b in dict.fromkeys(betas)]


def run_sweep(settings: list[Setting], render: Render, prompts: list[str], scorer, guard, *, n_boot: int = 5000,
              seed: int = 0, progress=None) -> dict:
    """Rows {alpha, beta, score stats, guard stats} against plain CFG (paired by image order = prompt, seed)."""
    from ..core.stats import paired_compare

    base = render(None, None)
    base_s, base_g = np.asarray(scorer.score(base, prompts)), np.asarray(guard.score(base, prompts))
    rows = []
    for st in settings:
        ims = render(st.alpha, st.beta)
        s = paired_compare(base_s, np.asarray(scorer.score(ims, prompts)), n_boot=n_boot, seed=seed)
        g = paired_compare(base_g, np.asarray(guard.score(ims, prompts)), n_boot=n_boot, seed=seed)
        rows.append({"setting": st.label, "alpha": st.alpha, "beta": st.beta, "mean": s.mean_b, "win_rate": s.win_rate,
                     "win_ci_low": s.ci_low, "win_ci_high": s.ci_high, "diff": s.mean_diff, "guard_mean": g.mean_b,
                     "guard_diff": g.mean_diff, "guard_ci_low": g.diff_ci_low, "guard_ci_high": g.diff_ci_high})
        if progress is not None:
            progress(1)
    return {"n": len(prompts), "base_mean": float(base_s.mean()), "base_guard": float(base_g.mean()), "rows": rows}


def choose(rows: list[dict], tolerance: float = 0.02) -> dict | None:
    """The strongest row (largest beta, then alpha) that beats plain CFG (win_rate > 0.5 and diff > 0)
    and keeps the guard (guard_diff >= -tolerance); None (plain CFG) if none does. Marks every row
    with `guard_ok` and `beats_cfg`."""
    for r in rows:
        r["guard_ok"] = r["guard_diff"] >= -tolerance
        r["beats_cfg"] = r["win_rate"] > 0.5 and r["diff"] > 0
    ok = [r for r in rows if r["guard_ok"] and r["beats_cfg"]]
    return max(ok, key=lambda r: (r["beta"], r["alpha"])) if ok else None


def plot_sweep(result: dict, path: Path, scorer: str, guard: str, tolerance: float) -> Path:
    """Two panels against beta, one line per alpha: scorer win rate (95% CI) and guard difference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.4))
    for alpha in dict.fromkeys(r["alpha"] for r in result["rows"]):
        rs = sorted((r for r in result["rows"] if r["alpha"] == alpha), key=lambda r: r["beta"])
        b = [r["beta"] for r in rs]
        a1.errorbar(b, [r["win_rate"] for r in rs], yerr=[[r["win_rate"] - r["win_ci_low"] for r in rs],
                                                          [r["win_ci_high"] - r["win_rate"] for r in rs]],
                    marker="o", capsize=3, label=f"alpha={alpha:g}")
        a2.errorbar(b, [r["guard_diff"] for r in rs], yerr=[[r["guard_diff"] - r["guard_ci_low"] for r in rs],
                                                            [r["guard_ci_high"] - r["guard_diff"] for r in rs]],
                    marker="o", capsize=3, label=f"alpha={alpha:g}")
    a1.axhline(0.5, color="grey", lw=0.8)
    a1.set(xlabel="beta", ylabel=f"{scorer} win rate vs CFG")
    a2.axhline(-tolerance, color="tab:red", lw=0.8, ls="--", label="guard tolerance")
    a2.axhline(0.0, color="grey", lw=0.8)
    a2.set(xlabel="beta", ylabel=f"{guard} difference vs CFG")
    a1.legend(fontsize=8)
    a2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def table(result: dict) -> str:
    from ..core.stats import markdown_table

    cols = [("setting", "setting"), ("mean", "mean score"), ("win_rate", "win rate vs CFG"), ("win_ci_low", "CI low"),
            ("win_ci_high", "CI high"), ("guard_mean", "guard"), ("guard_diff", "guard - CFG"), ("guard_ok", "guard kept"), ("beats_cfg", "beats CFG")]
    return markdown_table(result["rows"], cols)
