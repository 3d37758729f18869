"""Loading offsets: file formats, key grammar, family detection, full-UNet diffs."""
from __future__ import annotations

import json
import math
import os
import re
from collections import defaultdict
from pathlib import Path

import torch

from ..finite import first_nonfinite
from .keys import (
    LAYOUTS,
    Target,
    _cfg_get,
    canonical_te_path,
    display_name,
    get_layout,
    normalize_unet_state_dict,
    strip_peft_name,
    targets_from_base,
)
from .schema import _MAX_LISTED, PICKLE_SUFFIXES, read_npo_metadata
from .types import (
    Delta,
    DenseDelta,
    LoadReport,
    LowRankDelta,
    Offset,
    _shape_fits,
    delta_shape,
)


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


def _check_tensors(sd: dict[str, torch.Tensor], name: str) -> None:
    """Refuse an empty file and tensors holding NaN or inf (a diverged training run), naming the first bad key."""
    if not sd:
        raise ValueError(f"{name}: the file contains no tensors")
    bad = first_nonfinite(sd)
    if bad is not None:
        raise ValueError(f"{name}: tensor {bad!r} holds a non-finite value (NaN or inf); refusing the file "
                         "(was it saved by a diverged training run?)")


def scan_offset(path, *, allow_pickle: bool = False) -> Offset:
    """What a file holds, checked against no model (inspecting a file whose model is unknown).

    Deltas are keyed by the file's own module names (kohya names stay flat: resolving them needs a
    model's module table); `report.family` is the detected family or None; nothing is matched, so
    nothing can mismatch. `load_offset` with a `base` is the check before use.
    """
    path = Path(path)
    sd, meta = _read_tensors(path, allow_pickle)
    _check_tensors(sd, str(path))
    entries, fmt, skipped = _parse_keys(sd, str(path))
    if fmt == "full_unet":
        raise ValueError(f"{path}: a full UNet state dict, not an offset; pass the UNet it was fine-tuned from as base")
    peft_note = _apply_peft_metadata(entries, sd, meta, str(path))
    out = Offset(metadata=dict(meta))
    for e in entries:
        comp = out.unet if e.component == "unet" else out.text_encoders.setdefault(e.component, {})
        if e.name in comp:
            raise ValueError(f"{path}: module {e.component}:{e.name} is given twice ({', '.join(e.parts.values())})")
        comp[e.name] = _make_delta(e, sd, str(path))
    out.report = LoadReport(path=str(path), format=fmt, family=detect_family(entries, sd), matched=len(entries),
                            unmatched_keys=skipped, notes=["names and shapes not checked: no model given"] + peft_note)
    return out


def offset_from_state_dict(sd: dict[str, torch.Tensor], base=None, *, name: str = "<memory>", family: str | None = None,
                           strict: bool = True, metadata: dict[str, str] | None = None) -> Offset:
    """`load_offset` on tensors already in memory (`name` is used in messages). Refuses tensors
    holding NaN or inf (a diverged training run): ValueError naming `name` and the first bad key."""
    _check_tensors(sd, name)
    if family is not None:
        get_layout(family, f"{name}: ")
    entries, fmt, skipped = _parse_keys(sd, name)
    if fmt == "full_unet":
        return _full_unet_offset(sd, base, name, strict, metadata or {})
    peft_note = _apply_peft_metadata(entries, sd, metadata or {}, name)
    file_family = detect_family(entries, sd)
    targets = targets_from_base(base) if base is not None else {}
    model_family = targets["unet"].family if "unet" in targets else None
    cfg = _unet_config_of(base) if base is not None else None
    transformer = cfg is not None and _cfg_get(cfg, "down_block_types") is None  # SD3/Flux: no SD layout applies
    if base is not None:
        fam = model_family or family or (None if transformer else file_family or "sd1")
    else:
        fam = family or file_family or _best_standard_family(entries, sd)
    offset, unmatched, mismatched = _assemble(entries, sd, targets, fam, name)
    notes = list(peft_note)
    ref_family = model_family or family
    if file_family and ref_family and file_family != ref_family:
        who = "the model is" if model_family else "the requested family is"
        notes.append(f"the file looks like {display_name(file_family)} but {who} {display_name(ref_family)}")
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


