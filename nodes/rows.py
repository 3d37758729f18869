"""Per-row offset bookkeeping for ComfyUI's batched forward: plain torch, no ComfyUI import.

ComfyUI's `calc_cond_batch` concatenates the conditionings it can batch into one forward and
passes `cond_or_uncond` (one entry per chunk: 0 = positive, 1 = negative for a CFG run) to the
`model_function_wrapper`; the output is `.chunk(len(cond_or_uncond))`, so every chunk holds the
same number of rows. NPO (seed 001 §3.2, METHODS.md "NPO guidance at sampling time") gives the
positive rows `θ+η` and the negative rows `θ+α·η+β·δ`; since offsets are additive in weight
space, each becomes a sum of per-row low-rank terms added to a module's output:
    y_rows += weight · (x_rows ⊛ ΔW)      (⊛ = the module's own linear / conv op)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core.branch_lora import BranchOffsets
from ..core.guidance import offset_active
from ..core.offsets.types import DenseDelta, LowRankDelta, Offset

Delta = LowRankDelta | DenseDelta

COND, UNCOND = 0, 1  # indices in ComfyUI's conds list [positive, negative]


def row_groups(cond_or_uncond: list[int], batch: int) -> torch.Tensor:
    """Group id of every row of a batched forward: `[batch]` long tensor.

    Raises ValueError when the batch does not split into equal chunks (ComfyUI always does).
    """
    n = len(cond_or_uncond)
    if n == 0 or batch % n:
        raise ValueError(f"batch of {batch} rows does not split into {n} equal chunks {cond_or_uncond}")
    per = batch // n
    return torch.tensor(cond_or_uncond, dtype=torch.long).repeat_interleave(per)  # [batch]


def rows_of(groups: torch.Tensor, group: int) -> torch.Tensor:
    """Row indices belonging to `group` (may be empty)."""
    return torch.nonzero(groups == group, as_tuple=False).flatten()


def npo_groups(eta: dict[str, Delta] | None, delta: dict[str, Delta] | None, alpha: float, beta: float) -> dict:
    """`core.branch_lora` groups for NPO: "pos" rows run θ+η, "neg" rows θ+α·η+β·δ (module-path keyed)."""
    neg = ([(eta, float(alpha))] if eta and alpha != 0.0 else []) + ([(delta, float(beta))] if delta and beta != 0.0 else [])
    return {"pos": [(eta, 1.0)] if eta else [], "neg": neg}


@dataclass(frozen=True)
class NPOSpec:
    """What the branch wrapper applies; offsets act only for sigma_min <= sigma <= sigma_max (None = unbounded)."""

    eta: Offset | None = None
    delta: Offset | None = None
    alpha: float = 0.0
    beta: float = 1.0
    sigma_min: float | None = None
    sigma_max: float | None = None


class NPOBranchWrapper:
    """`model_function_wrapper`: positive rows get η, negative rows get α·η + β·δ.

    The per-row math is `core.branch_lora` (one batched forward, hooks that follow the input's
    device and dtype, so offloaded / manually cast ComfyUI layers work). Holds no per-run state
    that matters across prompts (ComfyUI reuses cached MODEL/GUIDER objects): the row assignment is
    set on every call and the hooks exist only for the duration of one forward. An earlier wrapper
    on the model is chained (it runs inside ours, so our hooks are active during its forward).
    """

    def __init__(self, eta: dict[str, Delta] | None, delta: dict[str, Delta] | None, spec: NPOSpec, previous=None):
        self.groups = npo_groups(eta, delta, spec.alpha, spec.beta)
        self.spec = spec
        self.previous = previous
        self._branch: tuple[torch.nn.Module, BranchOffsets] | None = None  # cache of the built hooks' plan

    def __deepcopy__(self, memo):  # ModelPatcher.clone deep-copies model_options: share, don't copy tensors
        return self

    def branch(self, diffusion_model: torch.nn.Module) -> BranchOffsets:
        if self._branch is None or self._branch[0] is not diffusion_model:
            self._branch = (diffusion_model, BranchOffsets(diffusion_model, self.groups))
        return self._branch[1]

    def __call__(self, apply_model, args: dict) -> torch.Tensor:
        x = args["input"]  # [n_chunks * B, C, H, W]
        groups = row_groups(list(args["cond_or_uncond"]), x.shape[0])  # [n_chunks * B]
        sigma = float(args["timestep"].flatten()[0])
        inside = offset_active(sigma, self.spec.sigma_min, self.spec.sigma_max)
        # inside the sigma range: NPO; outside: every row runs θ+η (plain CFG of the positive model)
        rows = ["neg" if (g == UNCOND and inside) else ("pos" if g in (COND, UNCOND) else None) for g in groups.tolist()]
        br = self.branch(apply_model.__self__.diffusion_model)
        br.set_rows(rows)
        with br:
            if self.previous is not None:
                return self.previous(apply_model, args)
            return apply_model(x, args["timestep"], **args["c"])
