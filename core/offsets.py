"""Weight offsets (eta, delta of METHODS.md): load, save, merge, extract.

The merged negative model of NPO guidance is `theta + alpha*eta + beta*delta` (seed 001 §3.2,
METHODS.md "NPO guidance"); offsets are additive in weight space, so every file format reduces
to per-module weight deltas (`core.offset_types`).

Public API (stable; other modules call these):
  load_offset(path, base=None, *, family=None, allow_pickle=False, strict=True) -> Offset
  offset_from_state_dict(sd, base=None, *, name="<memory>", family=None, strict=True, metadata=None) -> Offset
  save_offset(offset, path, *, format="kohya", metadata=None, base=None, family=None) -> Path
  offset_to_state_dict(offset, *, format="kohya", base=None, family=None) -> dict[str, Tensor]
  offset_from_peft(model, adapter_name="policy", component="unet") -> dict[str, LowRankDelta]
  model_hash(module_or_state_dict) -> str
  merged_state_dict(module, terms, component="unet") -> dict[str, Tensor]
  applied(module, terms, component="unet")   (context manager, in place, exact restore)
  materialize(module, terms, component="unet") -> nn.Module (deep copy)
  extract_lora(offset_or_dense, rank, *, conv_rank=None, keep_dense=False) -> (Offset, report)
  diff_between(tuned, base, *, component="unet") -> Offset
  module_for_path(root, path) -> nn.Module   (the module an offset key patches)

`terms` is a list of `(Offset, scale)`: W' = W + sum_i scale_i * delta_i.  Formats and key
conventions are documented in docs/offsets.md.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import math
import os
import re
import tempfile
from collections import defaultdict
from pathlib import Path

import torch

from .offset_keys import FAMILY_NAMES, Target, canonical_te_path, strip_peft_name, targets_from_base
from .offset_types import DenseDelta, Delta, LoadReport, LowRankDelta, Offset

FORMATS = ("kohya", "peft", "diff")
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
ROLES = ("positive", "negative", "snpo")
BASE_MODEL_VERSION = {"sd1": "sd_v1", "sdxl": "sdxl_base_v1-0"}
_MAX_LISTED = 10

Term = tuple[Offset, float]


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------
def load_offset(path, base=None, *, family: str | None = None, allow_pickle: bool = False, strict: bool = True) -> Offset:
    """Read a LoRA / LoCon / diff / fine-tuned-UNet file into an `Offset` (with `.report`).

    `base` (a diffusers pipeline, a UNet module, a dict {"unet"|"te1"|"te2": module}, a UNet state
    dict or a diffusers folder) fixes the module names and weight shapes every key must match;
    without it the standard SD1.5 / SDXL architectures are used (`family` forces one). A full
    fine-tuned UNet needs `base` (its weights) to become a diff. With `strict`, keys that match
    no module raise; otherwise they are listed in `report.unmatched_keys`.
    """
    path = Path(path)
    sd, meta = _read_tensors(path, allow_pickle)
    return offset_from_state_dict(sd, base, name=str(path), family=family, strict=strict, metadata=meta)


def offset_from_state_dict(sd: dict[str, torch.Tensor], base=None, *, name: str = "<memory>", family: str | None = None,
                           strict: bool = True, metadata: dict[str, str] | None = None) -> Offset:
    """`load_offset` on tensors already in memory (`name` is used in messages)."""
    if not sd:
        raise ValueError(f"{name}: the file contains no tensors")
    if family is not None and family not in FAMILY_NAMES:
        raise ValueError(f"{name}: unknown family {family!r} (expected one of {sorted(FAMILY_NAMES)})")
    entries, fmt, skipped = _parse_keys(sd, name)
    if fmt == "full_unet":
        return _full_unet_offset(sd, base, name, strict, metadata or {})
    file_family = detect_family(entries, sd)
    targets = targets_from_base(base) if base is not None else {}
    model_family = targets["unet"].family if "unet" in targets else None
    if base is not None:
        fam = model_family or family or file_family or "sd1"
    else:
        fam = family or file_family or _best_standard_family(entries, sd)
    offset, unmatched, mismatched = _assemble(entries, sd, targets, fam, name)
    notes = []
    ref_family = model_family or family
    if file_family and ref_family and file_family != ref_family:
        who = "the model is" if model_family else "the requested family is"
        notes.append(f"the file looks like {FAMILY_NAMES[file_family]} but {who} {FAMILY_NAMES[ref_family]}")
    if mismatched:
        head = "; ".join(f"{k}: file {a} vs model {b}" for k, a, b in mismatched[:_MAX_LISTED])
        fams = f" ({notes[0]})" if notes else ""
        raise ValueError(f"{name}: {len(mismatched)} offset(s) do not fit the model's weights{fams}: {head}"
                         + (f" ... and {len(mismatched) - _MAX_LISTED} more" if len(mismatched) > _MAX_LISTED else ""))
    unmatched = unmatched + skipped
    if unmatched and strict:
        fams = f" ({notes[0]})" if notes else ""
        raise ValueError(f"{name}: {len(unmatched)} key(s) match no module of the "
                         f"{_target_desc(targets, fam)}{fams}: {', '.join(unmatched[:_MAX_LISTED])}"
                         + (f" ... and {len(unmatched) - _MAX_LISTED} more" if len(unmatched) > _MAX_LISTED else "")
                         + " (pass strict=False to load the rest)")
    if not any(offset.components().values()):
        raise ValueError(f"{name}: no key matched any module of the {_target_desc(targets, fam)}")
    if unmatched:
        notes.append(f"{len(unmatched)} keys matched nothing and were ignored")
    n_tucker = sum(isinstance(d, LowRankDelta) and d.mid is not None for c in offset.components().values() for d in c.values())
    if n_tucker:
        notes.append(f"{n_tucker} LoCon Tucker (lora_mid) modules")
    offset.metadata = dict(metadata or {})
    offset.report = LoadReport(path=name, format=fmt, family=fam, matched=sum(len(c) for c in offset.components().values()),
                               unmatched_keys=unmatched, notes=notes)
    return offset


def _read_tensors(path: Path, allow_pickle: bool) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if not path.exists():
        raise FileNotFoundError(f"{path}: offset file not found")
    if path.is_dir():
        raise ValueError(f"{path}: is a folder, expected a .safetensors file")
    if path.stat().st_size == 0:
        raise ValueError(f"{path}: the file is empty")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise ValueError(f"{path}: pickle files ({path.suffix}) can run code when loaded; convert it to .safetensors "
                             "or pass allow_pickle=True if you trust it")
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file
            raise ValueError(f"{path}: cannot read pickle file: {e}") from e
        if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
            obj = obj["state_dict"]
        if not isinstance(obj, dict):
            raise ValueError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
        sd = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        return sd, {}
    from safetensors import safe_open

    try:
        sd = {}
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
            for k in f.keys():
                sd[k] = f.get_tensor(k)
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for corrupt files
        raise ValueError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from e
    return sd, meta


# Key grammar: <name>.<suffix>; suffix kinds: down/up/mid/alpha (LoRA), diff/diff_b, weight/bias (full).
_SUFFIX = re.compile(
    r"^(?P<name>.+?)\.(?P<suffix>lora_down\.weight|lora_up\.weight|lora_mid\.weight|alpha|dora_scale|"
    r"lora_A(?:\.[^.]+)?\.weight|lora_B(?:\.[^.]+)?\.weight|lora\.down\.weight|lora\.up\.weight|"
    r"lora_linear_layer\.down\.weight|lora_linear_layer\.up\.weight|diff|diff_b|weight|bias)$")
_PROCESSOR = re.compile(r"^(?P<name>.+)\.processor\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<part>down|up)\.weight$")
_OLD_TE = re.compile(r"^(?P<name>.+\.self_attn)\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<part>down|up)\.weight$")
_PART = {"lora_down.weight": "down", "lora_up.weight": "up", "lora_mid.weight": "mid", "alpha": "alpha",
         "lora.down.weight": "down", "lora.up.weight": "up", "lora_linear_layer.down.weight": "down",
         "lora_linear_layer.up.weight": "up", "diff": "diff", "diff_b": "diff_b", "weight": "weight", "bias": "bias",
         "dora_scale": "dora_scale"}
_TE_PROJ = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}
_UNET_PROJ = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}
# (prefix, component, spelling): "flat" = kohya underscores, "dotted" = diffusers or LDM paths.
_PREFIXES = (
    ("lora_unet_", "unet", "flat"), ("lora_te1_", "te1", "flat"), ("lora_te2_", "te2", "flat"), ("lora_te_", "te1", "flat"),
    ("model.diffusion_model.", "unet", "dotted"), ("diffusion_model.", "unet", "dotted"),
    ("unet.base_model.model.", "unet", "dotted"), ("unet.", "unet", "dotted"),
    ("text_encoder_2.", "te2", "dotted"), ("text_encoder.", "te1", "dotted"),
    ("text_encoders.clip_l.transformer.", "te1", "dotted"), ("text_encoders.clip_g.transformer.", "te2", "dotted"),
    ("clip_l.transformer.", "te1", "dotted"), ("clip_g.transformer.", "te2", "dotted"),
    ("cond_stage_model.transformer.", "te1", "dotted"), ("conditioner.embedders.0.transformer.", "te1", "dotted"),
    ("base_model.model.", "unet", "dotted"),
)


class _Entry:
    __slots__ = ("component", "spelling", "name", "parts", "kind")

    def __init__(self, component, spelling, name, kind):
        self.component, self.spelling, self.name, self.kind = component, spelling, name, kind
        self.parts: dict[str, str] = {}  # part -> original key


def _split_key(key: str):
    """(component, spelling, module name, part, kind) of a key, or None if it is not an offset key."""
    m = _PROCESSOR.match(key) or _OLD_TE.match(key)
    if m:
        table = _TE_PROJ if m.re is _OLD_TE else _UNET_PROJ
        name, part, kind = f"{m['name']}.{table[m['proj']]}", m["part"], "lora"
    else:
        m = _SUFFIX.match(key)
        if not m:
            return None
        suffix = m["suffix"]
        part = "down" if suffix.startswith("lora_A") else "up" if suffix.startswith("lora_B") else _PART[suffix]
        name = m["name"]
        kind = "diff" if part in ("diff", "diff_b") else "full" if part in ("weight", "bias") else "lora"
        if part == "alpha" or part == "dora_scale":
            kind = "lora"
    for pre, comp, spelling in _PREFIXES:
        if name.startswith(pre):
            return comp, spelling, name[len(pre):], part, kind
    if kind == "lora" and name.startswith("lora_"):
        return None
    return "unet", "dotted", name, part, kind


def _parse_keys(sd, name):
    """Group keys by module; returns (entries, format, keys that are not offset keys)."""
    entries: dict[tuple, _Entry] = {}
    skipped, kinds, styles = [], defaultdict(int), defaultdict(int)
    for key in sd:
        s = _split_key(key)
        if s is None:
            skipped.append(key)
            continue
        comp, spelling, mod, part, kind = s
        e = entries.setdefault((comp, spelling, mod, kind), _Entry(comp, spelling, mod, kind))
        if part in e.parts:
            raise ValueError(f"{name}: two keys for {part} of module {mod}: {e.parts[part]} and {key}")
        e.parts[part] = key
        kinds[kind] += 1
        styles[_style_of(key, kind)] += 1
    if not entries:
        listed = ", ".join(list(sd)[:_MAX_LISTED])
        raise ValueError(f"{name}: no LoRA, diff or UNet weight keys recognised (first keys: {listed})")
    if kinds["full"] and (kinds["lora"] or kinds["diff"]):
        # a LoRA file with stray .weight keys (e.g. DoRA magnitudes): those are unmatched keys.
        skipped += [k for e in entries.values() if e.kind == "full" for k in e.parts.values()]
        entries = {k: e for k, e in entries.items() if e.kind != "full"}
    fmt = max(styles, key=styles.get)
    lyco = [k for k in skipped if re.search(r"\.(hada_|lokr_|oft_|dora_scale|lora_magnitude)", k)]
    if lyco:
        raise ValueError(f"{name}: LyCORIS LoHa/LoKr/OFT/DoRA keys are not supported ({', '.join(lyco[:3])})")
    return list(entries.values()), fmt, skipped


def _style_of(key: str, kind: str) -> str:
    if kind == "full":
        return "full_unet"
    if kind == "diff":
        return "diff"
    if key.startswith(("diffusion_model.", "model.diffusion_model.", "text_encoders.", "clip_l.", "clip_g.")):
        return "comfyui"
    if ".lora_down." in key or ".lora_up." in key or ".lora_mid." in key or key.endswith(".alpha") and key.startswith("lora_"):
        return "kohya"
    return "peft"


def detect_family(entries, sd) -> str | None:
    """'sd1' / 'sdxl' from unambiguous signs in the key names and widths, else None.

    SDXL: a second text encoder, `add_embedding`/`label_emb`, more than one transformer block per
    attention, cross-attention width 2048, `lora_te1_`. SD1.x: attention in the first down block,
    LDM `input_blocks.9+`, cross-attention width 768, `lora_te_`.
    """
    votes = set()
    for e in entries:
        n = e.name
        if e.component == "te2":
            votes.add("sdxl")
        if e.component == "unet":
            if re.search(r"(add_embedding|label_emb)", n) or re.search(r"transformer_blocks[._]([1-9])", n):
                votes.add("sdxl")
            if re.search(r"down_blocks[._]0[._]attentions", n) or re.search(r"input_blocks[._](9|10|11)[._]", n):
                votes.add("sd1")
            if re.search(r"attn2[._]to_[kv]$", n) and "down" in e.parts:
                width = sd[e.parts["down"]].shape[1] if e.kind == "lora" else None
                votes |= {768: {"sd1"}, 2048: {"sdxl"}}.get(width, set())
    for e in entries:
        key = next(iter(e.parts.values()))
        if key.startswith("lora_te1_"):
            votes.add("sdxl")
        elif key.startswith("lora_te_"):
            votes.add("sd1")
    return votes.pop() if len(votes) == 1 else None


def _best_standard_family(entries, sd) -> str:
    """Without a model or a decisive sign: the standard family that matches the most keys."""
    best, best_score = "sd1", None
    for fam in ("sd1", "sdxl"):
        _, unmatched, mism = _assemble(entries, sd, {}, fam, "<probe>")
        score = (len(unmatched) + len(mism))
        if best_score is None or score < best_score:
            best, best_score = fam, score
    return best


def _target_desc(targets, fam) -> str:
    if targets:
        return f"given model ({FAMILY_NAMES.get(fam, fam)})"
    return f"standard {FAMILY_NAMES.get(fam, fam)} architecture"


def _target_for(targets: dict, fam: str, comp: str) -> Target | None:
    if comp in targets:
        return targets[comp]
    if targets:  # a model was given but not this component: check names only
        try:
            return Target.standard(fam, comp).without_shapes()
        except ValueError:
            return None
    try:
        return Target.standard(fam, comp)
    except ValueError:
        return None


def _resolve(e: _Entry, target: Target | None) -> str | None:
    if target is None:
        return None
    if e.spelling == "flat":
        return target.flat.get(e.name)
    n = strip_peft_name(e.name)
    if target.component != "unet":
        n = canonical_te_path(n)
    if n in target.shapes:
        return n
    return target.ldm.get(n)


def _assemble(entries, sd, targets, fam, name):
    """Build the Offset; returns (offset, unmatched keys, shape mismatches)."""
    out = Offset()
    unmatched, mismatched = [], []
    for e in entries:
        target = _target_for(targets, fam, e.component)
        path = _resolve(e, target)
        if path is None:
            unmatched += list(e.parts.values())
            continue
        delta = _make_delta(e, sd, name)
        comp = out.unet if e.component == "unet" else out.text_encoders.setdefault(e.component, {})
        if path in comp:
            raise ValueError(f"{name}: module {e.component}:{path} is given twice ({', '.join(e.parts.values())})")
        want = target.shapes.get(path)
        got = delta_shape(delta)
        if want is not None and not _shape_fits(got, want):
            mismatched.append((next(iter(e.parts.values())), tuple(got), tuple(want)))
            continue
        comp[path] = delta
    return out, unmatched, mismatched


def _make_delta(e: _Entry, sd, name) -> Delta:
    p = e.parts
    if e.kind == "diff":
        if "diff" not in p:
            raise ValueError(f"{name}: {p['diff_b']} has no matching .diff weight key")
        return DenseDelta(sd[p["diff"]], sd[p["diff_b"]] if "diff_b" in p else None)
    if "down" not in p or "up" not in p:
        have = ", ".join(p.values())
        raise ValueError(f"{name}: incomplete LoRA for module {e.name}: needs both down (lora_down/lora_A) and up "
                         f"(lora_up/lora_B) weights, found {have}")
    down, up = sd[p["down"]], sd[p["up"]]
    mid = sd[p["mid"]] if "mid" in p else None
    r = down.shape[0]
    if up.shape[1] != r or (mid is not None and tuple(mid.shape[:2]) != (r, r)):
        raise ValueError(f"{name}: module {e.name}: rank mismatch between down {tuple(down.shape)}, "
                         f"up {tuple(up.shape)}" + (f", mid {tuple(mid.shape)}" if mid is not None else ""))
    alpha = float(sd[p["alpha"]].float().item()) if "alpha" in p else float(r)
    return LowRankDelta(down=down, up=up, scale=alpha / r, mid=mid)


def delta_shape(d: Delta) -> tuple:
    """Shape of the dense weight delta without computing it."""
    if isinstance(d, DenseDelta):
        return tuple(d.weight.shape)
    if d.down.ndim == 2:
        return (d.up.shape[0], d.down.shape[1])
    kernel = tuple(d.mid.shape[2:]) if d.mid is not None else tuple(d.down.shape[2:])
    return (d.up.shape[0], d.down.shape[1], *kernel)


def _shape_fits(got, want) -> bool:
    """Equal, or equal up to trailing 1x1 dims (Linear proj_in vs 1x1 Conv proj_in)."""
    strip = lambda s: tuple(s[:2]) if len(s) == 4 and tuple(s[2:]) == (1, 1) else tuple(s)  # noqa: E731
    return tuple(got) == tuple(want) or strip(got) == strip(want)


def normalize_unet_state_dict(sd: dict[str, torch.Tensor], config=None) -> dict[str, torch.Tensor]:
    """A UNet state dict with diffusers names.

    LDM names (`model.diffusion_model.*`, `diffusion_model.*` or bare `input_blocks.*`) are mapped
    with the block layout of `config` (a UNet config; default: standard SD1.5, or SDXL when
    `label_emb` is present); keys outside the UNet (VAE, text encoders) are dropped.
    """
    keys = list(sd)
    ldm_pre = next((p for p in ("model.diffusion_model.", "diffusion_model.") if any(k.startswith(p) for k in keys)), None)
    if ldm_pre is None and not any(k.startswith(("input_blocks.", "middle_block.", "output_blocks.")) for k in keys):
        return {k[len("unet."):] if k.startswith("unet.") else k: v for k, v in sd.items()}
    from .offset_keys import SD15_UNET, SDXL_UNET, ldm_to_diffusers, unet_block_prefixes

    sub = {(k[len(ldm_pre):] if ldm_pre else k): v for k, v in sd.items() if ldm_pre is None or k.startswith(ldm_pre)}
    if config is None:
        config = SDXL_UNET if any(k.startswith("label_emb.") for k in sub) else SD15_UNET
    inverse = {v: k for k, v in unet_block_prefixes(config).items()}
    out = {}
    for k, v in sub.items():
        mod, _, pname = k.rpartition(".")
        d = ldm_to_diffusers(mod, inverse)
        out[(d + "." + pname) if d else k] = v
    return out


def _unet_config_of(base):
    mod = base if isinstance(base, torch.nn.Module) else base.get("unet") if isinstance(base, dict) else getattr(base, "unet", None)
    return getattr(mod, "config", None)


def _unet_state_dict_of(base, name) -> dict[str, torch.Tensor]:
    if base is None:
        raise ValueError(f"{name}: this is a full UNet state dict, not an offset; pass base= (the UNet it was "
                         "fine-tuned from, or its state dict) to turn it into a diff")
    if isinstance(base, (str, os.PathLike)):
        return load_unet_state_dict(base)
    if isinstance(base, dict) and all(isinstance(v, torch.Tensor) for v in base.values()):
        return normalize_unet_state_dict(base, _guess_layout(base))
    mod = base if isinstance(base, torch.nn.Module) else getattr(base, "unet", None)
    if isinstance(base, dict):
        mod = base.get("unet")
    if not isinstance(mod, torch.nn.Module):
        raise ValueError(f"{name}: base must be a UNet module, a pipeline, a state dict or a folder to diff a full UNet")
    return {strip_peft_name(k.rsplit(".", 1)[0]) + "." + k.rsplit(".", 1)[1]: v for k, v in mod.state_dict().items()
            if ".lora_" not in k}


def _guess_layout(sd):
    """Block layout guessed from diffusers-named weights (None for LDM names: use the standard)."""
    from .offset_keys import _guess_unet_config

    shapes = {k[: -len(".weight")]: None for k in sd if k.endswith(".weight")}
    return _guess_unet_config(shapes) if any(k.startswith("down_blocks.") for k in shapes) else None


def _full_unet_offset(sd, base, name, strict, metadata) -> Offset:
    ref = _unet_state_dict_of(base, name)
    tuned = normalize_unet_state_dict(sd, _unet_config_of(base) if not isinstance(base, (str, os.PathLike)) and not _is_sd(base)
                                      else _guess_layout(ref))
    off = _dense_diff(tuned, ref, name, strict)
    off.metadata = dict(metadata)
    return off


def _is_sd(x) -> bool:
    return isinstance(x, dict) and bool(x) and all(isinstance(v, torch.Tensor) for v in x.values())


def _dense_diff(tuned, ref, name, strict) -> Offset:
    """DenseDelta per module whose weight or bias differs (float32 tuned - base)."""
    unmatched = [k for k in tuned if k not in ref]
    if unmatched and strict:
        raise ValueError(f"{name}: {len(unmatched)} weight(s) are not in the base UNet: {', '.join(unmatched[:_MAX_LISTED])}"
                         " (pass strict=False to ignore them)")
    bad = [(k, tuple(tuned[k].shape), tuple(ref[k].shape)) for k in tuned if k in ref and tuned[k].shape != ref[k].shape]
    if bad:
        head = "; ".join(f"{k}: tuned {a} vs base {b}" for k, a, b in bad[:_MAX_LISTED])
        raise ValueError(f"{name}: {len(bad)} weight(s) differ in shape from the base (different architecture?): {head}")
    mods: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    for k, v in tuned.items():
        if k not in ref or "." not in k:
            continue
        mod, p = k.rsplit(".", 1)
        if p in ("weight", "bias"):
            mods[mod][p] = v.float() - ref[k].float()
    out = Offset()
    unchanged = 0
    for mod, parts in mods.items():
        w = parts.get("weight")
        if w is None:
            continue
        b = parts.get("bias")
        if not w.any() and (b is None or not b.any()):
            unchanged += 1
            continue
        out.unet[mod] = DenseDelta(w, b if b is not None and b.any() else None)
    fam = "sdxl" if any(k.startswith("add_embedding.") for k in tuned) else "sd1"
    out.report = LoadReport(path=name, format="full_unet", family=fam, matched=len(out.unet),
                            unmatched_keys=unmatched, notes=[f"diff against base: {len(out.unet)} modules changed, "
                                                             f"{unchanged} unchanged"])
    return out


def load_unet_state_dict(path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """UNet weights (diffusers names) from a diffusers folder, a UNet folder, or a .safetensors file
    holding a diffusers UNet or an LDM (`model.diffusion_model.*`) checkpoint."""
    p = Path(path)
    if p.is_dir():
        for cand in (p / "unet" / "diffusion_pytorch_model.safetensors", p / "diffusion_pytorch_model.safetensors"):
            if cand.is_file():
                p = cand
                break
        else:
            raise FileNotFoundError(f"{path}: no unet/diffusion_pytorch_model.safetensors in this folder")
    sd, _ = _read_tensors(p, allow_pickle)
    if not sd:
        raise ValueError(f"{p}: the file contains no tensors")
    return normalize_unet_state_dict(sd)


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
    tensors = offset_to_state_dict(offset, format=format, base=base, family=family)
    fam = family or _family_of_offset(offset, base)
    meta = build_metadata(offset, fam, path, metadata)
    _atomic_save(tensors, path, meta)
    return path


def build_metadata(offset: Offset, family: str, path: Path, metadata: dict | None) -> dict[str, str]:
    """kohya `ss_*` fields + `npo_*` fields (all str). See docs/offsets.md for the list."""
    meta = {k: v for k, v in (offset.metadata or {}).items() if isinstance(v, str)}
    ranks = sorted({d.rank for c in offset.components().values() for d in c.values() if isinstance(d, LowRankDelta)})
    alphas = sorted({d.scale * d.rank for c in offset.components().values() for d in c.values() if isinstance(d, LowRankDelta)})
    meta.update({"ss_network_module": "networks.lora", "ss_base_model_version": BASE_MODEL_VERSION[family],
                 "ss_output_name": path.stem})
    if ranks:
        meta["ss_network_dim"] = str(ranks[-1])
        meta["ss_network_alpha"] = _num(alphas[-1])  # the alpha _common_alpha writes for every module
    for k, v in (metadata or {}).items():
        if v is None:
            continue
        meta[str(k)] = v if isinstance(v, str) else _num(v) if isinstance(v, (int, float)) else str(v)
    role = meta.get("npo_role")
    if role is not None and role not in ROLES:
        raise ValueError(f"{path}: npo_role must be one of {ROLES}, got {role!r}")
    return meta


def _num(v) -> str:
    return str(int(v)) if float(v).is_integer() else repr(float(v))


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path, meta: dict[str, str]) -> None:
    from safetensors.torch import save_file

    if path.suffix.lower() != ".safetensors":
        raise ValueError(f"{path}: offsets are saved as .safetensors (got {path.suffix or 'no suffix'})")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, tmp, metadata=meta)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


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
    if fam not in FAMILY_NAMES:
        raise ValueError(f"unknown family {fam!r} (expected one of {sorted(FAMILY_NAMES)})")
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
                down, up = _plain_lora(d)
                out[f"{pre}{p}.lora_A.weight"] = down
                out[f"{pre}{p}.lora_B.weight"] = (up.float() * d.scale).to(up.dtype)
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


def _plain_lora(d: LowRankDelta) -> tuple[torch.Tensor, torch.Tensor]:
    """(down, up) without a Tucker core: down' = mid x down ([r, in, kh, kw]); scale not applied."""
    if d.mid is None:
        return d.down, d.up
    down = torch.einsum("i j k l, j r -> i r k l", d.mid.float(), d.down.flatten(1).float()).to(d.down.dtype)
    return down, d.up