def load_offset_file_keys(path, *, allow_pickle: bool = False) -> Offset:
    """A LoRA / diff file with its UNet (diffusion-model) keys kept as the file names them.

    For model families whose module names this package does not tabulate (SD3, Flux, Chroma,
    AuraFlow, Lumina 2, Qwen-Image, HiDream, Wan, HunyuanVideo, ...): each delta is keyed by its
    LoRA key prefix, the part before `.lora_down.weight` / `.lora_A.weight` / `.alpha` / `.diff`
    ("lora_unet_double_blocks_0_img_attn_qkv", "transformer.single_transformer_blocks.0.attn.to_q",
    "diffusion_model.blocks.0.self_attn.q"), exactly the names a host's key map resolves (ComfyUI's
    own `comfy.lora.model_lora_keys_unet`). `Offset.file_keys` is True. Text-encoder keys
    (`lora_te*_`, `text_encoder*.`) are not read: they are counted in the report.
    """
    path = Path(path)
    sd, meta = _read_tensors(path, allow_pickle)
    return offset_file_keys_from_state_dict(sd, name=str(path), metadata=meta)


def offset_file_keys_from_state_dict(sd: dict[str, torch.Tensor], *, name: str = "<memory>",
                                     metadata: dict[str, str] | None = None) -> Offset:
    """`load_offset_file_keys` on tensors in memory."""
    _check_tensors(sd, name)
    entries, fmt, skipped = _parse_keys(sd, name)
    if fmt == "full_unet":
        raise ValueError(f"{name}: a full model state dict, not an offset (no LoRA or .diff keys)")
    out = Offset(metadata=dict(metadata or {}), file_keys=True)
    te_keys = []
    for e in entries:
        if e.component != "unet":
            te_keys += list(e.parts.values())
            continue
        key = _file_prefix(next(iter(e.parts.values())))
        if key is None:  # diffusers attention-processor keys (`.processor.to_q_lora.down.weight`)
            skipped += list(e.parts.values())
            continue
        if key in out.unet:
            raise ValueError(f"{name}: module {key} is given twice ({', '.join(e.parts.values())})")
        out.unet[key] = _make_delta(e, sd, name)
    if not out.unet:
        raise ValueError(f"{name}: no diffusion-model LoRA or .diff keys" + (f" ({len(te_keys)} text-encoder keys only)"
                                                                            if te_keys else ""))
    notes = ["keys kept as the file names them: mapped onto the model by its own key map when applied"]
    if te_keys:
        notes.append(f"{len(te_keys)} text-encoder keys not read (the sampling nodes act on the diffusion model)")
    if skipped:
        notes.append(f"{len(skipped)} keys are not LoRA / diff keys and were ignored")
    out.report = LoadReport(path=name, format=fmt, family=metadata_family(out.metadata), matched=len(out.unet),
                            unmatched_keys=skipped, notes=notes)
    return out


def metadata_family(meta: dict[str, str]) -> str | None:
    """The model family a file names in its metadata (`npo_family`, or kohya's `ss_base_model_version`), else None."""
    return read_npo_metadata(meta).get("family") or meta.get("ss_base_model_version") or None


def _file_prefix(key: str) -> str | None:
    """The LoRA key prefix of one key as written in the file (None for attention-processor keys)."""
    if _PROCESSOR.match(key) or _OLD_TE.match(key):
        return None
    m = _SUFFIX.match(key)
    return m["name"] if m else None


def read_tensors(path, *, allow_pickle: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of an offset file as `load_offset` reads it, before any key is interpreted (a
    caller that renames keys first, e.g. a family's original module names, then `offset_from_state_dict`)."""
    return _read_tensors(Path(path), allow_pickle)


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
    ("transformer.", "unet", "dotted"),  # diffusers' SD3 / Flux LoRAs: the transformer is the denoiser ("unet")
    ("text_encoder_2.", "te2", "dotted"), ("text_encoder.", "te1", "dotted"),
    ("text_encoders.clip_l.transformer.", "te1", "dotted"), ("text_encoders.clip_g.transformer.", "te2", "dotted"),
    ("clip_l.transformer.", "te1", "dotted"), ("clip_g.transformer.", "te2", "dotted"),
    ("cond_stage_model.transformer.", "te1", "dotted"), ("conditioner.embedders.0.transformer.", "te1", "dotted"),
    ("base_model.model.", "unet", "dotted"),
)


class _Entry:
    __slots__ = ("component", "spelling", "name", "parts", "kind", "scale")

    def __init__(self, component, spelling, name, kind):
        self.component, self.spelling, self.name, self.kind = component, spelling, name, kind
        self.parts: dict[str, str] = {}  # part -> original key
        self.scale: float | None = None  # a LoRA's alpha / r from the file's PEFT config when it has no .alpha key


# diffusers' `save_lora_weights` / `save_lora_adapter` write each component's PEFT LoraConfig as JSON under
# this safetensors metadata key, its fields prefixed by the component ("transformer.lora_alpha", ...), or
# unprefixed for a single model's adapter. PEFT scales a LoRA by lora_alpha / r (use_rslora: / sqrt(r)), with
# per-module alpha_pattern / rank_pattern; a PEFT state dict has no .alpha tensors, so without this config a
# file trained with lora_alpha != r would be read at the wrong strength.
PEFT_METADATA_KEY = "lora_adapter_metadata"
_PEFT_PREFIXES = {"transformer": "unet", "unet": "unet", "text_encoder": "te1", "text_encoder_2": "te2"}


def _peft_configs(raw: str, name: str) -> dict[str, dict]:
    """{component: LoraConfig fields} of a `lora_adapter_metadata` value ("*": the unprefixed config)."""
    try:
        cfg = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"{name}: metadata {PEFT_METADATA_KEY!r} is not JSON ({e})") from e
    if not isinstance(cfg, dict):
        raise ValueError(f"{name}: metadata {PEFT_METADATA_KEY!r} is not a JSON object")
    out: dict[str, dict] = {}
    for k, v in cfg.items():
        pre, _, field = k.partition(".")
        if field and pre in _PEFT_PREFIXES:
            out.setdefault(_PEFT_PREFIXES[pre], {})[field] = v
        else:
            out.setdefault("*", {})[k] = v
    return out


