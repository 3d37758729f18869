"""Per-row offsets on one batched forward of the WebUI's UNet (`core.branch_lora` forward hooks: no
weight patching, no second model), for forwards whose unconditional rows are known."""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from ..core import branch_lora
from ..core.branch_lora import BranchOffsets
from .plan import NPOPlan


class NPORuntime:
    """Per-row offsets on `unet` for forwards whose unconditional rows are known.

    The hook plan (`core.branch_lora.BranchOffsets`) is built lazily on the first forward, when
    the WebUI has put the UNet on its device, and rebuilt if the device or dtype changes. Hooks
    exist only during `run(...)` unless `hold()` keeps them (A1111 path).
    """

    def __init__(self, unet: nn.Module, plan: NPOPlan):
        self.unet = unet
        self.plan = plan
        self._br: branch_lora.BranchOffsets | None = None
        self._key = None
        self.calls = 0

    def _branch(self) -> BranchOffsets:
        probe = next((self.unet.get_submodule(p) for p in (*self.plan.delta, *self.plan.eta)), None)
        key = None if probe is None else (probe.weight.device, probe.weight.dtype)
        if self._br is None or key != self._key:
            if self._br is not None:
                self._br.close()
            self._br, self._key = branch_lora.BranchOffsets(self.unet, self.plan.groups()), key
        return self._br

    def run(self, uncond: Sequence[bool], sigma: float, forward: Callable[[], torch.Tensor]) -> torch.Tensor:
        """`forward()` with the rows' offsets active (hooks installed for this call only)."""
        br = self._branch()
        br.set_rows(self.plan.row_groups(uncond, sigma))
        self.calls += 1
        with br:
            return forward()

    def hold(self) -> BranchOffsets:
        """Install the hooks until `release()`; rows are set per forward with `set_rows`."""
        br = self._branch()
        br.set_rows([None])
        br.__enter__()
        return br

    def set_rows(self, uncond: Sequence[bool] | None, sigma: float, n: int) -> None:
        br = self._branch()
        br.set_rows([None] * n if uncond is None else self.plan.row_groups(uncond, sigma))
        self.calls += 1

    def release(self) -> None:
        if self._br is not None:
            self._br.close()
