"""The ComfyUI branch wrapper: per-row NPO offsets on ComfyUI's batched forward (plain torch, no ComfyUI import).

ComfyUI's `calc_cond_batch` concatenates the conditionings it can batch into one forward and
passes `cond_or_uncond` (one entry per chunk: 0 = positive, 1 = negative for a CFG run) to the
`model_function_wrapper`; the output is `.chunk(len(cond_or_uncond))`, so every chunk holds the
same number of rows. NPO (seed 001 §3.2, METHODS.md "NPO guidance at sampling time") gives the
positive rows `θ+η` and the negative rows `θ+α·η+β·δ`; since offsets are additive in weight
space, each becomes a sum of per-row low-rank terms added to a module's output:
    y_rows += weight · (x_rows ⊛ ΔW)      (⊛ = the module's own linear / conv op)
The composition (groups, α default, row chunks) is `core.npo`'s; this module only wires it to
ComfyUI's `model_function_wrapper`.
"""
from __future__ import annotations

import torch

from ...core.branch_lora import BranchOffsets
from ...core.npo import NPOSpec, chunk_kinds, npo_groups, row_groups
from ...core.offsets.types import DenseDelta, LowRankDelta

Delta = LowRankDelta | DenseDelta


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
        kinds = chunk_kinds(list(args["cond_or_uncond"]), x.shape[0])  # [n_chunks * B]
        # inside the sigma range: NPO; outside: every row runs θ+η (plain CFG of the positive model)
        rows = row_groups(kinds, "npo", self.spec.active(float(args["timestep"].flatten()[0])))
        br = self.branch(apply_model.__self__.diffusion_model)
        br.set_rows(rows)
        with br:
            if self.previous is not None:
                return self.previous(apply_model, args)
            return apply_model(x, args["timestep"], **args["c"])
