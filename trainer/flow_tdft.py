"""TDFT on rectified flow: OUR extension of Self-NPO (seed 002), which has no flow recipe.

The Self-NPO authors (G-U-N/Diffusion-NPO `Self-NPO/`) train SD1.5, SDXL and CogVideoX only; this
module carries their truncated diffusion fine-tuning (trainer/tdft.py, eq. 10–17) over to a
velocity model x_t = (1 − t)·x0 + t·ε, v = ε − x0 (core/flow.py), step for step:

1. Start: x_{t'} = (1 − t')·x0 + t'·ε from a real latent, or pure noise at t' = 1 (eq. 14).
2. Truncated teacher rollout: K flow Euler steps of the (weakened) teacher velocity from t' down to t,
       x_{t_{k+1}} = x_{t_k} + (t_{k+1} − t_k)·v_teacher(x_{t_k}, t_k),  t_k linear from t' to t (eq. 14).
3. Target (the flow Tweedie estimate, eq. 12–13): x0_hat = x_t − t·v_teacher(x_t, t).
4. Re-noise to s ≥ t with the interpolation's forward transition (eq. 16 with a = 1 − t, σ = t):
       x_s = ((1 − s)/(1 − t))·x_t + sqrt(s² − ((1 − s)/(1 − t))²·t²)·ε_s.
5. The student fits (eq. 17): x0_θ = x_s − s·v_θ(x_s, s);  loss = mean_B w(s)·d(x0_θ, x0_hat),
   d = `losses.tdft_x0_loss` (pseudo-Huber by default, as the authors).

Timesteps: the authors' N-step solver grid read on [0, 1]: t' = k/N, k = 1..N uniform, and
t = max(t' − K/N, 0) (on SD's 1000 steps their grid is k·T/N − 1; the flow grid has no offset).
The teacher's weakening (e.g. v_∅, or v_c + w·(v_c − v_∅)) lives in the `velocity` callable:
v is affine in (x0, ε) at fixed x_t, so guiding v guides x0_hat the same way (as for ε).

Pure functions over `velocity(x [B, ...], t [B]) -> v`; no backend. trainer/methods.py (`TDFTMethod.compute_flow`)
wires it into the method registry (`tdft` on a backend whose prediction_type is "flow").
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core.flow import Velocity, interpolate, renoise, sample_euler, v_to_x0
from .losses import tdft_x0_loss


def flow_grid_timesteps(index: torch.Tensor, n: int, K: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(t' [B], t [B]) for grid indices `index` [B] in [0, n): t' = (index + 1)/n, t = max(t' − K/n, 0). float64."""
    if not n >= 1 or not K >= 1:
        raise ValueError(f"flow TDFT needs a grid of n >= 1 points and K >= 1 steps, got n = {n}, K = {K}")
    t_start = (index.double() + 1) / n
    return t_start, (t_start - K / n).clamp(min=0)


def rollout_grid(t_start: torch.Tensor, t_end: torch.Tensor, K: int) -> torch.Tensor:
    """[K+1, B] noise levels linear from t_start to t_end (inclusive) per row."""
    if K < 1:
        raise ValueError(f"flow TDFT needs K >= 1 solver steps, got {K}")
    frac = torch.linspace(0, 1, K + 1, dtype=torch.float64, device=t_start.device).unsqueeze(1)  # [K+1, 1]
    ts, te = t_start.double().unsqueeze(0), t_end.double().unsqueeze(0)  # [1, B]
    return ts + (te - ts) * frac


def draw_s(t: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """s ~ U(t, 1] per row (the continuous form of the authors' s ~ U{t+1, ..., T−1}). float64 [B]."""
    dev = generator.device if generator is not None else torch.device("cpu")
    r = torch.rand(t.shape[0], generator=generator, device=dev, dtype=torch.float64).to(t.device)
    return t.double() + (1 - t.double()) * (1 - r)  # 1 − r ∈ (0, 1]


@dataclass
class FlowTDFTTarget:
    """The teacher side of one TDFT step (all [B, ...] but t, s [B])."""

    x_t: torch.Tensor  # after K teacher Euler steps
    x0_hat: torch.Tensor  # x_t − t·v_teacher(x_t, t)
    x_s: torch.Tensor  # x_t re-noised to s
    t: torch.Tensor
    s: torch.Tensor


@torch.no_grad()
def flow_tdft_target(teacher: Velocity, x_start: torch.Tensor, t_start: torch.Tensor, t_end: torch.Tensor, K: int,
                     s: torch.Tensor, eps_s: torch.Tensor) -> FlowTDFTTarget:
    """Steps 2–4 (module docstring): K Euler steps of `teacher` from (x_start, t_start) to t_end, the x0
    estimate there, and x_t re-noised to s with `eps_s`. No grad."""
    x_t = sample_euler(teacher, x_start, rollout_grid(t_start, t_end, K))
    t = t_end.to(x_t)
    x0_hat = v_to_x0(teacher(x_t, t), x_t, t)
    x_s = renoise(x_t, t, s.to(x_t), eps_s)
    return FlowTDFTTarget(x_t=x_t, x0_hat=x0_hat, x_s=x_s, t=t, s=s.to(x_t))


def flow_tdft_start(x0: torch.Tensor | None, eps: torch.Tensor,
                    t_start: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 1: (x_{t'}, t') from a real latent noised to t', or (ε, 1) when x0 is None (pure noise)."""
    if x0 is None:
        return eps, torch.ones_like(t_start)
    return interpolate(x0, eps, t_start.to(x0)), t_start


def flow_tdft_loss(student: Velocity, target: FlowTDFTTarget, kind: str = "pseudo_huber", c: float = 1e-3,
                   weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 5: (loss scalar, d [B]) with x0_θ = x_s − s·student(x_s, s) against x0_hat; `weight` [B] w(s)."""
    x0_student = v_to_x0(student(target.x_s, target.s), target.x_s, target.s)
    dist = tdft_x0_loss(x0_student, target.x0_hat, kind, c)  # [B]
    w = torch.ones_like(dist) if weight is None else weight.to(dist)
    return (w * dist).mean(), dist
