"""Samplers: small pure functions over a denoiser callable (STYLE.md rule 1, k-diffusion style).

Every loop of the project that integrates the reverse process calls this module:
`diffusers_host.generate.sample`, `trainer.validation.ddim_sample`, `trainer.tdft.truncated_rollout`,
the world build's diagnostic sampler and the DDSPO data preparation.

A denoiser is `model(x, t) -> pred`: x [B, C, H, W] the current sample, t the model's own
timestep (a [B] long tensor for the DDIM loops here, a scheduler timestep for
`sample_scheduler`), pred the model's output in the space the step consumes (eps for `ddim_step`).
Guidance wraps the model (`guided_denoiser`); it never lives inside a sampler.

Code names -> paper symbols (DDIM, Song et al. 2021, eq. 12 with eta = 0):
    abar_from, abar_to   alpha_t, alpha_{t-1} of the paper (cumulative products, METHODS.md abar)
    x0                   the "predicted x0" term (Tweedie estimate)
"""
from __future__ import annotations

from typing import Callable

import torch

from .flow import euler_step
from .guidance import Combine
from .schedule import eps_to_x0, gather

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def ddim_step(x: torch.Tensor, eps: torch.Tensor, abar_from: torch.Tensor, abar_to: torch.Tensor) -> torch.Tensor:
    """Deterministic DDIM (Song et al. 2021 eq. 12, eta = 0): x_to = sqrt(abar_to)·x0_hat + sqrt(1−abar_to)·eps."""
    x0 = eps_to_x0(eps, x, abar_from)  # 1. predicted x0
    return abar_to.sqrt() * x0 + (1 - abar_to).sqrt() * eps  # 2. direction to x_t-1 + 3. no noise (eta = 0)


def ddim_timesteps(T: int, steps: int) -> torch.Tensor:
    """[steps] integer timesteps from T-1 down to 0, evenly spaced (the trainer's DDIM grid)."""
    if steps < 1:
        raise ValueError(f"DDIM needs steps >= 1, got {steps}")
    return torch.linspace(T - 1, 0, steps).round().long()


def _row_t(grid: torch.Tensor, k: int, x: torch.Tensor) -> torch.Tensor:
    """Timestep of every row at grid entry k: [B] (grid [S] shared by all rows, or [S, B] per row)."""
    t = grid[k] if grid.ndim == 2 else grid[k].repeat(x.shape[0])
    return t.to(x.device)


@torch.no_grad()
def sample_ddim(model: Denoiser, x: torch.Tensor, grid: torch.Tensor, abar: torch.Tensor, *,
                to_clean: bool = False) -> torch.Tensor:
    """DDIM (eta = 0) from x at grid[0] through every grid entry; [B, ...].

    grid: [S] timesteps shared by all rows or [S, B] one column per row (descending). With
    `to_clean` a last step goes from grid[-1] to abar = 1 (the clean sample), so S model calls;
    otherwise S - 1 calls end at grid[-1]. A row whose grid repeats a timestep takes an identity step.
    """
    n = grid.shape[0]
    for k in range(n if to_clean else n - 1):
        t = _row_t(grid, k, x)  # [B]
        eps = model(x, t)  # [B, ...]
        a_t = gather(abar, t, x)  # [B, 1, 1, 1]
        a_to = gather(abar, _row_t(grid, k + 1, x), x) if k + 1 < n else torch.ones_like(a_t)
        x = ddim_step(x, eps, a_t, a_to)
    return x


@torch.no_grad()
def sample_scheduler(model: Denoiser, x: torch.Tensor, scheduler, progress: Callable[[int], object] | None = None
                     ) -> torch.Tensor:
    """The loop of any diffusers scheduler (DDIM, Euler, DPM-Solver++) after `set_timesteps`; [B, ...].

    Per step: x_in = scale_model_input(x, t); pred = model(x_in, t); x = step(pred, t, x).
    progress: called with 1 after every step (e.g. a tqdm bar's update).
    """
    for t in scheduler.timesteps:
        pred = model(scheduler.scale_model_input(x, t), t)
        x = scheduler.step(pred, t, x).prev_sample
        if progress is not None:
            progress(1)
    return x


@torch.no_grad()
def sample_flow_euler(model: Denoiser, x: torch.Tensor, ts: torch.Tensor, num_train_timesteps: int = 1000,
                      progress: Callable[[int], object] | None = None) -> torch.Tensor:
    """The flow Euler solver (core.flow.euler_step) along noise levels `ts` [K+1] (1 -> 0, e.g.
    core.flow.euler_timesteps); `model(x, t·N) -> v` gets the network's timestep t·N. [B, ...]."""
    for k in range(ts.shape[0] - 1):
        v = model(x, (ts[k] * num_train_timesteps).to(x.dtype))
        x = euler_step(x, v, ts[k], ts[k + 1])
        if progress is not None:
            progress(1)
    return x


def guided_denoiser(cond_model: Denoiser, uncond_model: Denoiser, combine: Combine, w: float) -> Denoiser:
    """A denoiser combining two branches: combine(cond_model(x, t), uncond_model(x, t), w) (core.guidance)."""

    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return combine(cond_model(x, t), uncond_model(x, t), w)

    return model
