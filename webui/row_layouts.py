"""Which rows of each WebUI's batched CFG forward are unconditional (the only WebUI-specific part
of NPO on a WebUI; METHODS.md "NPO guidance at sampling time").

  * Forge: cond and uncond are batched in its ComfyUI-style backend
    (backend/sampling/sampling_function.py), which calls `model_function_wrapper` with
    `cond_or_uncond` (one entry per equal-size chunk, 0 = cond, 1 = uncond): `forge_uncond_flags`.
  * A1111: `CFGDenoiser.forward` concatenates `[cond rows (AND-prompts repeated)..., uncond rows]`
    (uncond LAST, `batch_size` rows) before `on_cfg_denoiser`, then runs the UNet on that tensor
    whole or in consecutive slices, always in order; a skipped uncond (s_min_uncond,
    skip_early_cond) just never reaches the UNet. `A1111RowCursor` hands each UNet call its rows.
"""
from __future__ import annotations

from collections.abc import Sequence

from ..core.npo import UNCOND, chunk_kinds


def forge_uncond_flags(cond_or_uncond: Sequence[int], batch: int) -> list[bool]:
    """Forge (ComfyUI-style backend): one flag per row of the batched forward, True = unconditional.

    `cond_or_uncond` has one entry per chunk; `sampling_function` concatenates equal-size chunks
    and splits the output with `.chunk(len(cond_or_uncond))`.
    """
    return [k == UNCOND for k in chunk_kinds(cond_or_uncond, batch)]


def a1111_uncond_flags(n_rows: int, n_uncond: int) -> list[bool]:
    """A1111 `CFGDenoiser`: `x_in` = cond rows (AND-prompts repeated), then `n_uncond` uncond rows last."""
    if not 0 <= n_uncond <= n_rows:
        raise ValueError(f"NPO: {n_uncond} unconditional rows cannot be the tail of a batch of {n_rows}")
    return [False] * (n_rows - n_uncond) + [True] * n_uncond


class A1111RowCursor:
    """Hands each UNet call of one A1111 CFG step its slice of the step's row layout.

    A1111 runs the UNet on `x_in` whole or in consecutive slices in order (batch_cond_uncond off,
    or cond/uncond of different token lengths), and drops the uncond tail when it skips uncond
    (skip-early-CFG, NGMS); a cursor over the layout covers all of these. `take` answers None for
    a call the layout does not explain (layout exhausted or never set); `A1111Session` refuses it.
    """

    def __init__(self):
        self.layout: list[bool] = []
        self.pos = 0

    def reset(self, n_rows: int, n_uncond: int) -> None:
        self.layout, self.pos = a1111_uncond_flags(n_rows, n_uncond), 0

    def take(self, n: int) -> list[bool] | None:
        """Flags for the next `n` rows, or None when this call is not part of the step's layout."""
        if self.pos + n > len(self.layout):
            self.layout, self.pos = [], 0
            return None
        rows = self.layout[self.pos:self.pos + n]
        self.pos += n
        return rows

    def state(self) -> str:
        return f"{self.pos} of {len(self.layout)} rows taken" if self.layout else "no CFG step in progress"
