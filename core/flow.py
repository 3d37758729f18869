"""Rectified flow (flow matching) in the loss layer: the math every flow method shares.

Pure tensor functions (torch only; no other project package). The ε-model counterparts live in
`core/schedule.py`; the losses over per-sample errors in `trainer/losses.py` apply unchanged to
the errors computed here (docs/methods.md "Flow matching (rectified flow)").

Notation (SD3, SANA, Flux; diffusers' `FlowMatchEulerDiscreteScheduler`, where t is its `sigma`):
    x_t  = (1 − t)·x0 + t·ε          t ∈ [0, 1]: t = 0 is the data, t = 1 pure noise
    v    = ε − x0                     the velocity target (what the network predicts); dx_t/dt = v
    x0   = x_t − t·v                  ε = x_t + (1 − t)·v
    v    = (x_t − x0)/t  = (ε − x_t)/(1 − t)
    the network's timestep input is t·N, N = num_train_timesteps = 1000 (`to_model_timestep`)
    the x0 form of KU-MIIL/DDSPO's SD3 adapter (`precondition_outputs`): x0_pred = pred·(−σ) + x_t,
    compared against x0: exactly `v_to_x0` with σ = t.

Error convention (METHODS.md `mse`, decided for flow as for ε): per-sample MEAN of the squared error
over every latent element, shape [B], with Diffusion-DPO's β: logit = −(β/2)·w(t)·(Δ_w − Δ_l).
KU-MIIL/DDSPO (`ddspo/dpo.py`) and flow_grpo (`scripts/train_sd3_dpo.py`) use the same mean;
SimpleTuner's Flow-DPO (`norm_type="sum"`, its default) sums over the N latent elements, so its
logit is ours with β_sum = β_mean / N. Because the errors are affine images of one another at fixed
(x_t, t): ε − ε_θ = (1 − t)·(v − v_θ), x0 − x0_θ = −t·(v − v_θ), so
    mse_x0 = t²·mse_v,   mse_ε = (1 − t)²·mse_v:
the x0 form is the v form with w(t) = t² inside the logit, the eps form the v form with w(t) = (1 − t)²
(`error_weight`; the eps form weights a flow model's errors as the ε objective of SD1.x/SDXL does).

Timestep sampling (SD3, Esser et al. 2024 §3.1; diffusers `compute_density_for_timestep_sampling`):
    u ~ logit-normal: u = sigmoid(m + s·z), z ~ N(0, 1) (SD3 defaults m = 0, s = 1)
        uniform:      u ~ U[0, 1)
        mode:         u = 1 − r − c·(cos²(π r/2) − 1 + r), r ~ U[0, 1) (c = mode_scale, 1.29)
    shift:            t = shift·u / (1 + (shift − 1)·u)    (the scheduler's `shift`; 3.0 for SD3)
Our t is u read directly as the noise level (the SD3 paper). The diffusers training scripts that
DDSPO and flow_grpo copy instead index the scheduler's DESCENDING table, `sigmas[int(u·N)]`, i.e.
t = shift(1 − ⌊N·u⌋/N) ≈ shift(1 − u) (`diffusers_index_t`): for a symmetric sampler (logit-normal
with m = 0, uniform) the same distribution up to their 1/N grid, but their `logit_mean` m is our −m.

Flux's resolution-dependent shift (`use_dynamic_shifting`, exponential time shift) is the same
formula with shift = e^μ (`dynamic_shift`): e^μ/(e^μ + 1/t − 1) = e^μ·t/(1 + (e^μ − 1)·t).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

# the prediction_type of a flow model (a Family's, a Backend's, a ModelBundle's): the network predicts v
FLOW = "flow"

# the timestep samplers (`sample_u` scheme names); the only list of these names
FLOW_T_SAMPLERS = ("logit_normal", "uniform", "mode")


def _f(x: torch.Tensor) -> torch.Tensor:
    """At least float32 (as trainer/losses.py): half precision would round the margins away."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def bcast(t: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """t [B] (or a scalar) shaped to broadcast against `like` ([B] -> [B, 1, 1, 1]), on like's device/dtype."""
    t = torch.as_tensor(t, device=like.device, dtype=like.dtype)
    return t.reshape(-1, *([1] * (like.ndim - 1))) if t.ndim == 1 else t


