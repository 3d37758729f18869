"""Self-NPO truncated diffusion fine-tuning (TDFT) math, seed 002 eq. 10–17 (METHODS.md "Self-NPO").

Pure tensor functions; `trainer/methods.py` (`TDFTMethod`) wires them to a backend.
Code names -> paper symbols:
    x_start, t_start   x_{t'}^{ref}: a real latent noised to t' (or pure noise at t' = T-1), eq. 14
    x_t, t             x_t^{ref}: after K teacher DDIM steps from t' (eq. 14)
    x0_hat             x_{t->0}^{ref}: the Tweedie estimate at (x_t, t), eq. 12–13
    x_s, s             the re-noised input, s > t (eq. 16)
    a, sigma           alpha = sqrt(abar), sigma = sqrt(1 - abar)
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from ..core.sampling import sample_ddim
from ..core.schedule import eps_to_x0, gather

# the paper's baseline simulates the whole trajectory in 25 solver steps (seed 002 "Training
# efficiency"); one TDFT solver step spans T / FULL_SIM_STEPS timesteps unless configured.
FULL_SIM_STEPS = 25

X0_LOSSES = ("l2", "huber")


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


def rollout_timesteps(t_start: torch.Tensor, t_end: torch.Tensor, K: int) -> torch.Tensor:
    """[K+1, B] integer grid from t_start to t_end (inclusive), evenly spaced per row."""
    if K < 1:
        raise ValueError(f"TDFT needs K >= 1 solver steps, got {K}")
    frac = torch.linspace(0, 1, K + 1, dtype=torch.float64).unsqueeze(1)  # [K+1, 1]
    ts, te = t_start.double().unsqueeze(0), t_end.double().unsqueeze(0)  # [1, B]
    return (ts + (te - ts) * frac).round().long()


@torch.no_grad()
def truncated_rollout(teacher_eps_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x_start: torch.Tensor,
                      t_start: torch.Tensor, t_end: torch.Tensor, K: int, abar: torch.Tensor) -> torch.Tensor:
    """K DDIM steps of the teacher from x_{t'} at t_start to x_t at t_end (seed 002 eq. 14). [B, ...]

    teacher_eps_fn(x [B, ...], t [B]) -> eps [B, ...]: the (weakened) teacher. Rows whose grid
    repeats a timestep take an identity step (DDIM from abar to the same abar is x itself).
    """
    grid = rollout_timesteps(t_start, t_end, K).to(x_start.device)  # [K+1, B]
    return sample_ddim(teacher_eps_fn, x_start, grid, abar)  # core.sampling: K DDIM steps along the grid


def x0_distance(x0_pred: torch.Tensor, x0_target: torch.Tensor, kind: str = "l2", huber_delta: float = 1.0) -> torch.Tensor:
    """Per-sample distance between the student's x0 and the Tweedie target (seed 002 eq. 17). [B]

    "l2": mean squared error over latent dims (eq. 17 up to the constant dimension count);
    "huber": mean Huber loss with `huber_delta` (robust at large s, where x0 = (x_s − σ eps)/a
    magnifies eps errors by 1/a_s).
    """
    a, b = x0_pred.float(), x0_target.float()
    if kind == "l2":
        return (a - b).pow(2).flatten(1).mean(1)
    if kind == "huber":
        return F.huber_loss(a, b, reduction="none", delta=huber_delta).flatten(1).mean(1)
    raise ValueError(f"unknown TDFT x0 loss {kind!r} (expected one of {X0_LOSSES})")


class TeacherSpec:
    """How the EMA teacher is weakened (seed 002 §3, METHODS.md step 1).

    guided:     False -> the unconditional prediction eps(x, t, ∅) alone (the authors' code);
                True  -> CFG eps_∅ + cfg·(eps_c − eps_∅) at `tdft_cfg` (low guidance).
    from_noise: True -> the rollout always starts from pure noise at t' = T−1, so the K coarse
                steps cover the whole trajectory (the weakening is the few-step solve itself).
    """

    def __init__(self, guided: bool, from_noise: bool):
        self.guided, self.from_noise = guided, from_noise

    def __repr__(self) -> str:
        return f"TeacherSpec(guided={self.guided}, from_noise={self.from_noise})"


# the only list of teacher names (MethodConfig.tdft_teacher)
TDFT_TEACHERS = {
    "uncond": TeacherSpec(guided=False, from_noise=False),
    "low_cfg": TeacherSpec(guided=True, from_noise=False),
    "few_steps": TeacherSpec(guided=True, from_noise=True),
}
