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

import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..core.guidance import offset_active
from ..core.offset_types import DenseDelta, LowRankDelta, Offset

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


@dataclass
class Term:
    """One additive weight offset `weight · ΔW` applied to the rows of one group."""

    delta: Delta
    weight: float
    group: int


@dataclass
class ModuleTerms:
    """All terms for one torch module, with per-(device, dtype) casts of the factors."""

    terms: list[Term] = field(default_factory=list)
    _cache: dict = field(default_factory=dict, repr=False)

    def factors(self, term_index: int, device: torch.device, dtype: torch.dtype) -> tuple:
        key = (term_index, device, dtype)
        if key not in self._cache:
            d = self.terms[term_index].delta
            if isinstance(d, LowRankDelta) and d.mid is None:
                self._cache[key] = ("lr", d.down.to(device, dtype), d.up.to(device, dtype), float(d.scale))
            else:  # dense (+ its bias), or LoCon with a Tucker core: materialise once per device/dtype
                bias = getattr(d, "bias", None)
                bias = None if bias is None else (d.scale * bias.float()).to(device, dtype)
                self._cache[key] = ("dense", d.dense(torch.float32).to(device, dtype), bias, 1.0)
        return self._cache[key]


def delta_output(module: torch.nn.Module, x: torch.Tensor, kind: str, a: torch.Tensor, b, scale: float) -> torch.Tensor:
    """`x ⊛ ΔW` for a Linear or Conv2d module; ΔW = scale·b@a (low rank) or a with bias b (dense)."""
    if isinstance(module, torch.nn.Conv2d):
        conv = dict(stride=module.stride, padding=module.padding, dilation=module.dilation)
        if kind == "dense":
            w = a if a.ndim == 4 else a.reshape(a.shape[0], a.shape[1], 1, 1)
            return F.conv2d(x, w, b, **conv)
        down = a if a.ndim == 4 else a.reshape(a.shape[0], a.shape[1], 1, 1)  # [r, in, kh, kw]
        up = b if b.ndim == 4 else b.reshape(b.shape[0], b.shape[1], 1, 1)  # [out, r, 1, 1]
        return scale * F.conv2d(F.conv2d(x, down, **conv), up)
    if kind == "dense":
        return F.linear(x, a.flatten(1), b)
    return scale * F.linear(F.linear(x, a.flatten(1)), b.flatten(1))  # [..., r] -> [..., out]


def apply_terms(module: torch.nn.Module, x: torch.Tensor, out: torch.Tensor, mt: ModuleTerms,
                groups: torch.Tensor) -> torch.Tensor:
    """Add every term of `mt` to the rows of its group: out-of-place, returns the new output."""
    for i, term in enumerate(mt.terms):
        if term.weight == 0.0:
            continue
        rows = rows_of(groups, term.group).to(x.device)
        if rows.numel() == 0:
            continue
        kind, a, b, scale = mt.factors(i, x.device, x.dtype)
        d = delta_output(module, x.index_select(0, rows), kind, a, b, scale)  # [rows, ...]
        out = out.index_add(0, rows, d.to(out.dtype), alpha=term.weight)
    return out


def build_terms(eta: dict[str, Delta] | None, delta: dict[str, Delta] | None, alpha: float, beta: float
                ) -> dict[str, ModuleTerms]:
    """NPO row terms per module path: cond rows get η, uncond rows get α·η + β·δ."""
    terms: dict[str, ModuleTerms] = {}
    for name, d in (eta or {}).items():
        terms.setdefault(name, ModuleTerms()).terms.append(Term(d, 1.0, COND))
        if alpha != 0.0:
            terms[name].terms.append(Term(d, float(alpha), UNCOND))
    if beta != 0.0:
        for name, d in (delta or {}).items():
            terms.setdefault(name, ModuleTerms()).terms.append(Term(d, float(beta), UNCOND))
    return terms


def safe_relative_name(name: str) -> str:
    """Validate a user-supplied file name relative to a ComfyUI model folder.

    Rejects absolute paths, drive letters, `..` components and empty names: nodes never read or
    write outside ComfyUI's own folders.
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError("empty file name")
    norm = name.replace("\\", "/")
    if norm.startswith("/") or os.path.isabs(name) or (len(norm) > 1 and norm[1] == ":"):
        raise ValueError(f"{name!r}: absolute paths are not allowed, give a name inside the models folder")
    if any(part == ".." for part in norm.split("/")):
        raise ValueError(f"{name!r}: '..' is not allowed in a model file name")
    return norm


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

    Holds no per-run state (ComfyUI reuses cached MODEL/GUIDER objects across prompts): hooks are
    registered for the duration of one forward and removed in `finally`. An earlier wrapper on
    the model is chained (it runs inside ours, so our hooks are active during its forward).
    """

    def __init__(self, terms: dict[str, ModuleTerms], outside: dict[str, ModuleTerms], spec: NPOSpec,
                 previous=None):
        self.terms = terms  # inside the sigma range: NPO
        self.outside = outside  # outside it: every row runs θ+η (plain CFG of the positive model)
        self.spec = spec
        self.previous = previous

    def __deepcopy__(self, memo):  # ModelPatcher.clone deep-copies model_options: share, don't copy tensors
        return self

    def __call__(self, apply_model, args: dict) -> torch.Tensor:
        x = args["input"]  # [n_chunks * B, C, H, W]
        groups = row_groups(list(args["cond_or_uncond"]), x.shape[0])  # [n_chunks * B]
        sigma = float(args["timestep"].flatten()[0])
        terms = self.terms if offset_active(sigma, self.spec.sigma_min, self.spec.sigma_max) else self.outside
        handles = []
        try:
            if terms:
                handles = self._install(apply_model.__self__.diffusion_model, terms, groups)
            if self.previous is not None:
                return self.previous(apply_model, args)
            return apply_model(x, args["timestep"], **args["c"])
        finally:
            for h in handles:
                h.remove()

    @staticmethod
    def _install(diffusion_model: torch.nn.Module, terms: dict[str, ModuleTerms], groups: torch.Tensor) -> list:
        present = set(groups.tolist())
        handles = []
        for name, mt in terms.items():
            if not any(t.group in present and t.weight != 0.0 for t in mt.terms):
                continue
            module = diffusion_model.get_submodule(name)

            def hook(mod, inputs, output, mt=mt):
                return apply_terms(mod, inputs[0], output, mt, groups.to(output.device))

            handles.append(module.register_forward_hook(hook))
        return handles
