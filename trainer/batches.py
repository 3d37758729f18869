"""The batch types every part of the trainer passes around (a leaf module: it imports only torch).

Cond: the conditioning of a batch of rows; PairBatch: preference pairs; PromptBatch: prompts
(with optional images) for the data-free and prompt-only methods (TDFT, DDSPO).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch


@dataclass
class Cond:
    """Conditioning for a batch of rows.

    hidden: [B, L, D] text-encoder hidden states (SDXL: both encoders concatenated).
    added:  SDXL added conditioning {"text_embeds": [B, P], "time_ids": [B, 6]}; empty for SD1.x.
    """

    hidden: torch.Tensor
    added: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.hidden.shape[0]

    def index(self, rows) -> "Cond":
        return Cond(self.hidden[rows], {k: v[rows] for k, v in self.added.items()})

    def to(self, *args, **kwargs) -> "Cond":
        return Cond(self.hidden.to(*args, **kwargs), {k: v.to(*args, **kwargs) for k, v in self.added.items()})

    def repeat(self, n: int) -> "Cond":
        """[B] -> [n*B], the whole batch repeated n times (row order: copy 0 rows, copy 1 rows, ...)."""
        return Cond(self.hidden.repeat(n, *([1] * (self.hidden.ndim - 1))),
                    {k: v.repeat(n, *([1] * (v.ndim - 1))) for k, v in self.added.items()})

    @staticmethod
    def cat(conds: Sequence["Cond"]) -> "Cond":
        keys = conds[0].added.keys()
        return Cond(torch.cat([c.hidden for c in conds]), {k: torch.cat([c.added[k] for c in conds]) for k in keys})

    @staticmethod
    def where(mask: torch.Tensor, a: "Cond", b: "Cond") -> "Cond":
        """Row-wise select: rows where mask[B] is True come from `a`, others from `b`."""
        def sel(x, y):
            return torch.where(mask.reshape(-1, *([1] * (x.ndim - 1))).to(x.device), x, y)
        return Cond(sel(a.hidden, b.hidden), {k: sel(a.added[k], b.added[k]) for k in a.added})



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
