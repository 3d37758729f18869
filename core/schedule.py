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


# --- Timestep samplers and timestep weights (METHODS.md "Reference update and timestep-aware
# training", seed 004 §3.2). Every sampler shares one signature:
#     sampler(n, T, generator=None, *, gamma=0.9, bins=10) -> LongTensor [n] in [0, T)
# (options a sampler does not use are accepted and ignored, so callers never branch on a name);
# every weight shares `weight(t [n], abar [T]) -> float64 [n]`. Tensors come back on the CPU
# (or on the generator's device); callers move them.


def _gen_device(generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


def _rand(n: int, generator: torch.Generator | None) -> torch.Tensor:
    return torch.rand(n, generator=generator, device=_gen_device(generator), dtype=torch.float64)


def timesteps_uniform(n: int, T: int, generator: torch.Generator | None = None, **_options) -> torch.Tensor:
    """t ~ U{0, ..., T-1} (Diffusion-DPO; seed 004 eq. 6)."""
    return (_rand(n, generator) * T).long().clamp_(0, T - 1)


def gamma_bin_edges(T: int, bins: int) -> torch.Tensor:
    """Integer edges [bins+1] splitting [0, T) into `bins` nearly equal bins (bin i = [e[i], e[i+1]))."""
    if not 1 <= bins <= T:
        raise ValueError(f"timestep bins must be in [1, T={T}], got {bins}")
    return torch.linspace(0, T, bins + 1, dtype=torch.float64).round().long()


def gamma_bin_probs(gamma: float, bins: int) -> torch.Tensor:
    """P(bin k) = gamma^k / sum_j gamma^j, k = 0 the NOISIEST bin (seed 004 §3.2, Cat(gamma^t)). [bins]"""
    if not 0 < gamma <= 1:
        raise ValueError(f"timestep gamma must be in (0, 1], got {gamma}")
    p = torch.tensor([gamma ** k for k in range(bins)], dtype=torch.float64)
    return p / p.sum()


def timesteps_gamma_bins(n: int, T: int, generator: torch.Generator | None = None, *,
                         gamma: float = 0.9, bins: int = 10, **_options) -> torch.Tensor:
    """Oversample the high-noise end: bin k ~ Cat(gamma^k), t uniform inside the bin (seed 004 §3.2).

    METHODS.md decision: [0, T) is split into `bins` bins; bin k = 0 holds the largest t.
    """
    edges = gamma_bin_edges(T, bins)  # [bins+1], ascending in t
    probs = gamma_bin_probs(gamma, bins)  # [bins], k = 0 noisiest
    k = torch.multinomial(probs.to(_gen_device(generator)), n, replacement=True, generator=generator).cpu()
    lo, hi = edges[bins - 1 - k], edges[bins - k]  # [n] each: bin k counted from the top
    u = _rand(n, generator).cpu()
    return (lo + (u * (hi - lo).double()).long()).clamp(max=T - 1)


TIMESTEP_SAMPLERS = {
    "uniform": timesteps_uniform,
    "gamma_bins": timesteps_gamma_bins,
}


def weight_none(t: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
    """w(t) = 1 (the constant schedule of Diffusion-DPO)."""
    return torch.ones(t.shape, dtype=torch.float64)


def weight_snr_reward_scale(t: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
    """w(t) = 1 + minmax_t(1 / sqrt(SNR(t))), in [1, 2]: larger at the noisy end (seed 004 §3.2, Fig. 2d).

    The min-max normalisation runs over all T steps of `abar`, so w = 1 at the cleanest step and 2
    at the noisiest one.
    """
    r = snr(abar.double()).rsqrt()  # [T] = sqrt((1-abar)/abar), increasing in t
    norm = (r - r.min()) / (r.max() - r.min())
    return 1 + norm[t.long().cpu()]


TIMESTEP_WEIGHTS = {
    "none": weight_none,
    "snr_reward_scale": weight_snr_reward_scale,
}
