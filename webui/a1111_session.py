"""A1111: NPO on the WebUI's own batched forward for one batch of one generation, and the
generations it refuses up front."""
from __future__ import annotations

import math

from torch import nn

from .plan import NPOPlan
from .row_layouts import A1111RowCursor
from .runtime import NPORuntime
from .verify import VerifyLog


def a1111_refusal(sd_model, refiner_checkpoint) -> str | None:
    """Why NPO cannot run on this A1111 generation (None: it can). Refused up front, because the
    offsets would otherwise reach the wrong rows or no rows at all:
      * InstructPix2Pix (`cond_stage_key == "edit"`): A1111 lays out [cond, image-cond, uncond];
      * a refiner checkpoint: A1111 swaps the UNet mid-sampling, the offsets sit on the first one."""
    if getattr(sd_model, "cond_stage_key", None) == "edit":
        return ("NPO: InstructPix2Pix (edit) models are not supported (A1111 batches [cond, image-cond, uncond] "
                "rows, not [cond, uncond])")
    if refiner_checkpoint not in (None, "", "None", "none"):
        return ("NPO: the refiner is not supported (A1111 switches to the refiner's UNet mid-sampling, "
                "which would run without the offsets); disable the refiner")
    return None


class A1111Session:
    """NPO on A1111's own batched forward for one batch of one generation (`process_batch` to
    `postprocess_batch`).

    `CFGDenoiser.forward` calls `on_cfg_denoiser` (-> `step`) with `x_in` = [cond rows..., uncond
    rows], then runs the UNet on `x_in` whole or in consecutive slices; a forward pre-hook on the
    UNet gives each call its rows (`A1111RowCursor`) and refuses a call the layout does not
    explain. The session belongs to the processing object `owner` that started it: a CFG step of
    another generation closes it (a generation whose sampling raised never reaches
    `postprocess_batch`) instead of applying stale offsets. With `verify` (NPO_SUITE_VERIFY) a
    forward hook re-runs each checked call with the offsets merged into the weights (VerifyLog).
    """

    def __init__(self, unet: nn.Module, plan: NPOPlan, owner, verify: VerifyLog | None = None):
        self.runtime = NPORuntime(unet, plan)
        self.cursor = A1111RowCursor()
        self.owner, self.verify = owner, verify
        self.sigma = math.inf
        self.closed = False
        self._rows: list[bool] | None = None
        self._reference = False  # inside a verify re-run: no offsets, cursor untouched
        self.runtime.hold()
        self._handles = [unet.register_forward_pre_hook(self._pre),
                         unet.register_forward_hook(self._post, with_kwargs=True)]

    def step(self, owner, n_rows: int, n_uncond: int, sigma: float) -> bool:
        """A CFG step of `owner` begins (`on_cfg_denoiser`). False, and the session closed, when
        `owner` is not the generation that started it."""
        if owner is not self.owner:
            self.close()
            return False
        self.sigma = float(sigma)
        self.cursor.reset(n_rows, n_uncond)
        return True

    def _pre(self, module, args):
        n = int(args[0].shape[0])  # x: [n, C, H, W]
        if self._reference:
            self.runtime.set_rows(None, self.sigma, n)
            return
        state = self.cursor.state()
        rows = self.cursor.take(n)
        if rows is None:
            raise RuntimeError(f"NPO: a UNet call of {n} rows that A1111's CFG step does not explain ({state}); "
                               "refusing to guess which rows are unconditional")
        self._rows = rows
        self.runtime.set_rows(rows, self.sigma, n)

    def _post(self, module, args, kwargs, out):
        if self.verify is None or self._reference:
            return

        def forward():
            self._reference = True
            try:
                return module(*args, **kwargs)
            finally:
                self._reference = False

        self.verify.check(self.runtime.unet, self.runtime.plan, self._rows, self.sigma, forward, out)

    def close(self) -> None:
        if not self.closed:
            for h in self._handles:
                h.remove()
            self.runtime.release()
            self.closed = True
