"""Offsets onto a loaded ComfyUI model, for every family ComfyUI runs with an unconditional row.

An offset read with the file's own key names (`Offset.file_keys`, core/offsets/read.py
`load_offset_file_keys`) is resolved with ComfyUI's key map for the model at hand,
`comfy.lora.model_lora_keys_unet(model.model, {})`: {LoRA key prefix -> "diffusion_model.<module>.weight"
or ("diffusion_model.<module>.weight", (dim, offset, size))}. That map is the one ComfyUI's own LoRA
loader uses, so every spelling it accepts resolves here too: generic `diffusion_model.<module>`,
kohya `lora_unet_<module_with_underscores>`, and the per-family diffusers / PEFT / OneTrainer /
SimpleTuner names (SD3, Flux, AuraFlow, PixArt, HunyuanVideo, HiDream, Qwen-Image ...), including
the diffusers names that target a *slice* of a fused projection (Flux's `to_q` / `to_k` / `to_v` ->
rows of `img_attn.qkv`, or of `single_blocks.N.linear1`).

A slice delta acts on its rows only: a LoRA `up [size, r]` on rows [offset, offset+size) of a fused
Linear is the LoRA `up' [out, r]` with zeros outside those rows, exactly (ΔW' = up'·down is ΔW on
the slice and 0 elsewhere). The slices of one fused module are concatenated into one low-rank
delta of rank Σr (`down [Σr, in]`, `up [out, Σr]`, scales folded into `up`), so the per-row branch
hooks (core/branch_lora.py) and ComfyUI weight patches see one ordinary LoRA per module.

Keys that resolve to nothing, or whose shape does not fit, are returned with the reason; callers
refuse a partial application unless the user accepts it (`allow_partial`). A model class not in
`FAMILIES` is an error: per-row offsets need every targeted layer to see the batch as its leading
dimension, which is checked for these families (tests/comfyui) and enforced per call by the hooks.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ...core.offsets.types import DenseDelta, LowRankDelta, delta_fits

# ComfyUI model class (comfy/model_base.py, exact type) -> display name. "unet": the LDM UNet
# families whose offsets may also arrive keyed by diffusers module paths (SD1.x / SDXL files).
UNET_FAMILIES = {"BaseModel": "SD1.x / SD2.x", "SD21UNCLIP": "SD2.x unCLIP", "SDXL": "SDXL",
                 "SDXLRefiner": "SDXL refiner", "SD15_instructpix2pix": "SD1.5 InstructPix2Pix",
                 "SDXL_instructpix2pix": "SDXL InstructPix2Pix"}
DIT_FAMILIES = {"SD3": "SD3 / SD3.5", "Flux": "Flux", "Chroma": "Chroma", "AuraFlow": "AuraFlow",
                "Lumina2": "Lumina 2", "QwenImage": "Qwen-Image", "HiDream": "HiDream", "WAN21": "Wan 2.1",
                "WAN22": "Wan 2.2", "HunyuanVideo": "HunyuanVideo", "HunyuanDiT": "HunyuanDiT", "PixArt": "PixArt",
                "GenmoMochi": "Mochi", "LTXV": "LTX-Video", "CosmosPredict2": "Cosmos Predict2",
                "HunyuanImage21": "HunyuanImage 2.1", "Omnigen2": "OmniGen2"}
FAMILIES = {**UNET_FAMILIES, **DIT_FAMILIES}
# covered by the real-ComfyUI tests (tests/comfyui: test_comfy_npo / test_sdxl, and test_dit_npo for the DiTs)
TESTED = ("BaseModel", "SDXL", "SD3", "Flux", "WAN21")


@dataclass
class Family:
    cls: str
    name: str
    unet: bool
    guidance_distilled: bool  # a guidance embedding (Flux dev, HunyuanVideo): default cfg 1, no uncond rows


def comfy_family(model_patcher) -> Family:
    """The family of a ComfyUI MODEL; ValueError for a model class this package does not know."""
    model = model_patcher.model
    cls = type(model).__name__
    if cls not in FAMILIES:
        raise ValueError(f"NPO: the model is a {cls} (comfy.model_base), a family these nodes do not know; per-row "
                         f"offsets are supported for {', '.join(sorted(set(FAMILIES.values())))}")
    cfg = getattr(getattr(model, "model_config", None), "unet_config", {}) or {}
    return Family(cls, FAMILIES[cls], cls in UNET_FAMILIES, bool(cfg.get("guidance_embed", False)))


@dataclass
class Mapped:
    """An offset's diffusion-model deltas on one model: {module path inside `diffusion_model`: Delta}."""

    modules: dict = field(default_factory=dict)
    applied: int = 0  # offset keys that apply (several slice keys may share one module)
    unmatched: list[str] = field(default_factory=list)  # "key (reason)"


def model_key_map(model_patcher) -> dict:
    import comfy.lora

    return comfy.lora.model_lora_keys_unet(model_patcher.model, {})