def _pattern_value(patterns: dict, module: str):
    """PEFT's `get_pattern_key`: the first pattern p with re.match(rf"(.*\.)?({p})$", module)."""
    for p, v in (patterns or {}).items():
        if re.match(rf"(.*\.)?({p})$", module):
            return v
    return None


def _apply_peft_metadata(entries, sd, metadata: dict, name: str) -> list[str]:
    """Set each PEFT LoRA entry's scale from the file's `lora_adapter_metadata` (entries with an .alpha
    key keep it); returns the report note. A config whose rank disagrees with the tensors, or that asks
    for DoRA, is refused."""
    raw = (metadata or {}).get(PEFT_METADATA_KEY)
    if not raw:
        return []
    configs = _peft_configs(raw, name)
    used = set()
    for e in entries:
        cfg = configs.get(e.component, configs.get("*"))
        if e.kind != "lora" or cfg is None or "alpha" in e.parts or "down" not in e.parts:
            continue
        if cfg.get("use_dora"):
            raise ValueError(f"{name}: the file's PEFT config says use_dora (DoRA is not supported)")
        module = strip_peft_name(e.name)
        r = int(sd[e.parts["down"]].shape[0])
        want_r = _pattern_value(cfg.get("rank_pattern"), module) or cfg.get("r")
        if want_r is not None and int(want_r) != r:
            raise ValueError(f"{name}: module {e.name} has rank {r} but the file's PEFT config says r={want_r}")
        alpha = _pattern_value(cfg.get("alpha_pattern"), module)
        alpha = float(alpha if alpha is not None else cfg.get("lora_alpha", r))
        e.scale = alpha / (math.sqrt(r) if cfg.get("use_rslora") else r)
        used.add((e.component, cfg.get("lora_alpha"), cfg.get("r"), bool(cfg.get("use_rslora"))))
    if not used:
        return []
    desc = ", ".join(f"{c}: lora_alpha {a}, r {r}" + (", rslora" if rs else "") for c, a, r, rs in sorted(used, key=str))
    return [f"LoRA scales from the file's PEFT config ({PEFT_METADATA_KEY}: {desc})"]


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
    best, best_score = next(iter(LAYOUTS)), None
    for fam in LAYOUTS:
        _, unmatched, mism = _assemble(entries, sd, {}, fam, "<probe>")
        score = (len(unmatched) + len(mism))
        if best_score is None or score < best_score:
            best, best_score = fam, score
    return best


def _target_desc(targets, fam) -> str:
    if targets and fam is None:
        return f"given model ({targets['unet'].source if 'unet' in targets else 'no denoiser'})"
    if targets:
        return f"given model ({display_name(fam)})"
    return f"standard {display_name(fam)} architecture"


def _target_for(targets: dict, fam: str, comp: str) -> Target | None:
    if comp in targets:
        return targets[comp]
    if fam is None:  # a model without a standard layout (a flow transformer): only its own modules
        return None
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
    if "alpha" in p:
        scale = float(sd[p["alpha"]].float().item()) / r
    else:  # PEFT: the file's LoraConfig (`_apply_peft_metadata`), else alpha = r
        scale = e.scale if e.scale is not None else 1.0
    return LowRankDelta(down=down, up=up, scale=scale, mid=mid)


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
    from .keys import _guess_unet_config

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
