"""Saving offsets: kohya / PEFT / diff state dicts, safetensors metadata, model hashes."""
from __future__ import annotations

import hashlib
import re
from pathlib import Path

import torch

from ..atomic import save_safetensors
from ..finite import first_nonfinite

from .keys import (
    LAYOUTS,
    Target,
    canonical_te_path,
    get_layout,
    strip_peft_name,
    targets_from_base,
)
from .schema import FORMATS, metadata_key, metadata_value, validate_metadata
from .types import Delta, DenseDelta, LowRankDelta, Offset, _shape_fits, delta_shape


# ----------------------------------------------------------------------------------------------
# Saving
# ----------------------------------------------------------------------------------------------
def save_offset(offset: Offset, path, *, format: str = "kohya", metadata: dict | None = None, base=None,
                family: str | None = None) -> Path:
    """Write `offset` atomically as .safetensors in `format`, with string metadata.

    kohya: `lora_unet_*` / `lora_te_*` (SD1.x, diffusers module names) or `lora_unet_*` with LDM
      names + `lora_te1_`/`lora_te2_` (SDXL, kohya sd-scripts' own naming), `.lora_down.weight`,
      `.lora_up.weight`, `.alpha` (+ `.lora_mid.weight` for Tucker). Loaded by ComfyUI, A1111/Forge
      and diffusers `load_lora_weights`.
    peft: diffusers `save_lora_weights` layout (`unet.<path>.lora_A.weight`, `text_encoder.`,
      `text_encoder_2.`), scale folded into lora_B, Tucker folded into lora_A.
    diff: `<kohya name>.diff` (+ `.diff_b`), any offset (low-rank deltas are densified).
    SDXL LDM names depend on the UNet's block layout: pass `base` (model, pipeline or folder) for a
    non-standard SDXL-shaped UNet; without it the standard SDXL layout is used and checked.
    """
    path = Path(path)
    if offset.file_keys:  # keys as a host's key map names them (SD3, Flux, Wan, ...): written as they are
        if not family:
            raise ValueError(f"{path}: an offset keyed by model keys needs family= (the model family it is for)")
        _save_finite(path, file_key_tensors(offset, format), build_metadata(offset, family, path, metadata))
        return path
    tensors = offset_to_state_dict(offset, format=format, base=base, family=family)
    fam = family or _family_of_offset(offset, base)
    meta = build_metadata(offset, fam, path, metadata)
    _save_finite(path, tensors, meta)
    return path


def save_transformer_lora(offset: Offset, path, *, family: str, base_model_version: str,
                          metadata: dict | None = None) -> Path:
    """Write the LoRA of a flow-matching transformer (SD3/SD3.5, Flux) atomically in diffusers' layout:
    `transformer.<module>.lora_A.weight` [r, in] and `.lora_B.weight` [out, r] with the scale alpha/r folded
    into lora_B (no `.alpha` keys: diffusers' SD3 / Flux `load_lora_weights` reads PEFT keys without
    them). ComfyUI's LoRA loaders take the same keys (its key map names `transformer.<diffusers module>`
    for SD3 and Flux). `family`: the model family (written as `npo_family`); `base_model_version`: the kohya
    `ss_base_model_version` ("sd3", "flux1")."""
    path = Path(path)
    if offset.text_encoders:
        raise ValueError("a transformer LoRA holds the transformer's modules only (text-encoder deltas given)")
    if not offset.unet:
        raise ValueError("the offset is empty: nothing to save")
    tensors: dict[str, torch.Tensor] = {}
    for p, d in offset.unet.items():
        if not isinstance(d, LowRankDelta):
            raise ValueError(f"{p}: a dense delta cannot be saved as a LoRA")
        tensors[f"transformer.{p}.lora_A.weight"], tensors[f"transformer.{p}.lora_B.weight"] = _peft_pair(d)
    meta = build_metadata(offset, family, path, metadata, base_model_version=base_model_version)
    _save_finite(path, tensors, meta)
    return path


