"""One generation's NPO plan: the chosen offsets mapped onto the WebUI's UNet and their weights.

METHODS.md "NPO guidance at sampling time" (seed 001 §3.2, seed 000 eq. 12-13): the conditional
rows run `theta + eta`, the unconditional rows `theta + alpha*eta + beta*delta`; the WebUI's own
CFG combine then gives `eps = eps_neg + w*(eps_pos - eps_neg)`. SNPO (seed 000 §4.3): one model
for both branches (`theta + eta + beta*s` on every row, s the SNPO LoRA chosen in the negative
dropdown; `core.npo`); the script sets the negative prompt to "" so the unconditional input is the
encoded empty prompt.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from torch import nn

from ..core.npo import ALPHA_DEFAULT, BETA_DEFAULT, COND, UNCOND, NPOSpec, row_groups
from ..core.offsets.types import Delta, Offset
from .ldm_keys import unet_deltas_to_ldm
from .offset_notes import describe
from .settings import NPOSettings


@dataclass
class NPOPlan:
    """Resolved offsets (keyed by the UNet's own module paths) and their weights."""

    mode: str
    eta: dict[str, Delta]
    delta: dict[str, Delta]
    alpha: float = ALPHA_DEFAULT
    beta: float = BETA_DEFAULT
    sigma_min: float | None = None
    sigma_max: float | None = None

    @property
    def spec(self) -> NPOSpec:
        """The run as `core.npo.NPOSpec`; in SNPO mode the negative dropdown holds the SNPO LoRA s."""
        snpo = self.mode == "SNPO"
        return NPOSpec(eta=self.eta, delta=None if snpo else self.delta, alpha=self.alpha, beta=self.beta,
                       snpo=self.delta if snpo else None, sigma_min=self.sigma_min, sigma_max=self.sigma_max)

    def groups(self) -> dict[str, list]:
        """`core.npo` groups: pos = theta+eta, neg = theta+alpha*eta+beta*delta, snpo = theta+eta+beta*s."""
        return self.spec.groups()

    def row_groups(self, uncond: Sequence[bool], sigma: float) -> list[str]:
        """Group of every row (`core.npo.row_groups`). Outside the sigma range every row runs theta+eta."""
        kinds = [UNCOND if u else COND for u in uncond]
        return row_groups(kinds, self.mode.lower(), self.spec.active(sigma))

    def merged_terms(self, group: str) -> list[tuple[Offset, float]]:
        """The same group as weight-space terms for `core.offsets.applied` (the merged reference)."""
        return [(Offset(unet=dict(o)), w) for o, w in self.groups()[group]]


def build_plan(settings: NPOSettings, unet: nn.Module, eta: Offset | None, delta: Offset | None,
               layouts: Sequence[Mapping] | None = None) -> tuple[NPOPlan, list[str]]:
    """Map the loaded offsets onto `unet`; returns the plan and report lines. Raises ValueError when
    a chosen offset has no module that fits this model (nothing is applied then)."""
    eta_m, eta_un = unet_deltas_to_ldm(eta, unet, layouts)
    delta_m, delta_un = unet_deltas_to_ldm(delta, unet, layouts)
    for off, m, role in ((eta, eta_m, "positive offset"), (delta, delta_m, "negative offset")):
        if off is not None and not m:
            name = off.report.path if off.report is not None else role
            raise ValueError(f"NPO: {role} {name}: none of its {len(off.unet)} UNet modules fit this model "
                             "(wrong model family, or not a UNet offset)")
    lo, hi = settings.sigma_range()
    plan = NPOPlan(settings.mode, eta_m, delta_m, settings.alpha, settings.beta, lo, hi)
    lines = [describe(eta, eta_m, eta_un, "positive"), describe(delta, delta_m, delta_un,
                                                                "SNPO" if settings.mode == "SNPO" else "negative")]
    return plan, lines


# Flags the WebUIs set on a loaded checkpoint (A1111 >= 1.10: is_sd3; Forge's diffusion engines).
_FLOW_FLAGS = (("is_sd3", "SD3"), ("is_flux", "Flux"), ("is_chroma", "Chroma"))
# Block lists of the flow transformers' diffusion models (ComfyUI/Forge/A1111 module names).
_FLOW_BLOCKS = (("double_blocks", "Flux"), ("joint_blocks", "SD3"))
_GENERATE_RUNS = ("SD3", "Flux")  # families.sd3 / families.flux: `generate` samples their diffusers folders


def flow_model_refusal(sd_model, diffusion_model=None) -> str | None:
    """Why the panel refuses this checkpoint (None: an SD1.x/SDXL UNet it supports).

    A flow-matching transformer (SD3/SD3.5 in A1111 >= 1.10, Flux and SD3 in Forge) is refused with
    a message instead of running: the panel maps offsets onto SD1.x/SDXL UNet modules (LDM names),
    and Flux-dev at Forge's default (CFG 1, "Distilled CFG") runs no unconditional row, so the
    negative offset would have nothing to act on. `python -m npo_suite generate` runs SD3/SD3.5 and Flux
    diffusers folders with NPO (the ComfyUI nodes do not map offsets onto these models yet)."""
    name = next((n for flag, n in _FLOW_FLAGS if getattr(sd_model, flag, False) is True), None)
    if name is None and diffusion_model is not None:
        name = next((n for attr, n in _FLOW_BLOCKS if isinstance(getattr(diffusion_model, attr, None), nn.Module)), None)
    if name is None:
        return None
    way = (f"Use `python -m npo_suite generate` with the model's diffusers folder for {name} (real CFG, --cfg > 1)"
           if name in _GENERATE_RUNS else f"No part of NPO Suite runs {name} yet")
    return (f"NPO: this checkpoint is a {name} flow-matching transformer; the Forge/A1111 panel applies NPO to "
            f"SD1.x/SDXL UNets only (and Flux-dev at CFG 1 runs no unconditional pass for the negative offset "
            f"to act on). {way}; or disable NPO")
