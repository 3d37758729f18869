"""Merging offsets into a module's weights: W' = W + sum_i scale_i * delta_i."""
from __future__ import annotations

import contextlib
import copy
from collections.abc import Mapping

import torch

from .schema import _MAX_LISTED, Term
from .types import DenseDelta, Offset, _shape_fits, delta_shape


# Merging
# ----------------------------------------------------------------------------------------------
def component_module(module, component: str) -> torch.nn.Module:
    if isinstance(module, torch.nn.Module):
        return module
    attr = {"unet": "unet", "te1": "text_encoder", "te2": "text_encoder_2"}.get(component, component)
    mod = getattr(module, attr, None)
    if not isinstance(mod, torch.nn.Module):
        raise ValueError(f"{type(module).__name__} has no {component} module")
    return mod


def module_for_path(root: torch.nn.Module, path: str) -> torch.nn.Module:
    """The module whose `.weight` an offset key `path` patches (sees through PEFT `base_layer`
    and the transformers-5 CLIPTextModel without `text_model.`). Raises AttributeError."""
    return _weight_owner(root, path)


def _weight_owner(root: torch.nn.Module, path: str) -> torch.nn.Module:
    try:
        mod = root.get_submodule(path)
    except AttributeError:
        if not path.startswith("text_model."):
            raise
        mod = root.get_submodule(path[len("text_model."):])  # transformers 5 CLIPTextModel
    base = getattr(mod, "base_layer", None)  # PEFT-wrapped layer: patch the wrapped weight
    return base if isinstance(base, torch.nn.Module) else mod


def _component_deltas(offset, component: str) -> dict:
    """The path -> Delta mapping of `offset` for `component`: an Offset's part, or a bare mapping as it is
    (the deltas of the component being merged, as `core.branch_lora.component_deltas` reads one)."""
    if isinstance(offset, Offset):
        return offset.components().get(component, {})
    if isinstance(offset, Mapping):
        return dict(offset)
    raise TypeError(f"expected an Offset or a dict of module path -> Delta, got {type(offset).__name__}")


def _summed_deltas(root: torch.nn.Module, terms: list[Term], component: str):
    """{path: (weight delta, bias delta or None)} in float32, validated against `root` first."""
    acc: dict[str, list] = {}
    problems = []
    for offset, scale in terms:
        deltas = _component_deltas(offset, component)
        for path, d in deltas.items():
            try:
                owner = _weight_owner(root, path)
            except AttributeError:
                problems.append(f"{path}: no such module")
                continue
            w = owner._parameters.get("weight")
            if w is None or not _shape_fits(delta_shape(d), tuple(w.shape)):
                problems.append(f"{path}: delta {delta_shape(d)} vs weight {None if w is None else tuple(w.shape)}")
                continue
            if scale == 0:
                continue
            dw = (float(scale) * d.dense(torch.float32)).to(w.device).reshape(w.shape)
            db = None
            if isinstance(d, DenseDelta) and d.bias is not None:
                if owner._parameters.get("bias") is None:
                    problems.append(f"{path}: bias delta but the module has no bias")
                    continue
                db = (float(scale) * d.scale * d.bias.float()).to(w.device)
            slot = acc.setdefault(path, [torch.zeros(w.shape, dtype=torch.float32, device=w.device), None])
            slot[0] += dw
            if db is not None:
                slot[1] = db if slot[1] is None else slot[1] + db
    if problems:
        name = next((o.report.path for o, _ in terms if getattr(o, "report", None) is not None), "offset")
        raise ValueError(f"{name}: {len(problems)} {component} delta(s) do not fit the model: {'; '.join(problems[:_MAX_LISTED])}")
    return acc


def merged_state_dict(module, terms: list[Term], component: str = "unet") -> dict[str, torch.Tensor]:
    """State dict of `module` with W + sum_i scale_i * delta_i (new tensors; `module` untouched)."""
    root = component_module(module, component)
    acc = _summed_deltas(root, terms, component)
    sd = {k: v.detach().clone() for k, v in root.state_dict().items()}
    for path, (dw, db) in acc.items():
        owner = _weight_owner(root, path)
        prefix = _param_prefix(root, owner)
        for pname, dv in (("weight", dw), ("bias", db)):
            if dv is not None:
                k = prefix + pname
                sd[k] = (sd[k].float() + dv).to(sd[k].dtype)
    return sd


def _param_prefix(root, owner) -> str:
    for n, m in root.named_modules():
        if m is owner:
            return n + "." if n else ""
    raise RuntimeError("module not found in root")  # unreachable: owner comes from root


@contextlib.contextmanager
def applied(module, terms: list[Term], component: str = "unet"):
    """Add sum_i scale_i * delta_i to the weights in place; restore the exact originals on exit.

    Validates every delta before touching any weight (nothing half-applied); the sum is formed in
    float32 and cast once to the weight's dtype.
    """
    root = component_module(module, component)
    acc = _summed_deltas(root, terms, component)
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []
    try:
        with torch.no_grad():
            for path, (dw, db) in acc.items():
                owner = _weight_owner(root, path)
                for pname, dv in (("weight", dw), ("bias", db)):
                    if dv is None:
                        continue
                    p = owner._parameters[pname]
                    saved.append((p, p.detach().clone()))
                    p.copy_((p.float() + dv).to(p.dtype))
        yield root
    finally:
        with torch.no_grad():
            for p, orig in reversed(saved):
                p.copy_(orig)


def materialize(module, terms: list[Term], component: str = "unet") -> torch.nn.Module:
    """A deep copy of the component with the offsets merged into its weights."""
    root = copy.deepcopy(component_module(module, component))
    acc = _summed_deltas(root, terms, component)
    with torch.no_grad():
        for path, (dw, db) in acc.items():
            owner = _weight_owner(root, path)
            for pname, dv in (("weight", dw), ("bias", db)):
                if dv is not None:
                    p = owner._parameters[pname]
                    p.copy_((p.float() + dv).to(p.dtype))
    return root


# ----------------------------------------------------------------------------------------------
