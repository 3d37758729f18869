"""Noise-schedule helpers shared by guidance, training and sampling (METHODS.md "Notation").

`abar` always comes from the model's own scheduler (`alphas_cumprod`), T = len(abar).
"""
from __future__ import annotations

import torch


def abar_from_scheduler(scheduler) -> torch.Tensor:
    """alphas_cumprod of a diffusers scheduler as float64 [T]."""
    return torch.as_tensor(scheduler.alphas_cumprod, dtype=torch.float64).clone()


def gather(abar: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """abar[t] shaped to broadcast against `like` ([B] -> [B, 1, 1, 1])."""
    out = abar.to(like.device)[t.long()].to(like.dtype)
    return out.reshape(-1, *([1] * (like.ndim - 1)))


def add_noise(x0: torch.Tensor, eps: torch.Tensor, abar_t: torch.Tensor) -> torch.Tensor:
    """Forward process: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps."""
    return abar_t.sqrt() * x0 + (1 - abar_t).sqrt() * eps


def v_to_eps(v: torch.Tensor, x_t: torch.Tensor, abar_t: torch.Tensor) -> torch.Tensor:
    """v-prediction to eps: eps = sqrt(abar) v + sqrt(1-abar) x_t (Salimans & Ho 2022)."""
    return abar_t.sqrt() * v + (1 - abar_t).sqrt() * x_t


def eps_to_v(eps: torch.Tensor, x_t: torch.Tensor, abar_t: torch.Tensor) -> torch.Tensor:
    """eps to v: v = (eps - sqrt(1-abar) x_t) / sqrt(abar)."""
    return (eps - (1 - abar_t).sqrt() * x_t) / abar_t.sqrt()


def eps_to_x0(eps: torch.Tensor, x_t: torch.Tensor, abar_t: torch.Tensor) -> torch.Tensor:
    """Tweedie / DDIM x0 estimate: x0 = (x_t - sqrt(1-abar) eps) / sqrt(abar)."""
    return (x_t - (1 - abar_t).sqrt() * eps) / abar_t.sqrt()


def to_eps(pred: torch.Tensor, x_t: torch.Tensor, abar_t: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """Convert a model output of `prediction_type` ('epsilon' or 'v_prediction') to eps."""
    if prediction_type == "epsilon":
        return pred
    if prediction_type == "v_prediction":
        return v_to_eps(pred, x_t, abar_t)
    raise ValueError(f"unsupported prediction_type {prediction_type!r} (expected 'epsilon' or 'v_prediction')")


def snr(abar: torch.Tensor) -> torch.Tensor:
    """SNR(t) = abar / (1 - abar)."""
    return abar / (1 - abar)


def sigma_from_abar(abar: torch.Tensor) -> torch.Tensor:
    """k-diffusion sigma of a VP step: sigma = sqrt((1 - abar) / abar)."""
    return ((1 - abar) / abar).sqrt()