def build_metadata(offset: Offset, family: str, path: Path, metadata: dict | None, *,
                   base_model_version: str | None = None) -> dict[str, str]:
    """kohya `ss_*` fields + `npo_*` fields (all str; schema.py, docs/offsets.md); the role is validated
    in either spelling (`npo_role`, or `npo_suite.role` carried over from an older file).
    `base_model_version` overrides the family layout's (families without an offset layout)."""
    meta = {k: v for k, v in (offset.metadata or {}).items() if isinstance(v, str)}
    ranks = sorted({d.rank for c in offset.components().values() for d in c.values() if isinstance(d, LowRankDelta)})
    alphas = sorted({d.scale * d.rank for c in offset.components().values() for d in c.values() if isinstance(d, LowRankDelta)})
    version = base_model_version or (get_layout(family).base_model_version if family in LAYOUTS else family)
    meta.update({"ss_network_module": "networks.lora", "ss_base_model_version": version, "ss_output_name": path.stem})
    if family not in LAYOUTS:  # a family without an SD layout (flux, sd3, wan21, ...): name it (schema.py)
        meta.setdefault(metadata_key("family"), family)
    if ranks:
        meta["ss_network_dim"] = str(ranks[-1])
        meta["ss_network_alpha"] = metadata_value(alphas[-1])  # the alpha _common_alpha writes for every module
    for k, v in (metadata or {}).items():
        if v is None:
            continue
        meta[str(k)] = metadata_value(v)
    validate_metadata(meta, str(path))
    return meta


def file_key_tensors(offset: Offset, format: str = "kohya") -> dict[str, torch.Tensor]:
    """Tensors of a file-keyed offset (`Offset.file_keys`): `<key>.lora_down.weight` / `.lora_up.weight` /
    `.alpha` (kohya), or `<key>.diff` (+ `.diff_b`); every key the host's key map resolved stays as it was."""
    if format not in ("kohya", "diff"):
        raise ValueError(f"an offset keyed by model keys is saved as 'kohya' or 'diff', not {format!r}")
    if format == "kohya" and not offset.is_low_rank():
        raise ValueError("dense deltas cannot be saved as a LoRA: use format='diff' or extract_lora() first")
    if offset.text_encoders:
        raise ValueError("an offset keyed by model keys holds no text-encoder part")
    out: dict[str, torch.Tensor] = {}
    for k, d in offset.unet.items():
        if format == "kohya":
            out[f"{k}.lora_down.weight"], out[f"{k}.lora_up.weight"] = d.down, d.up
            if d.mid is not None:
                out[f"{k}.lora_mid.weight"] = d.mid
            out[f"{k}.alpha"] = torch.tensor(float(d.scale * d.rank), dtype=torch.float32)
        else:
            out[f"{k}.diff"] = d.dense(torch.float32).to(_dtype_of(d))
            if isinstance(d, DenseDelta) and d.bias is not None:
                out[f"{k}.diff_b"] = (d.scale * d.bias.float()).to(_dtype_of(d))
    if not out:
        raise ValueError("the offset is empty: nothing to save")
    return out


