"""The conditioning of a batch of rows (a leaf: it imports only torch), shared by the trainer and the
diffusers sampling host."""
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
