"""CFG / NPO / SNPO combine functions: small pure tensor functions (METHODS.md "NPO guidance").

Every combine has the same signature `combine(pred_pos, pred_neg, w) -> pred` and the same form

    pred = pred_neg + w * (pred_pos - pred_neg)

(the papers write `(omega + 1) * eps_pos - omega * eps_neg`, i.e. `w = omega + 1`). They differ
only in *what* produced `pred_neg` (see `MODES`): plain CFG uses the same weights and the
negative prompt (or the empty prompt); NPO uses the negative model `theta + alpha*eta + beta*delta`
on the unconditional rows; SNPO uses one (SNPO-trained) model and the null conditioning.

Prediction spaces. The combine is an affine combination (the weights `1 - w` and `w` sum to 1),
and the maps between eps-, v- and x0-prediction at a fixed `(x_t, t)` are affine in the
prediction with coefficients that depend only on `(x_t, t)`, which both branches share:

    eps = sqrt(abar) * v + sqrt(1 - abar) * x_t,     x0 = (x_t - sqrt(1 - abar) * eps) / sqrt(abar)

An affine map `A` commutes with an affine combination: `A(n + w(p - n)) = A(n) + w(A(p) - A(n))`.
So combining v-predictions and converting the result equals converting both branches first and
combining eps: a v-prediction model's raw output can be combined as-is. What is NOT affine is
the CFG rescale (it divides by a standard deviation, and `std(x0)` is not proportional to
`std(eps)`), so rescale must pick one space and use it for both branches consistently
(`rescale_in_space`, default x0 as in Lin et al. 2023, Sec. 3.4).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .schedule import eps_to_v, eps_to_x0, to_eps, v_to_eps

Combine = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]


def cfg(eps_cond: torch.Tensor, eps_uncond: torch.Tensor, w: float) -> torch.Tensor:
    """Classifier-free guidance (Ho & Salimans 2022, eq. 6): uncond + w * (cond - uncond)."""
    return eps_uncond + w * (eps_cond - eps_uncond)


def npo(eps_pos: torch.Tensor, eps_neg: torch.Tensor, w: float) -> torch.Tensor:
    """NPO guidance (Diffusion-NPO seed 001 Sec. 3.2): eps_neg + w * (eps_pos - eps_neg), eps_neg from theta+alpha*eta+beta*delta."""
    return eps_neg + w * (eps_pos - eps_neg)


def snpo(eps_cond: torch.Tensor, eps_null: torch.Tensor, w: float) -> torch.Tensor:
    """SNPO sampling (Diff-SNPO seed 000 eq. 12-13): plain CFG of the one SNPO model with the null conditioning."""
    return cfg(eps_cond, eps_null, w)


# The registry: the only list of guidance names (CLI choices, ComfyUI dropdowns, tests).
GUIDANCE: dict[str, Combine] = {"cfg": cfg, "npo": npo, "snpo": snpo}


@dataclass(frozen=True)
class ModeSpec:
    """What each branch of a guidance mode runs.

    pos_group / neg_group: offset group (see `core.branch_lora`) of the conditional / unconditional
    rows: "pos" = theta + eta, "neg" = theta + alpha*eta + beta*delta, "snpo" = theta + snpo offset.
    uncond: "negative_prompt" (the user's negative prompt, "" when none) or "null" (always the
    empty prompt, the conditioning the model saw under CFG dropout).
    """

    pos_group: str
    neg_group: str
    uncond: str


MODES: dict[str, ModeSpec] = {
    "cfg": ModeSpec("pos", "pos", "negative_prompt"),
    "npo": ModeSpec("pos", "neg", "negative_prompt"),
    "snpo": ModeSpec("snpo", "snpo", "null"),
}


@dataclass(frozen=True)
class RoleSampling:
    """How a trained LoRA of one role (`core.offsets.schema.ROLES`, the `npo_role` a trainer method
    writes) is sampled: guidance `mode` (a key of MODES), the offset it is given as (`offset`: "eta" the
    positive offset, "delta" the negative one, "snpo" the SNPO LoRA; core.npo.NPOSpec), and so which
    branches run it (`cond`, `uncond`)."""

    mode: str
    offset: str
    cond: bool
    uncond: bool


# The one table "LoRA role -> how it is sampled" (METHODS.md "NPO guidance at sampling time"), read by
# training validation, the world's results, demo and probe (`core.npo.role_spec`):
#   positive  CFG, the LoRA on both branches
#   negative  NPO (seed 001 §3.2): base on the conditional branch, θ + β·LoRA (no η: α 0) on the unconditional one
#   snpo      SNPO (seed 000 eq. 12-13): CFG of the LoRA model with the null conditioning
ROLE_SAMPLING: dict[str, RoleSampling] = {
    "positive": RoleSampling("cfg", "eta", cond=True, uncond=True),
    "negative": RoleSampling("npo", "delta", cond=False, uncond=True),
    "snpo": RoleSampling("snpo", "snpo", cond=True, uncond=True),
}


def offset_active(sigma: float, sigma_min: float | None = None, sigma_max: float | None = None) -> bool:
    """True when the negative offset is on at noise level `sigma` (sigma_min <= sigma <= sigma_max; None = unbounded).

    `sigma` is the k-diffusion noise level of a VP step, sqrt((1 - abar_t) / abar_t). Outside the
    interval the unconditional rows run the positive model, i.e. the step is plain CFG.
    """
    if sigma_min is not None and sigma_max is not None and sigma_min > sigma_max:
        raise ValueError(f"sigma interval is empty: sigma_min={sigma_min} > sigma_max={sigma_max}")
    if sigma_min is not None and sigma < sigma_min:
        return False
    if sigma_max is not None and sigma > sigma_max:
        return False
    return True


def rescale_cfg(guided: torch.Tensor, pred_pos: torch.Tensor, phi: float) -> torch.Tensor:
    """CFG rescale (Lin et al. 2023, "Common Diffusion Noise Schedules...", Sec. 3.4, eq. 15-16).

    x_rescaled = guided * std(pred_pos) / std(guided) (std per sample over all non-batch dims);
    returns phi * x_rescaled + (1 - phi) * guided. Both inputs must be in the same space.
    """
    if not 0.0 <= phi <= 1.0:
        raise ValueError(f"rescale phi must be in [0, 1], got {phi}")
    if phi == 0.0:
        return guided
    dims = tuple(range(1, guided.ndim))
    std_pos = pred_pos.std(dim=dims, keepdim=True)  # [B, 1, 1, 1]
    std_cfg = guided.std(dim=dims, keepdim=True)  # [B, 1, 1, 1]
    rescaled = guided * (std_pos / std_cfg)
    return phi * rescaled + (1.0 - phi) * guided


RESCALE_SPACES = ("x0", "eps", "v")


def _eps_to_space(eps: torch.Tensor, x_t: torch.Tensor, abar_t: torch.Tensor, space: str) -> torch.Tensor:
    if space == "eps":
        return eps
    if space == "x0":
        return eps_to_x0(eps, x_t, abar_t)
    if space == "v":
        return eps_to_v(eps, x_t, abar_t)
    raise ValueError(f"unknown rescale space {space!r} (expected one of {RESCALE_SPACES})")


def _space_to_eps(pred: torch.Tensor, x_t: torch.Tensor, abar_t: torch.Tensor, space: str) -> torch.Tensor:
    if space == "eps":
        return pred
    if space == "x0":  # eps = (x_t - sqrt(abar) x0) / sqrt(1 - abar)
        return (x_t - abar_t.sqrt() * pred) / (1 - abar_t).sqrt()
    return v_to_eps(pred, x_t, abar_t)


def guide(
    mode: str,
    pred_pos: torch.Tensor,
    pred_neg: torch.Tensor,
    w: float,
    *,
    rescale: float = 0.0,
    rescale_space: str = "x0",
    x_t: torch.Tensor | None = None,
    abar_t: torch.Tensor | None = None,
    prediction_type: str = "epsilon",
) -> torch.Tensor:
    """GUIDANCE[mode] on raw model outputs, then the optional CFG rescale; returns the model's own space.

    pred_pos / pred_neg: [B, C, H, W] outputs of the model (eps or v, `prediction_type`). Without
    rescale they are combined as they are (linear, see the module docstring). With rescale > 0
    both branches are converted to `rescale_space` (needs x_t [B, C, H, W] and abar_t broadcastable
    to it), combined and rescaled there, and the result is converted back.
    """
    if mode not in GUIDANCE:
        raise ValueError(f"unknown guidance mode {mode!r} (expected one of {sorted(GUIDANCE)})")
    combine = GUIDANCE[mode]
    if rescale == 0.0:
        return combine(pred_pos, pred_neg, w)
    if x_t is None or abar_t is None:
        raise ValueError("CFG rescale needs x_t and abar_t to convert the predictions to the rescale space")
    if rescale_space not in RESCALE_SPACES:
        raise ValueError(f"unknown rescale space {rescale_space!r} (expected one of {RESCALE_SPACES})")
    pos = _eps_to_space(to_eps(pred_pos, x_t, abar_t, prediction_type), x_t, abar_t, rescale_space)
    neg = _eps_to_space(to_eps(pred_neg, x_t, abar_t, prediction_type), x_t, abar_t, rescale_space)
    guided = rescale_cfg(combine(pos, neg, w), pos, rescale)
    eps = _space_to_eps(guided, x_t, abar_t, rescale_space)
    return eps if prediction_type == "epsilon" else eps_to_v(eps, x_t, abar_t)