def _save_finite(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    """Refuse non-finite tensors (ValueError naming the key), then write via core.atomic."""
    if path.suffix.lower() != ".safetensors":
        raise ValueError(f"{path}: offsets are saved as .safetensors (got {path.suffix or 'no suffix'})")
    bad = first_nonfinite(tensors)
    if bad is not None:
        raise ValueError(f"{path}: not written, tensor {bad!r} holds a non-finite value (NaN or inf)")
    save_safetensors(path, {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, meta)


def _family_of_offset(offset: Offset, base) -> str:
    if base is not None:
        t = targets_from_base(base)
        if "unet" in t and t["unet"].family:
            return t["unet"].family
    v = (offset.metadata or {}).get("ss_base_model_version", "")
    if v.startswith("sdxl"):
        return "sdxl"
    if v.startswith("sd_v1"):
        return "sd1"
    if offset.report is not None and offset.report.family:
        return offset.report.family
    if "te2" in offset.text_encoders or any(re.search(r"add_embedding|transformer_blocks\.[1-9]", p) for p in offset.unet):
        return "sdxl"
    return "sd1"


def offset_to_state_dict(offset: Offset, *, format: str = "kohya", base=None, family: str | None = None) -> dict[str, torch.Tensor]:
    """The tensors `save_offset` writes (see there for the formats)."""
    if format not in FORMATS:
        raise ValueError(f"unknown offset format {format!r} (expected one of {FORMATS})")
    if format != "diff" and not offset.is_low_rank():
        dense = [f"{c}:{p}" for c, m in offset.components().items() for p, d in m.items() if isinstance(d, DenseDelta)]
        raise ValueError(f"{len(dense)} dense (full-weight) deltas cannot be saved as a LoRA ({', '.join(dense[:3])}): "
                         "use format='diff' or extract_lora() first")
    fam = family or _family_of_offset(offset, base)
    get_layout(fam)
    if not any(offset.components().values()):
        raise ValueError("the offset is empty: nothing to save")
    out: dict[str, torch.Tensor] = {}
    common_alpha = _common_alpha(offset) if format == "kohya" else None
    for comp, mods in offset.components().items():
        if not mods:
            continue
        names = _kohya_names(comp, mods, fam, base) if format in ("kohya", "diff") else None
        for p, d in mods.items():
            if format == "peft":
                pre = {"unet": "unet.", "te1": "text_encoder.", "te2": "text_encoder_2."}[comp]
                out[f"{pre}{p}.lora_A.weight"], out[f"{pre}{p}.lora_B.weight"] = _peft_pair(d)
            elif format == "kohya":
                k = names[p]
                fold = d.scale * d.rank / common_alpha  # 1.0 unless alphas differ between modules
                up = d.up if fold == 1.0 else (d.up.float() * fold).to(d.up.dtype)
                out[f"{k}.lora_down.weight"], out[f"{k}.lora_up.weight"] = d.down, up
                if d.mid is not None:
                    out[f"{k}.lora_mid.weight"] = d.mid
                out[f"{k}.alpha"] = torch.tensor(common_alpha, dtype=torch.float32)
            else:
                k = names[p]
                out[f"{k}.diff"] = d.dense(torch.float32).to(_dtype_of(d))
                if isinstance(d, DenseDelta) and d.bias is not None:
                    out[f"{k}.diff_b"] = (d.scale * d.bias.float()).to(_dtype_of(d))
    return out


def _common_alpha(offset: Offset) -> float:
    """The one kohya alpha written for every module: the alpha all modules share, else the largest.

    Per-module alphas that differ from it are folded into lora_up (alpha_i / alpha), because
    diffusers' kohya loader (0.3x-0.42) applies a single alpha to attention modules.
    """
    alphas = {float(d.scale * d.rank) for c in offset.components().values() for d in c.values()}
    return max(alphas)


def _dtype_of(d: Delta) -> torch.dtype:
    return d.weight.dtype if isinstance(d, DenseDelta) else d.up.dtype


def _peft_pair(d: LowRankDelta) -> tuple[torch.Tensor, torch.Tensor]:
    """(lora_A, lora_B) of the PEFT layout: Tucker folded into A, the scale alpha/r folded into B."""
    down, up = _plain_lora(d)
    return down, (up.float() * d.scale).to(up.dtype)


def _plain_lora(d: LowRankDelta) -> tuple[torch.Tensor, torch.Tensor]:
    """(down, up) without a Tucker core: down' = mid x down ([r, in, kh, kw]); scale not applied."""
    if d.mid is None:
        return d.down, d.up
    down = torch.einsum("i j k l, j r -> i r k l", d.mid.float(), d.down.flatten(1).float()).to(d.down.dtype)
    return down, d.up


def _kohya_names(comp: str, mods: dict, fam: str, base) -> dict[str, str]:
    """Module path -> kohya LoRA name (`lora_unet_...`, `lora_te_...`, `lora_te1_...`)."""
    layout = get_layout(fam)
    if comp != "unet":
        pre = layout.kohya_te.get(comp, f"lora_{comp}_")
        return {p: pre + p.replace(".", "_") for p in mods}
    if layout.kohya_unet == "diffusers":
        return {p: "lora_unet_" + p.replace(".", "_") for p in mods}
    targets = targets_from_base(base) if base is not None else {}
    target = targets.get("unet") or Target.standard(fam, "unet")
    to_ldm = target.to_ldm()
    out, bad = {}, []
    for p, d in mods.items():
        want = target.shapes.get(p)
        if p not in to_ldm or (want is not None and not _shape_fits(delta_shape(d), want)):
            bad.append(p)
            continue
        out[p] = "lora_unet_" + to_ldm[p].replace(".", "_")
    if bad:
        raise ValueError(f"{len(bad)} UNet module(s) do not fit the {target.source} UNet ({', '.join(bad[:3])}): pass "
                         "base= (the model the offset belongs to) so that SDXL LDM names use its block layout")
    return out


# ----------------------------------------------------------------------------------------------
# PEFT and hashing
# ----------------------------------------------------------------------------------------------
def offset_from_peft(model: torch.nn.Module, adapter_name: str = "policy", component: str = "unet") -> dict[str, LowRankDelta]:
    """Read adapter `adapter_name` of a PEFT-LoRA'd module into LowRankDeltas (copies).

    peft LoraLayer: delta W = scaling[adapter] * lora_B.weight @ lora_A.weight (Hu et al. 2021,
    eq. 3 with scaling = lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA).
    The dict is keyed by the component's diffusers module path; put it into
    `Offset(unet=...)` or `Offset(text_encoders={"te1": ...})`.
    """
    from peft.tuners.lora import LoraLayer

    out: dict[str, LowRankDelta] = {}
    seen_adapters: set[str] = set()
    for name, mod in model.named_modules():
        if not isinstance(mod, LoraLayer):
            continue
        seen_adapters |= set(mod.lora_A.keys()) | set(getattr(mod, "lora_embedding_A", {}).keys())
        if adapter_name not in mod.lora_A:
            if adapter_name in getattr(mod, "lora_embedding_A", {}):
                raise ValueError(f"{component}:{name}: embedding LoRA layers are not supported")
            continue
        if getattr(mod, "use_dora", {}).get(adapter_name, False):
            raise ValueError(f"{component}:{name}: DoRA adapters cannot be exported as a plain LoRA offset")
        down = mod.lora_A[adapter_name].weight.detach().clone()
        up = mod.lora_B[adapter_name].weight.detach().clone()
        if up.ndim == 4 and down.ndim == 4 and up.shape[2:] != (1, 1):
            raise ValueError(f"{component}:{name}: unsupported conv LoRA layout (lora_B kernel {tuple(up.shape[2:])})")
        scale = float(mod.scaling[adapter_name])
        path = strip_peft_name(name)
        out[path if component == "unet" else canonical_te_path(path)] = LowRankDelta(down=down, up=up, scale=scale)
    if not out:
        raise ValueError(f"{component}: no LoRA layers with adapter {adapter_name!r} "
                         f"(adapters found: {sorted(seen_adapters) or 'none'})")
    return out


def _plain_param_name(key: str) -> str:
    mod, dot, p = key.rpartition(".")
    return strip_peft_name(mod) + dot + p if dot else key


def model_hash(module_or_state_dict) -> str:
    """Stable sha256 fingerprint of a model (hex, 64 chars).

    Hashes, in sorted name order, each tensor's name, shape and 16 values at evenly spaced flat
    positions (first and last included) rounded to float16. Cheap (no full pass over the weights),
    independent of device, and equal for an fp32 model and its fp16 copy; any renamed, reshaped or
    re-initialised tensor changes it. PEFT wrappers (`base_layer`) and LoRA tensors are ignored, so
    a model hashes the same with and without an adapter injected.
    """
    sd = module_or_state_dict.state_dict() if isinstance(module_or_state_dict, torch.nn.Module) else module_or_state_dict
    h = hashlib.sha256()
    names = {_plain_param_name(k): k for k in sd if ".lora_" not in k and isinstance(sd[k], torch.Tensor)}
    for name in sorted(names):
        t = sd[names[name]]
        flat = t.detach().reshape(-1)
        n = flat.numel()
        idx = (torch.linspace(0, max(n - 1, 0), steps=min(16, n), dtype=torch.float64).round().long() if n  # float64: exact
               else torch.zeros(0, dtype=torch.long))  # positions past 2**24 (float32 rounded n-1 up to n)
        vals = flat[idx.to(flat.device)].float().to(torch.float16).cpu()
        h.update(f"{name}|{tuple(t.shape)}|".encode())
        h.update(vals.numpy().tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------
