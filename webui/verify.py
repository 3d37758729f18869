"""The opt-in check of the branch path inside a real WebUI (env NPO_SUITE_VERIFY): each checked
forward is compared with the two-model computation on merged weights, one JSON line per forward."""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from .plan import NPOPlan


def merged_reference(unet: nn.Module, plan: NPOPlan, uncond: Sequence[bool], sigma: float,
                     forward: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The two-model computation with merged weights, for checking the branch path in a real WebUI.

    Runs `forward()` once with `theta+eta` merged into `unet`'s weights and once with
    `theta+alpha*eta+beta*delta` (SNPO: `theta+eta+beta*s`) merged (core.offsets.applied:
    exact restore afterwards) and takes each row from the model of its group. Also returns the
    plain forward (no offset) so a caller can show the offsets change anything. [B, C, H, W] each.
    """
    from ..core.offsets import applied

    groups = plan.row_groups(uncond, sigma)
    outs = {}
    for g in sorted(set(groups)):
        with applied(unet, plan.merged_terms(g)):
            outs[g] = forward().detach().clone()
    plain = forward().detach().clone()
    ref = torch.stack([outs[g][i] for i, g in enumerate(groups)])  # [B, C, H, W]
    return ref, plain


class VerifyLog:
    """Opt-in check (env NPO_SUITE_VERIFY=<file.jsonl>): for the first `limit` forwards, compare the
    branch output with `merged_reference` and append one JSON line per forward. Costs 3 extra
    forwards per checked step; off unless the variable is set."""

    def __init__(self, path: str | os.PathLike, limit: int = 4):
        self.path, self.limit, self.done = Path(path), limit, 0

    def check(self, unet, plan: NPOPlan, uncond, sigma, forward, out: torch.Tensor) -> None:
        if self.done >= self.limit:
            return
        self.done += 1
        ref, plain = merged_reference(unet, plan, uncond, sigma, forward)
        rec = {"sigma": float(sigma), "rows": ["uncond" if u else "cond" for u in uncond],
               "groups": plan.row_groups(uncond, sigma), "mode": plan.mode,
               "max_abs_diff_merged": float((out.float() - ref.float()).abs().max()),
               "max_abs_diff_plain": float((out.float() - plain.float()).abs().max()),
               "max_abs_out": float(out.float().abs().max())}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")


def verify_log_from_env() -> VerifyLog | None:
    p = os.environ.get("NPO_SUITE_VERIFY")
    return VerifyLog(p) if p else None
