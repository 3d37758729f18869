"""The batch types every part of the trainer passes around (imports only torch and core.cond).

PairBatch: preference pairs; PromptBatch: prompts (with optional images) for the data-free and
prompt-only methods (TDFT, DDSPO). Both carry a `core.cond.Cond` (the conditioning of a batch of rows).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..core.cond import Cond


@dataclass
class PairBatch:
    """Preference pairs: latents_w/latents_l [B, C, h, w] clean latents, cond [B], prompts (B or empty)."""

    latents_w: torch.Tensor
    latents_l: torch.Tensor
    cond: Cond
    prompts: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.latents_w.shape != self.latents_l.shape:
            raise ValueError(f"PairBatch: winner latents {tuple(self.latents_w.shape)} and loser latents "
                             f"{tuple(self.latents_l.shape)} differ in shape")
        if len(self.cond) != self.latents_w.shape[0]:
            raise ValueError(f"PairBatch: {len(self.cond)} conditioning rows for {self.latents_w.shape[0]} pairs")
        if self.prompts and len(self.prompts) != self.latents_w.shape[0]:
            raise ValueError(f"PairBatch: {len(self.prompts)} prompts for {self.latents_w.shape[0]} pairs")


@dataclass
class PromptBatch:
    """Prompts (with optional images): cond [B]; latents [B, C, h, w] real images or None (pure noise:
    then TDFT needs `latent_shape` = (C, h, w)); latents_l [B, C, h, w] DDSPO loser images (efficient
    variant: another prompt's image) or None; neg_cond [B] a precomputed degraded-prompt cond or None."""

    prompts: list[str]
    cond: Cond
    latents: torch.Tensor | None = None
    latents_l: torch.Tensor | None = None
    neg_cond: Cond | None = None
    latent_shape: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        B = len(self.cond)
        if self.prompts and len(self.prompts) != B:
            raise ValueError(f"PromptBatch: {len(self.prompts)} prompts for {B} conditioning rows")
        for name in ("latents", "latents_l"):
            x = getattr(self, name)
            if x is not None and x.shape[0] != B:
                raise ValueError(f"PromptBatch: {name} has {x.shape[0]} rows for {B} conditioning rows")
        if self.latents is not None and self.latents_l is not None and self.latents.shape != self.latents_l.shape:
            raise ValueError(f"PromptBatch: latents {tuple(self.latents.shape)} and latents_l "
                             f"{tuple(self.latents_l.shape)} differ in shape")
        if self.neg_cond is not None and len(self.neg_cond) != B:
            raise ValueError(f"PromptBatch: neg_cond has {len(self.neg_cond)} rows for {B}")