# ---------------------------------------------------------------- interpolation, target, conversions

def interpolate(x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
    """x_t = (1 − t)·x0 + t·ε (rectified flow; t [B] or a scalar)."""
    tb = bcast(t, x0)
    return (1 - tb) * x0 + tb * eps


def velocity_target(x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """v = ε − x0: the regression target of SD3/SANA/Flux training (= dx_t/dt)."""
    return eps - x0


def v_to_x0(v: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
    """x0 = x_t − t·v."""
    return x_t - bcast(t, x_t) * v


def v_to_eps(v: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
    """ε = x_t + (1 − t)·v."""
    return x_t + (1 - bcast(t, x_t)) * v


def x0_to_v(x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
    """v = (x_t − x0)/t (undefined at t = 0)."""
    return (x_t - x0) / bcast(t, x_t)


def eps_to_v(eps: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
    """v = (ε − x_t)/(1 − t) (undefined at t = 1)."""
    return (eps - x_t) / (1 - bcast(t, x_t))


def x0_eps_from_v(v: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0, ε) both read from one velocity at (x_t, t)."""
    return v_to_x0(v, x_t, t), v_to_eps(v, x_t, t)


def precondition_x0(pred: torch.Tensor, x_t: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """KU-MIIL/DDSPO `adapters/sd3.py` `precondition`: pred·(−σ) + x_t, the x0 form (= `v_to_x0`)."""
    return pred * (-bcast(sigma, x_t)) + x_t


# the two targets a flow method can regress against (FlowErrors.form); the only list of these names
FLOW_ERROR_FORMS = ("v", "x0", "eps")


def error_weight(form: str, t: torch.Tensor) -> torch.Tensor:
    """w(t) [B] with mse_form = w(t)·mse_v at equal (x_t, t): 1 for "v", t² for "x0" (module docstring)."""
    if form == "v":
        return torch.ones_like(t)
    if form == "x0":
        return t * t
    if form == "eps":
        return (1 - t) * (1 - t)
    raise ValueError(f"unknown flow error form {form!r} (expected one of {FLOW_ERROR_FORMS})")


# ---------------------------------------------------------------- errors

def per_sample_mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """METHODS.md `mse`: the MEAN of (a − b)² over every dim but the first, in at least float32. [B]

    The convention of this project's ε-losses, KU-MIIL/DDSPO `ddspo/dpo.py` and flow_grpo
    `train_sd3_dpo.py`; SimpleTuner's Flow-DPO default is the sum (= N·this, N latent elements per
    sample), so its β is ours divided by N.
    """
    d = _f(a) - _f(b)
    return d.pow(2).flatten(1).mean(1)


def flow_mse(pred_v: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
             form: str = "v") -> torch.Tensor:
    """The per-sample error of a velocity prediction [B]: "v": mse(v_θ, ε − x0); "x0": mse(x_t − t·v_θ, x0)
    (DDSPO's SD3 `precondition_outputs`). Equal to `error_weight(form, t)·mse_v` up to rounding."""
    if form == "v":
        return per_sample_mse(pred_v, velocity_target(x0, eps))
    if form == "x0":
        return per_sample_mse(precondition_x0(pred_v, x_t, t), x0)
    if form == "eps":
        return per_sample_mse(v_to_eps(pred_v, x_t, t), eps)
    raise ValueError(f"unknown flow error form {form!r} (expected one of {FLOW_ERROR_FORMS})")


# ---------------------------------------------------------------- timesteps

def _gen_device(generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


def sample_u(n: int, scheme: str = "logit_normal", generator: torch.Generator | None = None, *,
             logit_mean: float = 0.0, logit_std: float = 1.0, mode_scale: float = 1.29) -> torch.Tensor:
    """u [n] in (0, 1) by `scheme` (FLOW_T_SAMPLERS), as diffusers' `compute_density_for_timestep_sampling`:
    the same float32 draws from the same generator state (so the same stream as DDSPO's and flow_grpo's
    scripts), then computed in float64 (on the generator's device)."""
    dev = _gen_device(generator)
    if scheme == "logit_normal":
        z = torch.randn(n, generator=generator, device=dev).double()
        return torch.sigmoid(logit_mean + logit_std * z)
    r = torch.rand(n, generator=generator, device=dev).double()
    if scheme == "uniform":
        return r
    if scheme == "mode":
        return 1 - r - mode_scale * (torch.cos(math.pi * r / 2) ** 2 - 1 + r)
    raise ValueError(f"unknown flow timestep sampler {scheme!r} (expected one of {FLOW_T_SAMPLERS})")


def shift_t(t: torch.Tensor, shift: float) -> torch.Tensor:
    """t' = shift·t / (1 + (shift − 1)·t): FlowMatchEulerDiscreteScheduler's static shift (shift = 1: identity)."""
    if not shift > 0:
        raise ValueError(f"flow shift must be > 0, got {shift}")
    return shift * t / (1 + (shift - 1) * t)


def unshift_t(t_shifted: torch.Tensor, shift: float) -> torch.Tensor:
    """The inverse of `shift_t`: t = t' / (shift − (shift − 1)·t')."""
    if not shift > 0:
        raise ValueError(f"flow shift must be > 0, got {shift}")
    return t_shifted / (shift - (shift - 1) * t_shifted)


def dynamic_shift(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096,
                  base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """Flux's resolution-dependent shift e^μ, μ linear in the token count from (base_seq_len, base_shift) to
    (max_seq_len, max_shift) (diffusers' `calculate_shift`; the scheduler's defaults). Use as `shift_t(t, ·)`."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return math.exp(image_seq_len * m + base_shift - m * base_seq_len)


def sample_t(n: int, scheme: str = "logit_normal", generator: torch.Generator | None = None, *,
             shift: float = 1.0, logit_mean: float = 0.0, logit_std: float = 1.0,
             mode_scale: float = 1.29) -> torch.Tensor:
    """Continuous noise levels t [n] = shift_t(u, shift), u from `sample_u` (float64)."""
    u = sample_u(n, scheme, generator, logit_mean=logit_mean, logit_std=logit_std, mode_scale=mode_scale)
    return shift_t(u, shift)


def diffusers_index_t(u: torch.Tensor, num_train_timesteps: int = 1000, shift: float = 1.0) -> torch.Tensor:
    """What the diffusers SD3 training scripts (and KU-MIIL/DDSPO, flow_grpo) do with u:
    `scheduler.sigmas[(u·N).long()]`, whose table is shift((N − i)/N), i = 0..N−1 (descending):
    t = shift(1 − ⌊N·u⌋/N) ∈ [shift(1/N), 1]. float64 [n]."""
    N = num_train_timesteps
    i = (u * N).long().clamp(0, N - 1)
    return shift_t((N - i).double() / N, shift)


def to_model_timestep(t: torch.Tensor, num_train_timesteps: int = 1000) -> torch.Tensor:
    """The transformer's `timestep` input for noise level t: t·N (the scheduler's `timesteps = sigmas·N`)."""
    return t * num_train_timesteps


# ---------------------------------------------------------------- a pair: one t and one ε

@dataclass
class FlowPair:
    """One preference pair batch noised with ONE t [B] and ONE ε [B, ...] shared by winner and loser."""

    t: torch.Tensor  # [B], like's dtype
    eps: torch.Tensor  # [B, C, h, w]
    x_t_w: torch.Tensor  # [B, C, h, w]
    x_t_l: torch.Tensor  # [B, C, h, w]
    v_w: torch.Tensor  # [B, C, h, w] target ε − x0_w
    v_l: torch.Tensor  # [B, C, h, w] target ε − x0_l


def noise_pair(x0_w: torch.Tensor, x0_l: torch.Tensor, generator: torch.Generator | None = None, *,
               scheme: str = "logit_normal", shift: float = 1.0, logit_mean: float = 0.0, logit_std: float = 1.0,
               mode_scale: float = 1.29, t: torch.Tensor | None = None, eps: torch.Tensor | None = None) -> FlowPair:
    """Draw one t per pair (`sample_t`) and then one ε per pair (RNG order of trainer/methods.py:
    timesteps, then noise), and noise the winner and the loser with the same (t, ε). A given `t` or
    `eps` is used instead of a draw."""
    if x0_w.shape != x0_l.shape:
        raise ValueError(f"winner and loser latents differ in shape: {tuple(x0_w.shape)} vs {tuple(x0_l.shape)}")
    B = x0_w.shape[0]
    if t is None:
        t = sample_t(B, scheme, generator, shift=shift, logit_mean=logit_mean, logit_std=logit_std,
                     mode_scale=mode_scale)
    t = t.to(device=x0_w.device, dtype=x0_w.dtype)
    if eps is None:
        eps = torch.randn(tuple(x0_w.shape), generator=generator, device=_gen_device(generator)).to(x0_w)
    return FlowPair(t=t, eps=eps, x_t_w=interpolate(x0_w, eps, t), x_t_l=interpolate(x0_l, eps, t),
                    v_w=velocity_target(x0_w, eps), v_l=velocity_target(x0_l, eps))


# ---------------------------------------------------------------- sampling and re-noising

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # velocity(x [B, ...], t [B]) -> v [B, ...]


def euler_timesteps(steps: int, shift: float = 1.0) -> torch.Tensor:
    """[steps + 1] noise levels for `sample_euler` from t = 1 to 0: shift_t of an even grid (float64);
    the grid of FlowMatchEulerDiscreteScheduler.set_timesteps (without its 1/N floor) plus the final 0."""
    if steps < 1:
        raise ValueError(f"flow Euler needs steps >= 1, got {steps}")
    return shift_t(torch.linspace(1, 0, steps + 1, dtype=torch.float64), shift)


def sigma_of_t(t: torch.Tensor | float) -> torch.Tensor:
    """The VP-equivalent noise level of x_t: x_t/(1 − t) = x0 + (t/(1 − t))·ε, so σ = t/(1 − t) (inf at t = 1);
    what a σ interval (e.g. NPO's sigma_min/sigma_max gate) reads on a flow model."""
    t = torch.as_tensor(t, dtype=torch.float64)
    return torch.where(t < 1, t / (1 - t).clamp(min=1e-300), torch.full_like(t, float("inf")))


def euler_step(x: torch.Tensor, v: torch.Tensor, t: torch.Tensor | float, t_next: torch.Tensor | float) -> torch.Tensor:
    """x_{t_next} = x_t + (t_next − t)·v (FlowMatchEulerDiscreteScheduler.step without noise)."""
    return x + (bcast(t_next, x) - bcast(t, x)) * v


def sample_euler(velocity: Velocity, x: torch.Tensor, ts: torch.Tensor) -> torch.Tensor:
    """Integrate dx/dt = velocity(x, t) along `ts` ([K+1] shared, or [K+1, B] per row) with K Euler steps."""
    if ts.ndim == 1:
        ts = ts.unsqueeze(1).expand(-1, x.shape[0])
    ts = ts.to(device=x.device, dtype=x.dtype)
    for k in range(ts.shape[0] - 1):
        x = euler_step(x, velocity(x, ts[k]), ts[k], ts[k + 1])
    return x


def renoise(x_t: torch.Tensor, t: torch.Tensor, s: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Forward transition of the rectified-flow interpolation from t to s ≥ t: [B, ...]
        x_s = ((1 − s)/(1 − t))·x_t + sqrt(s² − ((1 − s)/(1 − t))²·t²)·ε
    Self-NPO eq. 16 with a = 1 − t, σ = t: if x_t = (1 − t)·x0 + t·ε', x_s has the marginal
    (1 − s)·x0 + s·ε''. The variance s² − a²t² ≥ 0 iff s ≥ t. At t = 1 only s = 1 is possible (x_s = x_t).
    """
    if bool((s < t).any()):
        raise ValueError("flow renoise needs s >= t for every row (it only adds noise)")
    tb, sb = bcast(t, x_t), bcast(s, x_t)
    one = tb >= 1
    a = torch.where(one, torch.ones_like(tb), (1 - sb) / torch.where(one, torch.ones_like(tb), 1 - tb))
    var = (sb * sb - a * a * tb * tb).clamp(min=0)
    return a * x_t + var.sqrt() * eps
