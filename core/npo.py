"""NPO composition: which weights every row of a guided forward runs (METHODS.md "NPO guidance at sampling time").

The one home of the idea for every front door (`generate`, the ComfyUI nodes, the Forge/A1111
panel, the trainer's validation). Plain torch, no host import.

Groups (the offsets of one row, as `core.branch_lora` groups of `(offset, weight)` terms):
    pos   θ + η                     the conditional rows (seed 001 eq. 9, θ_pos)
    neg   θ + α·η + β·δ             the unconditional rows of NPO (seed 001 eq. 10, θ_neg)
    snpo  θ + η + β·s               both rows of SNPO: ONE model, unconditional input ∅
                                    (seed 000 §4.3, METHODS.md "Diff-SNPO"); s the SNPO LoRA
A term of weight 0 adds nothing and is left out. Code names -> paper symbols: eta η (positive
offset), delta δ (negative offset), snpo s, alpha α, beta β.

Rows. A batched CFG forward holds equal chunks of rows, one kind per chunk (ComfyUI / Forge
`cond_or_uncond`: 0 = conditional, 1 = unconditional); `chunk_kinds` expands them to rows and
`row_groups` names each row's group for a guidance mode of `core.guidance.MODES`.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .guidance import MODES, ROLE_SAMPLING, offset_active
from .offsets.types import Delta, Offset, delta_fits

# α: the weight of the positive offset η inside the negative model θ + α·η + β·δ.
# Decision: α = 1. Seed 001 §3.2 finds it "typically necessary to incorporate the positive weight
# offset into the negative weights" (eq. 10; its motivating model eq. 5 is θ + η + δ, i.e.
# α = β = 1), reports α = 1.0 first in Tables 1-2, and the authors' inference code
# (G-U-N/Diffusion-NPO gen.py: `mix_models(base, tuned, merge_weight=0.0)` "to use full dpo
# weight", SPO+NPO `set_adapters([bad, spo], [1.0, 1.0])`) uses α = 1 by default. Without η
# (the common case of a negative offset alone) α has no effect. Self-NPO users set α = 0.
ALPHA_DEFAULT = 1.0
BETA_DEFAULT = 1.0  # β: the weight of δ (NPO) or of the SNPO LoRA s (SNPO)

COND, UNCOND = 0, 1  # chunk kinds of a batched CFG forward (ComfyUI's conds list [positive, negative])

OffsetLike = Offset | Mapping[str, Delta]


def _present(o: OffsetLike | None) -> bool:
    return o is not None and not (isinstance(o, Mapping) and len(o) == 0)


def _terms(*weighted: tuple[OffsetLike | None, float]) -> list[tuple[OffsetLike, float]]:
    """The (offset, weight) terms that add something: present offsets of nonzero weight."""
    return [(o, float(w)) for o, w in weighted if _present(o) and w != 0.0]


def npo_groups(eta: OffsetLike | None, delta: OffsetLike | None, alpha: float = ALPHA_DEFAULT,
               beta: float = BETA_DEFAULT) -> dict[str, list]:
    """NPO groups (seed 001 eq. 9-10): "pos" = θ+η, "neg" = θ+α·η+β·δ."""
    return {"pos": _terms((eta, 1.0)), "neg": _terms((eta, alpha), (delta, beta))}


def snpo_group(eta: OffsetLike | None, snpo: OffsetLike | None, beta: float = BETA_DEFAULT) -> list:
    """The one SNPO model θ + η + β·s of both branches (seed 000 §4.3)."""
    return _terms((eta, 1.0), (snpo, beta))


def sigma_bound(v: float | None) -> float | None:
    """A UI's sigma bound: values <= 0 (or None) mean unbounded."""
    return float(v) if v is not None and v > 0 else None