def map_file_keys(deltas: dict, model_patcher) -> Mapped:
    """Resolve file-keyed deltas ({LoRA key prefix: Delta}) with ComfyUI's key map of the model."""
    key_map = model_key_map(model_patcher)
    shapes = {k: tuple(v.shape) for k, v in model_patcher.model.state_dict().items()}
    out = Mapped()
    parts: dict[str, list] = {}  # module path -> [(key, delta, (offset, size) | None)]
    for key, d in deltas.items():
        target = key_map.get(key)
        if target is None and key.startswith("lora_unet__"):  # Wan-Fun spelling (comfy.lora_convert)
            target = key_map.get("lora_unet_" + key[len("lora_unet__"):])
        if target is None:
            out.unmatched.append(f"{key} (no such module in this {type(model_patcher.model).__name__} model)")
            continue
        wkey, sl, fn = (target[0], target[1], target[2] if len(target) > 2 else None) if isinstance(target, tuple) \
            else (target, None, None)
        if fn is not None:
            d = _row_function(d, fn)
            if d is None:
                out.unmatched.append(f"{key} (ComfyUI transforms this weight with {getattr(fn, '__name__', fn)}, "
                                     "which a per-row offset cannot reproduce)")
                continue
        if not (wkey.startswith("diffusion_model.") and wkey.endswith(".weight")) or wkey not in shapes:
            out.unmatched.append(f"{key} (maps to {wkey}, not a weight of the diffusion model)")
            continue
        shape = shapes[wkey]
        if sl is not None:
            dim, off, size = sl
            if dim != 0:
                out.unmatched.append(f"{key} (slice {sl} of {wkey} {shape}: only output-row slices are supported)")
                continue
            if off + size > shape[0]:
                out.unmatched.append(f"{key} (ComfyUI maps it to rows {off}..{off + size} of {wkey}, which has "
                                     f"{shape[0]} rows: the model's layout differs from what the key map assumes)")
                continue
            want = (size, *shape[1:])
        else:
            want = shape
        if not delta_fits(d, want):
            out.unmatched.append(f"{key} (shape does not fit {wkey} {want})")
            continue
        path = wkey[len("diffusion_model."):-len(".weight")]
        parts.setdefault(path, []).append((key, d, None if sl is None else (sl[1], sl[2])))
    for path, items in parts.items():
        whole = [k for k, _, s in items if s is None]
        if whole and len(items) > 1:
            out.unmatched += [f"{k} (module {path} is given {len(items)} times)" for k, _, _ in items]
            continue
        if not whole:
            overlap = _overlap([s for _, _, s in items])
            if overlap:
                out.unmatched += [f"{k} (overlapping slices of {path})" for k, _, _ in items]
                continue
        try:
            out.modules[path] = items[0][1] if whole else join_slices(
                [(d, s) for _, d, s in items], shapes[f"diffusion_model.{path}.weight"])
        except ValueError as e:
            out.unmatched += [f"{k} ({e})" for k, _, _ in items]
            continue
        out.applied += len(items)
    return out


def _row_function(d, fn):
    """The delta with ComfyUI's key-map transform applied, for transforms that permute output rows
    (`comfy.utils.swap_scale_shift`: diffusers' (scale, shift) order of adaLN rows -> (shift, scale)),
    which act on `up` (or the dense rows) exactly; None for any other transform."""
    import comfy.utils

    if fn is not comfy.utils.swap_scale_shift:
        return None
    if isinstance(d, LowRankDelta):
        return LowRankDelta(down=d.down, up=fn(d.up), scale=d.scale, mid=d.mid)
    return DenseDelta(fn(d.weight), None if d.bias is None else fn(d.bias), d.scale)


def _overlap(slices) -> bool:
    s = sorted(slices)
    return any(a[0] + a[1] > b[0] for a, b in zip(s, s[1:]))


def join_slices(items: list, weight_shape: tuple) -> LowRankDelta | DenseDelta:
    """One delta for a fused weight from deltas on row slices [(delta, (offset, size))], exact:
    LoRAs -> down [Σr, in], up [out, Σr] zero outside each slice's rows (scales folded into up);
    dense diffs -> one zero-padded dense diff."""
    out_dim = weight_shape[0]
    if all(isinstance(d, LowRankDelta) and d.mid is None and d.down.ndim == 2 for d, _ in items):
        downs, ups, col = [], [], 0
        total = sum(d.rank for d, _ in items)
        dt = torch.promote_types(items[0][0].up.dtype, torch.float32)
        up = torch.zeros(out_dim, total, dtype=dt)
        for d, (off, size) in items:
            downs.append(d.down.to(dt))
            up[off:off + size, col:col + d.rank] = d.up.to(dt).reshape(size, d.rank) * d.scale
            col += d.rank
        return LowRankDelta(down=torch.cat(downs), up=up, scale=1.0)
    if all(isinstance(d, DenseDelta) and d.bias is None for d, _ in items):
        w = torch.zeros(weight_shape, dtype=torch.float32)
        for d, (off, size) in items:
            w[off:off + size] += d.dense(torch.float32).reshape(size, *weight_shape[1:])
        return DenseDelta(w)
    raise ValueError("slices of one fused module must all be linear LoRAs or all bias-free dense diffs")
