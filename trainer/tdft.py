"""Self-NPO truncated diffusion fine-tuning (TDFT) math, seed 002 eq. 10–17 (METHODS.md "Self-NPO").

Pure tensor functions; `trainer/methods.py` (`TDFTMethod`) wires them to a backend, and the
x0-space loss is `trainer/losses.py` `tdft_x0_loss`.
Code names -> paper symbols:
    x_start, t_start   x_{t'}^{ref}: a real latent noised to t' (or pure noise at t' = T-1), eq. 14
    x_t, t             x_t^{ref}: after K teacher DDIM steps from t' (eq. 14)
    x0_hat             x_{t->0}^{ref}: the Tweedie estimate at (x_t, t), eq. 12–13
    x_s, s             the re-noised input, s > t (eq. 16)
    a, sigma           alpha = sqrt(abar), sigma = sqrt(1 - abar)
    w                  the teacher's guidance: eps = eps_c + w·(eps_c − eps_∅) (authors' code)

The authors' recipe (G-U-N/Diffusion-NPO `Self-NPO/train.py`, `train_xl.py`): a DDIM solver grid
of N = 25 timesteps (T//N − 1, 2·T//N − 1, ..., T − 1); t' is a uniform grid point, K = 5 solver
steps of T//N timesteps each go down from it, clamped at timestep 0, so t = max(t' − K·T//N, 0):
on SD's T = 1000 t' ∈ {39, 79, ..., 999}, t ∈ {0, 39, ..., 799} (never ≥ 800) and P(t = 0) = 5/25.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..core.schedule import eps_to_x0, gather

# the paper's baseline simulates the whole trajectory in 25 solver steps (seed 002 "Training
# efficiency"; `--num_ddim_timesteps 25` in the authors' code): the default solver grid size N.
FULL_SIM_STEPS = 25

# how t' and t are drawn (MethodConfig.tdft_timesteps); the only list of these names
TDFT_TIMESTEPS = {
    "solver_grid": "t' uniform on the N-step solver grid, t = max(t' - K*T//N, 0) (the authors' code)",
    "uniform": "t from timestep_sampler over [0, T-1), t' = min(T-1, t + K*T//N) (this project's earlier variant)",
}

# where the teacher's rollout starts (MethodConfig.tdft_start)
TDFT_STARTS = {
    "auto": "a real latent noised to t' when the batch has images, else pure noise at t' = T-1",
    "images": "always a real latent noised to t' (the paper); a batch without images is an error",
    "noise": "always pure noise at t' = T-1, K steps down to t (prompts-only: this project's variant)",
}


def solver_grid(T: int, n: int) -> torch.Tensor:
    """The authors' DDIM grid [n]: round(k·(T//n)) − 1 for k = 1..n (`DDIMSolver.ddim_timesteps`)."""
    if not 1 <= n <= T:
        raise ValueError(f"TDFT solver grid needs 1 <= N <= T = {T}, got N = {n}")
    return torch.arange(1, n + 1, dtype=torch.long) * (T // n) - 1


def grid_timesteps(index: torch.Tensor, T: int, n: int, K: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(t' [B], t_raw [B]) for solver-grid indices `index` [B] in [0, n): t' = grid[index],
    t_raw = t' − K·(T//n), which may be negative; the rollout clamps it at 0
    (`rollout_timesteps`), so the rollout ends at t = max(t_raw, 0) as in the authors' solver."""
    t_start = solver_grid(T, n).to(index.device)[index]
    return t_start, t_start - K * (T // n)


def tweedie_x0(x_t: torch.Tensor, eps: torch.Tensor, abar_t: torch.Tensor) -> torch.Tensor:
    """x0_hat = (x_t − sqrt(1−abar_t)·eps) / sqrt(abar_t): Tweedie's formula, seed 002 eq. 12."""
    return eps_to_x0(eps, x_t, abar_t)


def renoise(x_t: torch.Tensor, t: torch.Tensor, s: torch.Tensor, abar: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Seed 002 eq. 16: x_s = (a_s/a_t)·x_t + sqrt(σ_s² − σ_t²·a_s²/a_t²)·eps, for s ≥ t. [B, ...]

    The variance term equals 1 − abar_s/abar_t (expand σ² = 1 − a²), which is how it is computed.
    If x_t has the forward marginal at t, x_s has the forward marginal at s (seed 002 Thm. 1).
    """
    if bool((s < t).any()):
        raise ValueError("renoise needs s >= t for every row (eq. 16 only adds noise)")
    abar_t, abar_s = gather(abar, t, x_t), gather(abar, s, x_t)  # [B, 1, 1, 1] each
    ratio = abar_s / abar_t
    return ratio.sqrt() * x_t + (1 - ratio).clamp(min=0).sqrt() * eps


def ddim_step(x: torch.Tensor, eps: torch.Tensor, abar_from: torch.Tensor, abar_to: torch.Tensor) -> torch.Tensor:
    """Deterministic DDIM (eta = 0): x_to = sqrt(abar_to)·x0_hat + sqrt(1−abar_to)·eps."""
    x0 = eps_to_x0(eps, x, abar_from)
    return abar_to.sqrt() * x0 + (1 - abar_to).sqrt() * eps


def rollout_timesteps(t_start: torch.Tensor, t_end: torch.Tensor, K: int) -> torch.Tensor:
    """[K+1, B] integer grid from t_start to t_end (inclusive), evenly spaced per row.

    Grid points below 0 become 0: a row whose t_end < 0 reaches timestep 0 and then takes
    identity steps, as the authors' solver does when its grid index drops below 0
    (`grid_timesteps`: the spacing is then exactly T//N)."""
    if K < 1:
        raise ValueError(f"TDFT needs K >= 1 solver steps, got {K}")
    frac = torch.linspace(0, 1, K + 1, dtype=torch.float64).unsqueeze(1)  # [K+1, 1]
    ts, te = t_start.double().unsqueeze(0), t_end.double().unsqueeze(0)  # [1, B]
    return (ts + (te - ts) * frac).round().long().clamp(min=0)


@torch.no_grad()
def truncated_rollout(teacher_eps_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x_start: torch.Tensor,
                      t_start: torch.Tensor, t_end: torch.Tensor, K: int, abar: torch.Tensor) -> torch.Tensor:
    """K DDIM steps of the teacher from x_{t'} at t_start to x_t at t_end (seed 002 eq. 14). [B, ...]

    teacher_eps_fn(x [B, ...], t [B]) -> eps [B, ...]: the (weakened) teacher. Rows whose grid
    repeats a timestep take an identity step (DDIM from abar to the same abar is x itself).
    """
    grid = rollout_timesteps(t_start, t_end, K).to(x_start.device)  # [K+1, B]
    x = x_start
    for k in range(K):
        eps = teacher_eps_fn(x, grid[k])  # [B, ...]
        x = ddim_step(x, eps, gather(abar, grid[k], x), gather(abar, grid[k + 1], x))
    return x