@dataclass(frozen=True)
class NPOSpec:
    """The offsets of one sampling run and their weights; offsets act only for
    sigma_min <= sigma <= sigma_max (None = unbounded), plain CFG of θ+η elsewhere."""

    eta: OffsetLike | None = None
    delta: OffsetLike | None = None
    alpha: float = ALPHA_DEFAULT
    beta: float = BETA_DEFAULT
    snpo: OffsetLike | None = None
    sigma_min: float | None = None
    sigma_max: float | None = None

    def groups(self) -> dict[str, list]:
        """All three groups: pos, neg (NPO) and snpo."""
        return {**npo_groups(self.eta, self.delta, self.alpha, self.beta),
                "snpo": snpo_group(self.eta, self.snpo, self.beta)}

    def active(self, sigma: float) -> bool:
        """Whether the offsets act at k-diffusion noise level `sigma` (core.guidance.offset_active)."""
        return offset_active(sigma, self.sigma_min, self.sigma_max)


def role_spec(role: str, lora: OffsetLike, beta: float = BETA_DEFAULT) -> tuple[str, NPOSpec]:
    """(guidance mode, NPOSpec) that sample a LoRA of `role` as `core.guidance.ROLE_SAMPLING` says;
    `beta` is a negative LoRA's strength on the unconditional branch (other roles run at BETA_DEFAULT)."""
    if role not in ROLE_SAMPLING:
        raise ValueError(f"no sampling rule for LoRA role {role!r} (expected one of {sorted(ROLE_SAMPLING)})")
    rs = ROLE_SAMPLING[role]
    if rs.offset == "delta":  # the negative model θ + β·δ: no η in it (α 0)
        return rs.mode, NPOSpec(delta=lora, alpha=0.0, beta=beta)
    return rs.mode, NPOSpec(**{rs.offset: lora})


# ---------------------------------------------------------------------------------------------
# rows of a batched forward
# ---------------------------------------------------------------------------------------------
def chunk_kinds(cond_or_uncond: Sequence[int], batch: int) -> list[int]:
    """The kind of every row of a batch made of equal chunks (one entry of `cond_or_uncond` per chunk).

    Raises ValueError when the batch does not split into equal chunks (ComfyUI and Forge always do).
    """
    n = len(cond_or_uncond)
    if n == 0 or batch % n:
        raise ValueError(f"NPO: a batch of {batch} rows does not split into {n} equal chunks {list(cond_or_uncond)}")
    per = batch // n
    return [int(c) for c in cond_or_uncond for _ in range(per)]


def row_groups(kinds: Sequence[int], mode: str, active: bool = True) -> list[str | None]:
    """The group of every row for guidance `mode` (core.guidance.MODES); rows of another kind get None.

    Outside the sigma range (`active` False) every row runs θ+η: the step is plain CFG.
    """
    spec = MODES[mode]
    cond, uncond = (spec.pos_group, spec.neg_group) if active else ("pos", "pos")
    return [cond if k == COND else uncond if k == UNCOND else None for k in kinds]


# ---------------------------------------------------------------------------------------------
# matching an offset's deltas to a network's modules
# ---------------------------------------------------------------------------------------------
def module_fits(root: nn.Module, path: str | None, d: Delta) -> bool:
    """True when `root` has a module at `path` whose weight the delta fits (size and output dim)."""
    if path is None:
        return False
    try:
        mod = root.get_submodule(path)
    except AttributeError:
        return False
    w = getattr(mod, "weight", None)
    return isinstance(w, torch.Tensor) and delta_fits(d, tuple(w.shape))


def match_deltas(deltas: Mapping[str, Delta], root: nn.Module, candidates: Callable[[str], Iterable[str | None]]
                 ) -> tuple[dict[str, Delta], list[str]]:
    """The deltas re-keyed to the first of `candidates(key)` that fits a module of `root`, and the keys
    that fit none (counted by the caller's report, never dropped silently)."""
    mapped, unmatched = {}, []
    for key, d in deltas.items():
        target = next((c for c in candidates(key) if module_fits(root, c, d)), None)
        if target is None:
            unmatched.append(key)
        else:
            mapped[target] = d
    return mapped, unmatched
