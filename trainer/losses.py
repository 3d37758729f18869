"""Preference losses: one pure function per loss over per-sample mse tensors (METHODS.md).

Every function takes per-sample mean squared errors `[B]` (METHODS.md `mse`: the mean over all
latent dims) and returns a `LossOut`; nothing here touches a network. `trainer/methods.py`
produces the mse values and picks the function; the loop never branches on a method's name.

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


def _out(logit: torch.Tensor, outer: torch.Tensor | None = None) -> LossOut:
    """−log σ(logit) [B], times `outer` [B] (a weight outside the sigmoid) when given; mean = loss."""
    per = -F.logsigmoid(logit)  # [B]
    if outer is not None:
        per = per * outer.to(device=per.device, dtype=per.dtype)
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


def ddspo_loss(m_w: torch.Tensor, m_l: torch.Tensor, beta: float, weight: torch.Tensor | None = None,
               outer_weight: torch.Tensor | None = None) -> LossOut:
    """DDSPO (seed 003 eq. 4–5), METHODS.md: logit = −(β/2)·w(t)·(m_w − m_l); paper β = 16000.

    m_w = mse(eps_w*, eps_θ(x_w)) (the reference term vanishes), m_l = mse(eps_l*, eps_θ(x_l)) −
    mse(eps_l*, eps_ref(x_l, c)); see `trainer/ddspo.py` for the targets. `weight` w(t) scales the
    logit (inside the sigmoid); `outer_weight` [B] multiplies −log σ(logit) (outside it: the
    authors' `--loss_weighting linear`, `loss_weight`).
    """
    m_w, m_l = _f(m_w), _f(m_l)
    s = _scale(beta, weight, m_w)
    return _out(-(s * m_w - s * m_l), outer_weight)


# per-pair weights outside the sigmoid (MethodConfig.ddspo_loss_weighting); the only list of names
LOSS_WEIGHTINGS = ("none", "linear")


def loss_weight(kind: str, t: torch.Tensor, T: int) -> torch.Tensor | None:
    """The weight of −log σ(logit) per pair [B], or None for "none".

    "linear": t / (T − 1) (KU-MIIL/DDSPO `ddspo/dpo.py`, selected by their SDXL script): pairs at
    t = 0 do not count, the noisiest count fully.
    """
    if kind == "none":
        return None
    if kind == "linear":
        return t.double() / (T - 1)
    raise ValueError(f"unknown loss weighting {kind!r} (expected one of {LOSS_WEIGHTINGS})")


# logits past this size are saturated: σ(−10) = 4.5e-5 is what is left of the gradient
SATURATED_LOGIT = 10.0


def logit_metrics(logit: torch.Tensor, prefix: str = "logit") -> dict[str, torch.Tensor]:
    """Bradley-Terry logit statistics: mean, mean |logit| and the fraction with |logit| > SATURATED_LOGIT
    (a pair past it gives almost no gradient: β too large for the learning rate, docs/training.md)."""
    z = logit.detach().float()
    return {f"{prefix}/mean": z.mean(), f"{prefix}/abs_mean": z.abs().mean(),
            f"{prefix}/saturated_frac": (z.abs() > SATURATED_LOGIT).float().mean()}


# the TDFT x0 distances (MethodConfig.tdft_loss); the only list of these names
TDFT_X0_LOSSES = ("pseudo_huber", "l2", "huber")


def pseudo_huber(r: torch.Tensor, c: float) -> torch.Tensor:
    """sqrt(r² + c²) − c, elementwise (the authors' `--loss_type huber` with `--huber_c c`)."""
    return torch.sqrt(r * r + c * c) - c


def tdft_x0_loss(x0_pred: torch.Tensor, x0_target: torch.Tensor, kind: str = "pseudo_huber", c: float = 1e-3,
                 huber_delta: float = 1.0) -> torch.Tensor:
    """Per-sample x0-space distance of TDFT, seed 002 eq. 17: d(x0_θ(x_s, s, c), x0_hat) [B].

    The mean over latent dims of an elementwise distance of r = x0_pred − x0_target:
      "pseudo_huber": sqrt(r² + c²) − c (G-U-N/Diffusion-NPO `Self-NPO/train.py`; `train.sh` and
                      `train_xl.sh` select it, c = 1e-3): ≈ r²/(2c) for |r| ≪ c, ≈ |r| beyond;
      "l2":           r² (eq. 17 up to the constant dimension count);
      "huber":        PyTorch's Huber loss `F.huber_loss(delta=huber_delta)`: r²/2 for |r| ≤ δ,
                      δ(|r| − δ/2) beyond (a different loss from the authors').
    The authors' scalar is the mean over every element, i.e. the batch mean of this [B].
    """
    r = _f(x0_pred) - _f(x0_target)
    if kind == "pseudo_huber":
        if not c > 0:
            raise ValueError(f"pseudo-Huber c must be > 0, got {c}")
        per = pseudo_huber(r, c)
    elif kind == "l2":
        per = r.pow(2)
    elif kind == "huber":
        per = F.huber_loss(r, torch.zeros_like(r), reduction="none", delta=huber_delta)
    else:
        raise ValueError(f"unknown TDFT x0 loss {kind!r} (expected one of {TDFT_X0_LOSSES})")
    return per.flatten(1).mean(1)


def implicit_accuracy(logit: torch.Tensor) -> torch.Tensor:
    """Fraction of pairs the implicit reward orders correctly: (logit > 0).mean() (METHODS.md)."""
    return (logit.detach() > 0).float().mean()


def per_sample_mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """mse(a, b) per sample: mean over every dim but the first, in at least float32. [B]"""
    d = _f(a) - _f(b)
    return d.pow(2).flatten(1).mean(1)


# The registry of preference losses (name -> function). Methods pick from it; see methods.py.
LOSSES = {
    "dpo": dpo_loss,
    "bdpo": bdpo_loss,
    "ddspo": ddspo_loss,
}
