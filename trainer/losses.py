"""Preference losses: one pure function per loss over per-sample mse tensors (METHODS.md).

Every function takes per-sample mean squared errors `[B]` (METHODS.md `mse`: the mean over all
latent dims) and returns a `LossOut`; nothing here touches a network. `trainer/methods.py`
produces the mse values and picks the function (its `METHODS` is the one registry: there is no
second one of losses); the loop never branches on a method's name.

β convention (METHODS.md decision): β is Diffusion-DPO's own (SalesforceAIResearch/DiffusionDPO),
logit = −(β/2)·w(t)·(Δ_w − Δ_l): the paper values β = 2000..5000 (SD1.5/SDXL) carry over
unchanged. The diffusers DPO example and the Diffusion-NPO scripts write β' = β/2.

Code names -> paper symbols (seed 000 eq. 18–21):
    s          β/2 · w(t), the scale that turns an mse into d (Tω(t) folded into β)
    d_pol      d_θ   = s · mse(eps, eps_θ)
    d_ref      d_ref = s · mse(eps, eps_ref)
    m          d_θ − d_ref
    m_mix      −log(λ e^{−d_θ} + (1−λ) e^{−d_ref}) − d_ref
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class LossOut:
    """loss: scalar mean over the batch; logit: [B] the Bradley-Terry logit; per_sample: [B] losses."""

    loss: torch.Tensor
    logit: torch.Tensor
    per_sample: torch.Tensor


def _f(x: torch.Tensor) -> torch.Tensor:
    """At least float32: β·mse reaches ~1e4, half precision would round the margins away."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _scale(beta: float, weight: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | float:
    """s = β/2 · w(t), shaped [B] (or a float when there is no weight)."""
    if weight is None:
        return beta / 2
    return (beta / 2) * weight.to(device=like.device, dtype=like.dtype)


def _out(logit: torch.Tensor) -> LossOut:
    per = -F.logsigmoid(logit)  # [B]
    return LossOut(loss=per.mean(), logit=logit, per_sample=per)


def dpo_loss(mse_pol_w: torch.Tensor, mse_pol_l: torch.Tensor, mse_ref_w: torch.Tensor, mse_ref_l: torch.Tensor,
             beta: float, weight: torch.Tensor | None = None) -> LossOut:
    """Diffusion-DPO (seed 000 §3.3, seed 003 eq. 3): logit = −(β/2)·w(t)·(m(x_w) − m(x_l)).

    m(x) = mse(eps, eps_θ) − mse(eps, eps_ref). Computed as differences of d = s·mse so that
    `bdpo_loss(..., lam=1)` reproduces it bit for bit.
    """
    mse_pol_w, mse_pol_l, mse_ref_w, mse_ref_l = map(_f, (mse_pol_w, mse_pol_l, mse_ref_w, mse_ref_l))
    s = _scale(beta, weight, mse_pol_w)
    m_w = s * mse_pol_w - s * mse_ref_w  # [B]
    m_l = s * mse_pol_l - s * mse_ref_l  # [B]
    return _out(-(m_w - m_l))


def bdpo_m_mix(d_pol: torch.Tensor, d_ref: torch.Tensor, lam: float) -> torch.Tensor:
    """m_mix = −log(λ e^{−d_θ} + (1−λ) e^{−d_ref}) − d_ref (seed 000 eq. 21), via logsumexp. [B]

    Bounded above by −log(1−λ) for every input (METHODS.md); λ = 1 gives d_θ − d_ref exactly.
    """
    if not 0 < lam <= 1:
        raise ValueError(f"BDPO lambda must be in (0, 1], got {lam}")
    log_lam = math.log(lam)
    log_1m = math.log1p(-lam) if lam < 1 else -math.inf
    return -torch.logaddexp(log_lam - d_pol, log_1m - d_ref) - d_ref


def bdpo_loss(mse_pol_w: torch.Tensor, mse_pol_l: torch.Tensor, mse_ref_w: torch.Tensor, mse_ref_l: torch.Tensor,
              beta: float, lam: float = 0.9, weight: torch.Tensor | None = None) -> LossOut:
    """Diff-BDPO upper bound, seed 000 eq. 18–21: logit = −(m(x_w) − m_mix(x_l)).

    d = (β/2)·w(t)·mse (METHODS.md), so that λ = 1 equals `dpo_loss` exactly. The loser's
    contribution m_mix(x_l) ≤ −log(1−λ): pushing the loser's error up stops paying off.
    """
    mse_pol_w, mse_pol_l, mse_ref_w, mse_ref_l = map(_f, (mse_pol_w, mse_pol_l, mse_ref_w, mse_ref_l))
    s = _scale(beta, weight, mse_pol_w)
    m_w = s * mse_pol_w - s * mse_ref_w  # [B]
    m_mix_l = bdpo_m_mix(s * mse_pol_l, s * mse_ref_l, lam)  # [B]
    return _out(-(m_w - m_mix_l))


def ddspo_loss(m_w: torch.Tensor, m_l: torch.Tensor, beta: float, weight: torch.Tensor | None = None) -> LossOut:
    """DDSPO (seed 003 eq. 4–5), METHODS.md: logit = −(β/2)·w(t)·(m_w − m_l); paper β = 16000.

    m_w = mse(eps_w*, eps_θ(x_w)) (the reference term vanishes), m_l = mse(eps_l*, eps_θ(x_l)) −
    mse(eps_l*, eps_ref(x_l, c)); see `trainer/ddspo.py` for the targets.
    """
    m_w, m_l = _f(m_w), _f(m_l)
    s = _scale(beta, weight, m_w)
    return _out(-(s * m_w - s * m_l))


def implicit_accuracy(logit: torch.Tensor) -> torch.Tensor:
    """Fraction of pairs the implicit reward orders correctly: (logit > 0).mean() (METHODS.md)."""
    return (logit.detach() > 0).float().mean()


def per_sample_mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """mse(a, b) per sample: mean over every dim but the first, in at least float32. [B]"""
    d = _f(a) - _f(b)
    return d.pow(2).flatten(1).mean(1)
