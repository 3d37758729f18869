"""Finiteness checks shared by the writers (checkpoints, LoRAs), the offsets loader and the loop."""
from __future__ import annotations

import math
from typing import Iterable, Mapping

import torch


def first_nonfinite(tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]) -> str | None:
    """The first key (in the mapping's order) whose tensor holds a NaN or ±inf, else None.

    Integer and bool tensors are always finite; floats are checked in their own dtype (fp16
    overflow to inf is caught as such)."""
    items = tensors.items() if isinstance(tensors, Mapping) else tensors
    for key, t in items:
        if torch.is_tensor(t) and (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all()):
            return key
    return None


def is_finite(x: float | torch.Tensor) -> bool:
    """A scalar (loss, gradient norm) is finite."""
    return bool(torch.isfinite(x).all()) if torch.is_tensor(x) else math.isfinite(float(x))