def _kohya_names(comp: str, mods: dict, fam: str, base) -> dict[str, str]:
    """Module path -> kohya LoRA name (`lora_unet_...`, `lora_te_...`, `lora_te1_...`)."""
    if comp != "unet":
        pre = "lora_te_" if (comp == "te1" and fam == "sd1") else f"lora_{comp}_"
        return {p: pre + p.replace(".", "_") for p in mods}
    if fam == "sd1":
        return {p: "lora_unet_" + p.replace(".", "_") for p in mods}
    targets = targets_from_base(base) if base is not None else {}
    target = targets.get("unet") or Target.standard("sdxl", "unet")
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
        idx = torch.linspace(0, max(n - 1, 0), steps=min(16, n)).round().long() if n else torch.zeros(0, dtype=torch.long)
        vals = flat[idx.to(flat.device)].float().to(torch.float16).cpu()
        h.update(f"{name}|{tuple(t.shape)}|".encode())
        h.update(vals.numpy().tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------
# Merging
# ----------------------------------------------------------------------------------------------
def _component_module(module, component: str) -> torch.nn.Module:
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


def _summed_deltas(root: torch.nn.Module, terms: list[Term], component: str):
    """{path: (weight delta, bias delta or None)} in float32, validated against `root` first."""
    acc: dict[str, list] = {}
    problems = []
    for offset, scale in terms:
        deltas = offset.components().get(component, {})
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
        name = next((o.report.path for o, _ in terms if o.report is not None), "offset")
        raise ValueError(f"{name}: {len(problems)} {component} delta(s) do not fit the model: {'; '.join(problems[:_MAX_LISTED])}")
    return acc


def merged_state_dict(module, terms: list[Term], component: str = "unet") -> dict[str, torch.Tensor]:
    """State dict of `module` with W + sum_i scale_i * delta_i (new tensors; `module` untouched)."""
    root = _component_module(module, component)
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
    root = _component_module(module, component)
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
    root = copy.deepcopy(_component_module(module, component))
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
# Extraction
# ----------------------------------------------------------------------------------------------
def extract_lora(offset_or_dense, rank: int, *, conv_rank: int | None = None, keep_dense: bool = False) -> tuple[Offset, dict]:
    """Truncated-SVD LoRA of every DenseDelta (Eckart-Young: the best rank-r approximation in
    Frobenius norm).

    Linear: SVD of W [out, in] -> down = sqrt(S_r) Vh_r [r, in], up = U_r sqrt(S_r) [out, r].
    Conv2d: SVD of W reshaped [out, in*kh*kw] -> down [r, in, kh, kw], up [out, r, 1, 1]
    (`conv_rank` for kernels larger than 1x1, default `rank`). LowRankDeltas pass through.
    Deltas that are not matrices (norm weights) are kept dense with `keep_dense`, otherwise
    dropped; bias deltas cannot be expressed by a LoRA and are dropped. Both are reported.

    Report: {"modules": {"comp:path": rel_err}, "overall": rel_err, "rank": ..., "dropped": [...],
    "dropped_bias": [...]}, rel_err = sqrt(sum ||W - W_r||^2 / sum ||W||^2) over the SVD'd weights.
    """
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    conv_rank = conv_rank or rank
    src = offset_or_dense
    if isinstance(src, DenseDelta):
        src = Offset(unet={"": src})
    elif isinstance(src, dict):
        src = Offset(unet=dict(src))
    out = Offset(metadata=dict(src.metadata))
    report = {"modules": {}, "overall": 0.0, "rank": rank, "conv_rank": conv_rank, "dropped": [], "dropped_bias": []}
    err2 = tot2 = 0.0
    for comp, mods in src.components().items():
        dst = out.unet if comp == "unet" else out.text_encoders.setdefault(comp, {})
        for path, d in mods.items():
            key = f"{comp}:{path}"
            if isinstance(d, LowRankDelta):
                dst[path] = d
                continue
            w = d.dense(torch.float32)
            if d.bias is not None and d.bias.any():
                report["dropped_bias"].append(key)
            if w.ndim not in (2, 4):
                report["dropped"].append(key)
                if keep_dense:
                    dst[path] = d
                continue
            r = rank if w.ndim == 2 or tuple(w.shape[2:]) == (1, 1) else conv_rank
            lr, e2 = _svd_lora(w, r)
            n2 = float(w.double().pow(2).sum())
            dst[path] = lr
            err2, tot2 = err2 + e2, tot2 + n2
            report["modules"][key] = math.sqrt(e2 / n2) if n2 > 0 else 0.0
    if not out.text_encoders:
        out.text_encoders = {}
    out.text_encoders = {k: v for k, v in out.text_encoders.items() if v}
    report["overall"] = math.sqrt(err2 / tot2) if tot2 > 0 else 0.0
    return out, report


def _svd_lora(w: torch.Tensor, rank: int) -> tuple[LowRankDelta, float]:
    """Rank-`rank` factorisation of w ([out, in] or [out, in, kh, kw]) and its squared error."""
    out_ch = w.shape[0]
    mat = w.reshape(out_ch, -1).double()  # [out, in*kh*kw]
    u, s, vh = torch.linalg.svd(mat, full_matrices=False)
    r = min(rank, s.numel())
    root = s[:r].sqrt()
    up = (u[:, :r] * root).float()  # [out, r]
    down = (root[:, None] * vh[:r]).float()  # [r, in*kh*kw]
    err2 = float((mat - (u[:, :r] * s[:r]) @ vh[:r]).pow(2).sum())
    if w.ndim == 4:
        down = down.reshape(r, *w.shape[1:])  # [r, in, kh, kw]
        up = up.reshape(out_ch, r, 1, 1)
    return LowRankDelta(down=down.contiguous(), up=up.contiguous(), scale=1.0), err2


def diff_between(tuned, base, *, component: str = "unet", strict: bool = True) -> Offset:
    """Offset of DenseDeltas tuned - base (modules or state dicts; LDM UNet names accepted)."""
    def sd_of(x, config=None):
        if isinstance(x, torch.nn.Module):
            return {strip_peft_name(k.rsplit(".", 1)[0]) + "." + k.rsplit(".", 1)[1]: v
                    for k, v in x.state_dict().items() if ".lora_" not in k}
        if isinstance(x, (str, os.PathLike)):
            return load_unet_state_dict(x)
        return normalize_unet_state_dict(x, config) if component == "unet" else dict(x)

    ref = sd_of(base)
    cfg = getattr(base, "config", None) or (getattr(tuned, "config", None)) or _guess_layout(ref)
    off = _dense_diff(sd_of(tuned, cfg), ref if not _is_sd(base) else sd_of(base, cfg), "tuned model", strict)
    if component != "unet":
        off.text_encoders = {component: off.unet}
        off.unet = {}
        off.report.family = None
    return off
