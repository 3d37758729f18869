"""The NPO panel's values (`NPOSettings`): defaults, validation, and their round trip through the
infotext (`webui.infotext` keys), including pasted generation parameters ("send to txt2img")."""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass

from ..core.npo import ALPHA_DEFAULT, BETA_DEFAULT, sigma_bound
from .infotext import INFOTEXT_KEYS, SNPO_UNCOND, format_number

MODES = ("NPO", "SNPO")
NONE = "None"  # dropdown entry for "no offset"


@dataclass
class NPOSettings:
    """The panel's values. Offsets are file names relative to an offset folder ("" = none);
    sigma_min / sigma_max <= 0 mean unbounded (the offsets act at every step)."""

    enabled: bool = False
    mode: str = "NPO"
    positive: str = ""
    alpha: float = ALPHA_DEFAULT
    negative: str = ""
    beta: float = BETA_DEFAULT
    sigma_min: float = 0.0
    sigma_max: float = 0.0

    def __post_init__(self):
        self.positive = "" if self.positive in (None, NONE) else str(self.positive)
        self.negative = "" if self.negative in (None, NONE) else str(self.negative)
        self.alpha, self.beta = float(self.alpha), float(self.beta)
        self.sigma_min = float(self.sigma_min or 0.0)
        self.sigma_max = float(self.sigma_max or 0.0)

    def validate(self) -> None:
        """Raise ValueError naming the problem; called before anything is applied."""
        if self.mode not in MODES:
            raise ValueError(f"NPO: unknown mode {self.mode!r} (expected one of {MODES})")
        for name in ("alpha", "beta", "sigma_min", "sigma_max"):
            v = getattr(self, name)
            if not math.isfinite(v):
                raise ValueError(f"NPO: {name} must be a finite number, got {v}")
        if self.mode == "NPO" and not self.negative:
            raise ValueError("NPO: choose a negative offset (delta); NPO without one is plain CFG")
        if self.mode == "SNPO" and not (self.negative or self.positive):
            raise ValueError("SNPO: choose the SNPO offset (the negative-offset dropdown), or a positive offset")
        lo, hi = self.sigma_range()
        if lo is not None and hi is not None and lo > hi:
            raise ValueError(f"NPO: sigma min {lo:g} is larger than sigma max {hi:g}")

    def sigma_range(self) -> tuple[float | None, float | None]:
        return sigma_bound(self.sigma_min), sigma_bound(self.sigma_max)

    def infotext(self) -> dict[str, str]:
        """Generation parameters (`p.extra_generation_params`): only what is set."""
        if not self.enabled:
            return {}
        k = INFOTEXT_KEYS
        out = {k["mode"]: self.mode}
        if self.positive:
            out[k["positive"]] = self.positive
            if self.mode == "NPO":
                out[k["alpha"]] = format_number(self.alpha)
        if self.negative:
            out[k["negative"]] = self.negative
            out[k["beta"]] = format_number(self.beta)
        lo, hi = self.sigma_range()
        if lo is not None:
            out[k["sigma_min"]] = format_number(lo)
        if hi is not None:
            out[k["sigma_max"]] = format_number(hi)
        if self.mode == "SNPO":
            out[SNPO_UNCOND[0]] = SNPO_UNCOND[1]
        return out

    @classmethod
    def from_infotext(cls, params: Mapping[str, str]) -> NPOSettings:
        """Inverse of `infotext` (values as the WebUI's infotext parser returns them: strings)."""
        k = INFOTEXT_KEYS
        if k["mode"] not in params:
            return cls(enabled=False)
        return cls(enabled=True, mode=str(params[k["mode"]]), positive=str(params.get(k["positive"], "")),
                   alpha=float(params.get(k["alpha"], ALPHA_DEFAULT)), negative=str(params.get(k["negative"], "")),
                   beta=float(params.get(k["beta"], BETA_DEFAULT)), sigma_min=float(params.get(k["sigma_min"], 0.0)),
                   sigma_max=float(params.get(k["sigma_max"], 0.0)))


def paste_value(params: Mapping[str, str], field: str):
    """Value of panel field `field` for pasted generation parameters (the "send to txt2img" flow)."""
    s = NPOSettings.from_infotext(params)
    if field in ("positive", "negative"):
        return getattr(s, field) or NONE
    return getattr(s, field)


def settings_dict(s: NPOSettings) -> dict:
    return asdict(s)
