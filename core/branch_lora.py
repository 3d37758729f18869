"""Weight offsets applied per batch row: NPO's positive and negative models in ONE forward.

METHODS.md "NPO guidance at sampling time": the conditional rows run `theta + eta` and the
unconditional rows `theta + alpha*eta + beta*delta`. Offsets are additive in weight space and a
Linear/Conv2d is linear in its weight, so for a targeted module with input x (one batch row)

    (W + sum_k s_k dW_k) x = W x + sum_k s_k (dW_k x),    dW_k = scale_k * up_k @ down_k

and the per-row coefficients s_k(row) can differ between rows of the same batch. `branch_offsets`
adds `sum_k s_k(row) * up_k (down_k x)` to the output of every targeted module with a forward hook:
no weight is patched and no second copy of the network exists.

Efficiency: per module, all low-rank deltas of the same kind are concatenated once (in
`__enter__`, already in the module's dtype and device) into `down_cat [R, in]`, `up_cat [out, R]`
with `R = sum of ranks`, and the groups into a coefficient matrix `coef [G, R]`. The per-row scale
`S = onehot(rows) @ coef` ([B, R]) is computed once per row assignment (`set_rows`), with the runs
of equal non-zero rows of S. A Linear forward then costs, per run (NPO's [cond | uncond] batch: one
or two), ONE `x[run] @ down_cat^T` and ONE in-place `out[run] += (h * S_run) @ up_cat^T`, whatever
the number of offsets and groups (so `eta` shared by both groups is computed once); rows without
offset cost nothing. (Under autograd, for convs, or with more than `MAX_SEGMENTS` runs, the same
product runs over all rows with S per row.) DenseDelta (full-weight diffs) costs one dense matmul
per delta and module with a per-row coefficient.

Requirement: every targeted module must see the batch as its leading dimension with the same
size B as the UNet input. This holds for diffusers' UNet2DConditionModel (attention projections
see [B, L, C], ResNet convs [B, C, H, W], time/added embeddings [B, C]) and CLIP text encoders;
the hook checks it on every call and raises a clear error otherwise.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator, Mapping, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from .offsets.types import DenseDelta, LowRankDelta, Offset

Delta = Union[LowRankDelta, DenseDelta]
OffsetLike = Union[Offset, Mapping[str, Delta]]
Groups = Mapping[str, Sequence[tuple[OffsetLike, float]]]


def component_deltas(offset: OffsetLike | None, component: str = "unet") -> dict[str, Delta]:
    """The module-path -> Delta mapping of `offset` for `component` ("unet", "te1", "te2")."""
    if offset is None:
        return {}
    if isinstance(offset, Offset):
        return dict(offset.components().get(component, {}))
    if isinstance(offset, Mapping):
        return dict(offset)
    raise TypeError(f"expected an Offset or a dict of module path -> Delta, got {type(offset).__name__}")


def is_linear_like(mod: nn.Module) -> bool:
    """nn.Linear, or a layer that computes F.linear(x, weight, bias) without subclassing it
    (Forge's `ForgeOperations.Linear`, ComfyUI-style ops): a 2-D weight plus in/out_features."""
    w = getattr(mod, "weight", None)
    return isinstance(mod, nn.Linear) or (isinstance(w, torch.Tensor) and w.ndim == 2
                                          and hasattr(mod, "in_features") and hasattr(mod, "out_features"))


def resolve_module(root: nn.Module, path: str) -> nn.Module:
    """The linear-like / nn.Conv2d module at `path` (through a PEFT wrapper's `base_layer` if present)."""
    try:
        mod = root.get_submodule(path)
    except AttributeError:
        raise ValueError(f"offset targets module {path!r}, which does not exist in {type(root).__name__}") from None
    while hasattr(mod, "base_layer"):  # PEFT wrappers expose weight/in_features too: hook the real layer
        mod = mod.base_layer
    if not (isinstance(mod, nn.Conv2d) or is_linear_like(mod)):
        raise ValueError(f"offset targets module {path!r} of type {type(mod).__name__}; only linear layers and nn.Conv2d are supported")
    if isinstance(mod, nn.Conv2d) and mod.groups != 1:
        raise ValueError(f"offset targets grouped conv {path!r} (groups={mod.groups}); not supported")
    return mod


@dataclass
class _LowRankBucket:
    """Concatenated low-rank deltas of one kind on one module."""

    down: torch.Tensor  # Linear: [R, in]; Conv2d: [R, in, kh, kw]
    up_t: torch.Tensor  # [R, out] (the transposed up, ready for addmm)
    coef: torch.Tensor  # [G, R] per-group coefficient of each rank column (weight * delta.scale)


@dataclass
class _TuckerTerm:
    """One LoCon delta with a mid core: 1x1 down [r, in, 1, 1] -> mid [r, r, kh, kw] -> 1x1 up [out, r]."""

    down: torch.Tensor
    mid: torch.Tensor
    up: torch.Tensor  # [out, r]
    coef: torch.Tensor  # [G]


@dataclass
class _DenseTerm:
    weight: torch.Tensor  # like module.weight
    bias: torch.Tensor | None  # [out] or None
    coef: torch.Tensor  # [G] (weight * delta.scale)


@dataclass
class _Plan:
    name: str
    module: nn.Module
    buckets: list[_LowRankBucket] = field(default_factory=list)
    tucker: list[_TuckerTerm] = field(default_factory=list)
    dense: list[_DenseTerm] = field(default_factory=list)


def _check_shapes(path: str, mod: nn.Module, d: Delta) -> None:
    w = mod.weight
    out_f, in_f = w.shape[0], w.shape[1]
    if isinstance(d, DenseDelta):
        ok = d.weight.numel() == w.numel() and d.weight.shape[0] == out_f
        if not ok:
            raise ValueError(f"offset for {path!r}: dense delta shape {tuple(d.weight.shape)} does not match weight {tuple(w.shape)}")
        return
    up_out, d_in = d.up.shape[0], d.down.shape[1]
    if up_out != out_f or d_in != in_f or d.up.shape[1] != d.down.shape[0]:
        raise ValueError(f"offset for {path!r}: LoRA down {tuple(d.down.shape)} / up {tuple(d.up.shape)} "
                         f"do not match weight {tuple(w.shape)}")
    if isinstance(mod, nn.Conv2d):
        k = tuple(mod.kernel_size)
        dk = tuple(d.mid.shape[2:]) if d.mid is not None else (tuple(d.down.shape[2:]) if d.down.ndim == 4 else (1, 1))
        if dk != k:
            raise ValueError(f"offset for {path!r}: LoRA kernel {dk} does not match conv kernel {k}")
    elif d.mid is not None or (d.down.ndim == 4 and tuple(d.down.shape[2:]) != (1, 1)):
        raise ValueError(f"offset for {path!r}: a conv LoRA (kernel > 1x1 or LoCon mid) cannot target nn.Linear")


def _build_plans(root: nn.Module, groups: Groups, component: str) -> list[_Plan]:
    names = list(groups)
    # module path -> delta id -> (delta, per-group coefficient [G] as python floats)
    per_module: dict[str, dict[int, tuple[Delta, list[float]]]] = {}
    for g, name in enumerate(names):
        for entry in groups[name]:
            if not (isinstance(entry, tuple) and len(entry) == 2):
                raise ValueError(f"group {name!r}: each entry must be (offset, weight), got {entry!r:.80}")
            offset, weight = entry
            for path, d in component_deltas(offset, component).items():
                slot = per_module.setdefault(path, {}).setdefault(id(d), (d, [0.0] * len(names)))
                slot[1][g] += float(weight)
    plans = []
    for path, items in per_module.items():
        mod = resolve_module(root, path)
        for d, _ in items.values():
            _check_shapes(path, mod, d)
        plans.append(_plan_for(path, mod, list(items.values())))
    return plans


def _plan_for(path: str, mod: nn.Module, items: list[tuple[Delta, list[float]]]) -> _Plan:
    """The master plan of one module: factors in float32 (float64 for float64 weights) on the deltas'
    own device (CPU for loaded files: no extra accelerator memory); forwards run on a cached copy in
    the output's device/dtype (`BranchOffsets._on`), which IS the master when they already match."""
    w = mod.weight
    dt = torch.float64 if w.dtype == torch.float64 else torch.float32
    first = items[0][0] if items else None
    dev = (first.weight if isinstance(first, DenseDelta) else first.down).device if first is not None else w.device
    is_conv = isinstance(mod, nn.Conv2d)
    plan = _Plan(path, mod)
    downs, ups, coefs = [], [], []
    for d, gw in items:
        if all(c == 0.0 for c in gw):
            continue
        if isinstance(d, DenseDelta):
            weight = d.weight.to(dev, dt).reshape(w.shape)
            bias = None if d.bias is None else d.bias.to(dev, dt).reshape(-1)
            plan.dense.append(_DenseTerm(weight, bias, torch.tensor(gw, dtype=dt, device=dev) * d.scale))
            continue
        up = d.up.to(dev, dt).flatten(1)  # [out, r]
        if d.mid is not None:
            plan.tucker.append(_TuckerTerm(d.down.to(dev, dt).reshape(d.rank, -1, 1, 1), d.mid.to(dev, dt), up,
                                           torch.tensor(gw, dtype=dt, device=dev) * d.scale))
            continue
        down = d.down.to(dev, dt)
        if is_conv:
            down = down.reshape(d.rank, w.shape[1], *mod.kernel_size)  # [r, in, kh, kw]
        else:
            down = down.reshape(d.rank, -1)  # [r, in]
        downs.append(down)
        ups.append(up)
        coefs.append(torch.tensor(gw, dtype=dt, device=dev)[:, None].expand(-1, d.rank) * d.scale)  # [G, r]
    if downs:
        plan.buckets.append(_LowRankBucket(torch.cat(downs), torch.cat(ups, dim=1).t().contiguous(), torch.cat(coefs, dim=1)))
    return plan


class BranchOffsets:
    """Forward hooks adding per-row weight offsets; use through `branch_offsets(...)`.

    `set_rows(rows)` assigns each batch row to a group (by name or index into `groups`; None / -1 =
    no offset). It may be called before every forward (e.g. per step for the sigma interval);
    results are cached per assignment.
    """

    def __init__(self, root: nn.Module, groups: Groups, rows=None, component: str = "unet"):
        self.root = root
        self.group_names = list(groups)
        self._plans = _build_plans(root, groups, component)  # validates everything before any hook exists
        self._handles: list = []
        self._rows: torch.Tensor | None = None
        self._cache: dict[tuple, list] = {}
        self._scales: list | None = None
        self._moved: dict[tuple, _Plan] = {}  # (module index, device, dtype) -> plan on that device/dtype
        self._moved_scales: dict[tuple, dict] = {}  # (rows, module index, device, dtype) -> scales there
        self._native = [_plan_place(p) for p in self._plans]  # (device, dtype) of each master plan
        if rows is not None:
            self.set_rows(rows)

    @property
    def num_modules(self) -> int:
        return len(self._plans)

    def set_rows(self, rows) -> None:
        """rows: a sequence of group names (or None), or an integer tensor/list of group indices (-1 = none), length B."""
        idx = []
        for r in (rows.tolist() if isinstance(rows, torch.Tensor) else list(rows)):
            if r is None:
                idx.append(-1)
            elif isinstance(r, str):
                if r not in self.group_names:
                    raise ValueError(f"unknown offset group {r!r} (groups: {self.group_names})")
                idx.append(self.group_names.index(r))
            else:
                i = int(r)
                if not -1 <= i < len(self.group_names):
                    raise ValueError(f"group index {i} out of range for groups {self.group_names}")
                idx.append(i)
        key = tuple(idx)
        if key not in self._cache:
            if len(self._cache) >= 16:
                self._cache.clear()
            self._cache[key] = [self._row_scales(p, key) for p in self._plans]
        self._rows_key, self._scales = key, self._cache[key]

    def _row_scales(self, plan: _Plan, key: tuple) -> dict:
        """Per-row coefficients for each term of `plan`: onehot(rows) [B, G] @ coef [G, ...]."""
        place = _plan_place(plan)
        dev, dt = place if place is not None else (plan.module.weight.device, torch.float32)
        onehot = torch.zeros(len(key), len(self.group_names), dtype=dt, device=dev)  # [B, G]
        for b, g in enumerate(key):
            if g >= 0:
                onehot[b, g] = 1.0

        def scale(coef):
            s = onehot @ coef  # [B, R] or [B]
            return None if not bool(s.abs().sum() > 0) else s

        buckets = [scale(t.coef) for t in plan.buckets]
        return {"buckets": buckets, "tucker": [scale(t.coef) for t in plan.tucker],
                "dense": [scale(t.coef) for t in plan.dense],
                "segments": [None if s is None else _segments(s) for s in buckets]}

    def _hook(self, i: int):
        plan = self._plans[i]

        def hook(mod, inputs, out):
            if self._scales is None:
                raise RuntimeError("branch_offsets: call set_rows(...) before the forward")
            x = inputs[0]
            scales = self._scales[i]
            n = len(self._rows_key)
            if x.shape[0] != n or out.shape[0] != n:
                raise RuntimeError(f"branch_offsets: module {plan.name!r} saw a batch of {x.shape[0]} rows but "
                                   f"set_rows assigned {n}; per-row offsets need the batch as the leading dim of every targeted module")
            native = self._native[i]
            if native is None or (out.dtype == native[1] and out.device == native[0]):
                return _apply(plan, scales, x, out)  # the common case: no lookup on the hot path
            # compute in the output's device and dtype (weights may be offloaded, or cast per forward by
            # ComfyUI/Forge "manual cast" layers), with the factors moved there once and cached
            key = (self._rows_key, i, out.device, out.dtype)
            moved = self._moved_scales.get(key)
            if moved is None:
                moved = {k: [None if v is None else _to(v, out.device, out.dtype) for v in vs] for k, vs in scales.items()}
                if len(self._moved_scales) >= 64 * max(1, len(self._plans)):
                    self._moved_scales.clear()
                self._moved_scales[key] = moved
            return _apply(self._on(i, out.device, out.dtype), moved, x, out)

        return hook

    def _on(self, i: int, device: torch.device, dtype: torch.dtype) -> _Plan:
        """Plan `i` with every factor on `device` / `dtype` (cached)."""
        plan = self._plans[i]
        if self._native[i] is None or self._native[i] == (device, dtype):
            return plan
        key = (i, device, dtype)
        if key not in self._moved:

            def mv(t):
                return None if t is None else t.to(device, dtype)

            self._moved[key] = _Plan(plan.name, plan.module,
                                     [_LowRankBucket(mv(b.down), mv(b.up_t), mv(b.coef)) for b in plan.buckets],
                                     [_TuckerTerm(mv(t.down), mv(t.mid), mv(t.up), mv(t.coef)) for t in plan.tucker],
                                     [_DenseTerm(mv(d.weight), mv(d.bias), mv(d.coef)) for d in plan.dense])
        return self._moved[key]

    def __enter__(self) -> "BranchOffsets":
        try:
            for i, p in enumerate(self._plans):
                self._handles.append(p.module.register_forward_hook(self._hook(i)))
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __exit__(self, *exc) -> None:
        self.close()


def _plan_place(plan: _Plan) -> tuple[torch.device, torch.dtype] | None:
    """(device, dtype) of a plan's factors; None for a plan with no terms."""
    ref = next((t.coef for t in (*plan.buckets, *plan.tucker, *plan.dense)), None)
    return None if ref is None else (ref.device, ref.dtype)


# At most this many runs of equal rows take the per-run path of `_apply` (NPO's batch is [cond | uncond]:
# two runs, one of them often without offset); a batch that alternates more takes the all-rows path.
MAX_SEGMENTS = 4


def _segments(s: torch.Tensor) -> list[tuple[int, int, torch.Tensor | None]] | None:
    """The batch rows of a per-row scale s [B, R] as runs of equal rows with a non-zero scale:
    [(start, stop, scale [R], or None when every entry is 1)], or None when there are more than
    MAX_SEGMENTS runs. Rows without offset (scale 0) belong to no run."""
    runs: list[tuple[int, int, torch.Tensor | None]] = []
    b, start = s.shape[0], 0
    for i in range(1, b + 1):
        if i < b and torch.equal(s[i], s[start]):
            continue
        row = s[start]
        if bool(row.abs().sum() > 0):
            runs.append((start, i, None if bool((row == 1).all()) else row.clone()))
        start = i
    return runs if len(runs) <= MAX_SEGMENTS else None


def _to(v, device, dtype):
    """A scale tensor, or a run list of `_segments`, on device/dtype."""
    if isinstance(v, list):
        return [(a, b, None if r is None else r.to(device, dtype)) for a, b, r in v]
    return v.to(device, dtype)


def _apply(plan: _Plan, scales: dict, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out + sum over terms of the per-row scaled delta output (in place when autograd allows).

    Linear low-rank terms in place run per run of equal rows (`_segments`): rows without offset cost
    nothing (NPO's conditional rows when η is absent), and a run's scale is one [R] vector, not a
    [B, R] product, so the work is the low-rank arithmetic of the rows that have an offset."""
    mod = plan.module
    inplace = not (torch.is_grad_enabled() and (out.requires_grad or x.requires_grad)) and out.is_contiguous()
    conv = isinstance(mod, nn.Conv2d)
    x = x.to(out.dtype)  # the factors are in the output's dtype (see BranchOffsets._on)
    for t, s, runs in zip(plan.buckets, scales["buckets"], scales["segments"]):
        if s is None:
            continue
        if inplace and not conv and runs is not None:
            for a, b, r in runs:
                h = F.linear(x[a:b], t.down)  # [n, ..., R]
                if r is not None:
                    h.mul_(r)
                out[a:b].view(-1, out.shape[-1]).addmm_(h.reshape(-1, h.shape[-1]), t.up_t)
            continue
        if conv:
            h = F.conv2d(x, t.down, None, mod.stride, mod.padding, mod.dilation)  # [B, R, H, W]
            h = h * s[:, :, None, None]
            out = _add_conv1x1(out, h, t.up_t, inplace)
        else:
            h = F.linear(x, t.down)  # [B, ..., R]
            h = h * s.reshape(s.shape[0], *([1] * (h.ndim - 2)), s.shape[1])
            if inplace:
                out.view(-1, out.shape[-1]).addmm_(h.reshape(-1, h.shape[-1]), t.up_t)
            else:
                out = out + h @ t.up_t
    for t, s in zip(plan.tucker, scales["tucker"]):
        if s is None:
            continue
        h = F.conv2d(x, t.down)  # [B, r, H, W]
        h = F.conv2d(h, t.mid, None, mod.stride, mod.padding, mod.dilation)  # [B, r, H', W']
        out = _add_conv1x1(out, h * s[:, None, None, None], t.up.t(), inplace)
    for t, s in zip(plan.dense, scales["dense"]):
        if s is None:
            continue
        y = F.conv2d(x, t.weight, t.bias, mod.stride, mod.padding, mod.dilation) if conv else F.linear(x, t.weight, t.bias)
        y = y * s.reshape(-1, *([1] * (y.ndim - 1)))
        out = out.add_(y) if inplace else out + y
    return out


def _add_conv1x1(out: torch.Tensor, h: torch.Tensor, up_t: torch.Tensor, inplace: bool) -> torch.Tensor:
    """out [B, O, H, W] += 1x1 conv of h [B, R, H, W] with up = up_t^T [O, R]."""
    b, r = h.shape[:2]
    up = up_t.t().unsqueeze(0).expand(b, -1, -1)  # [B, O, R]
    if inplace:
        out.view(b, out.shape[1], -1).baddbmm_(up, h.reshape(b, r, -1))
        return out
    return out + torch.bmm(up, h.reshape(b, r, -1)).reshape(out.shape)


@contextlib.contextmanager
def branch_offsets(module: nn.Module, groups: Groups, rows=None, component: str = "unet") -> Iterator[BranchOffsets]:
    """Context manager: per-row offsets on `module` (the fast NPO path, METHODS.md "NPO guidance").

    groups: name -> [(offset, weight), ...], e.g. {"pos": [(eta, 1.0)], "neg": [(eta, alpha), (delta, beta)]};
    offset is an `Offset` (its `component` part is used) or a dict module path -> Delta.
    rows: optional initial row assignment (see `BranchOffsets.set_rows`).

        with branch_offsets(unet, groups) as br:
            br.set_rows(["pos"] * B + ["neg"] * B)
            out = unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([c, c_neg])).sample
    """
    br = BranchOffsets(module, groups, rows, component)
    with br:
        yield br


def _sample(out):
    return out.sample if hasattr(out, "sample") else (out[0] if isinstance(out, tuple) else out)


def two_model_eps(model_pos, model_neg, x_t: torch.Tensor, t, pos_kwargs: dict, neg_kwargs: dict):
    """The general NPO path: any second network as the negative model, two forwards.

    Returns (pred_pos, pred_neg), each [B, C, H, W] in the models' own prediction space.
    """
    return _sample(model_pos(x_t, t, **pos_kwargs)), _sample(model_neg(x_t, t, **neg_kwargs))
