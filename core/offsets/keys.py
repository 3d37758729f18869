"""Module-name maps for weight offsets: diffusers paths, LDM (sgm/CompVis) paths, kohya names.

An offset file names a module in one of three spellings; `offsets.py` resolves every key to the
*diffusers module path* of its component (the key of `Offset.unet` / `Offset.text_encoders`):

  diffusers  "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
  LDM        "input_blocks.4.1.transformer_blocks.0.attn1.to_q"   (ComfyUI `diffusion_model.*`,
             kohya sd-scripts SDXL, original `model.diffusion_model.*` checkpoints)
  kohya      either of the above with every '.' replaced by '_' ("lora_unet_input_blocks_4_1_...")

The underscore spelling is ambiguous (`to_q` is one name, `to_out_0` is `to_out.0`), so it is never
parsed: it is looked up in a table built from the real module names of the target network
(`Target.from_module`) or, when no model is given, of the standard SD1.5 / SDXL architectures
instantiated on the `meta` device (`Target.standard`, no memory, no download).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch

from .types import delta_fits

# Standard architectures (the published configs of runwayml/stable-diffusion-v1-5 and
# stabilityai/stable-diffusion-xl-base-1.0), used when the caller gives no model.
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768, attention_head_dim=8,
)
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280), layers_per_block=2, cross_attention_dim=2048,
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
)
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, projection_dim=768)
CLIP_BIGG = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                 num_attention_heads=20, max_position_embeddings=77, projection_dim=1280, hidden_act="gelu")



@dataclass(frozen=True)
class OffsetLayout:
    """How the offset files of one model family name its modules (the format facts a reader and a
    writer need, with no model at hand). A model family (`families/`) points at its layout; a new
    family with LoRA files defines one and `families.register_family` registers it here.

    unet: the standard UNet2DConditionModel config (names and shapes of `Target.standard`);
    text_encoders: component -> (transformers class name, CLIPTextConfig kwargs);
    kohya_unet: "diffusers" (`lora_unet_<diffusers path>`, kohya sd-scripts SD1.x) or "ldm"
      (`lora_unet_<LDM path>`, sd-scripts SDXL); kohya_te: component -> kohya key prefix;
    base_model_version: the kohya `ss_base_model_version` written.
    """

    name: str
    display_name: str
    unet: dict
    text_encoders: dict
    kohya_unet: str
    kohya_te: dict
    base_model_version: str


LAYOUTS: dict[str, OffsetLayout] = {}


def register_layout(layout: OffsetLayout) -> OffsetLayout:
    """Add (or replace) the offset layout of a family; returns it."""
    if layout.kohya_unet not in ("diffusers", "ldm"):
        raise ValueError(f"offset layout {layout.name!r}: kohya_unet must be 'diffusers' or 'ldm', got {layout.kohya_unet!r}")
    LAYOUTS[layout.name] = layout
    _standard_target.cache_clear()
    return layout


def get_layout(family: str, who: str = "") -> OffsetLayout:
    """The offset layout of `family`; ValueError listing the known ones."""
    if family not in LAYOUTS:
        raise ValueError(f"{who}unknown family {family!r} (expected one of {sorted(LAYOUTS)})")
    return LAYOUTS[family]


def display_name(family: str | None) -> str:
    """'SD1.x' for 'sd1' (the family's own spelling when it has no layout)."""
    return LAYOUTS[family].display_name if family in LAYOUTS else str(family)


# LDM ResBlock sub-module names -> diffusers ResnetBlock2D names.
_RESNET_LDM = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
               "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
_RESNET_DIFFUSERS = {v: k for k, v in _RESNET_LDM.items()}


def _cfg_get(config, name, default=None):
    return config.get(name, default) if isinstance(config, dict) else getattr(config, name, default)


def unet_block_prefixes(config) -> dict[str, str]:
    """diffusers block prefix -> LDM block prefix for a UNet2DConditionModel config.

    The numbering follows the LDM UNet (openaimodel.py): `input_blocks.0` is conv_in, then per
    down block `layers_per_block` entries (`.0` resnet, `.1` transformer) and one downsampler
    (`.0.op`); `middle_block` = resnet, transformer, resnet; per up block `layers_per_block + 1`
    entries, the upsampler sitting after the last resnet/transformer of the block.
    """
    down = list(_cfg_get(config, "down_block_types"))
    up = list(_cfg_get(config, "up_block_types"))
    lpb = _cfg_get(config, "layers_per_block")
    lpb_down = list(lpb) if isinstance(lpb, (list, tuple)) else [lpb] * len(down)
    lpb_up = list(reversed(lpb_down))
    m: dict[str, str] = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
                         "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
                         "add_embedding.linear_2": "label_emb.0.2", "conv_norm_out": "out.0", "conv_out": "out.2",
                         "mid_block.resnets.0": "middle_block.0", "mid_block.attentions.0": "middle_block.1",
                         "mid_block.resnets.1": "middle_block.2"}
    n = 1
    for i, kind in enumerate(down):
        for j in range(lpb_down[i]):
            m[f"down_blocks.{i}.resnets.{j}"] = f"input_blocks.{n}.0"
            if "Attn" in kind:
                m[f"down_blocks.{i}.attentions.{j}"] = f"input_blocks.{n}.1"
            n += 1
        if i < len(down) - 1:
            m[f"down_blocks.{i}.downsamplers.0.conv"] = f"input_blocks.{n}.0.op"
            n += 1
    n = 0
    for i, kind in enumerate(up):
        for j in range(lpb_up[i] + 1):
            m[f"up_blocks.{i}.resnets.{j}"] = f"output_blocks.{n}.0"
            if "Attn" in kind:
                m[f"up_blocks.{i}.attentions.{j}"] = f"output_blocks.{n}.1"
            if j == lpb_up[i] and i < len(up) - 1:
                m[f"up_blocks.{i}.upsamplers.0.conv"] = f"output_blocks.{n}.{2 if 'Attn' in kind else 1}.conv"
            n += 1
    return m


def weight_module_map(key_map) -> dict[str, str]:
    """{diffusers module path: LDM module path} from a {diffusers state-dict key: LDM state-dict key}
    map (ComfyUI's `comfy.utils.unet_to_diffusers(unet_config)`), keeping the `.weight` pairs, in the
    map's order. The one home of this loop (ComfyUI sampling nodes and the ComfyUI training backend)."""
    n = len(".weight")
    return {dk[:-n]: lk[:-n] for dk, lk in key_map.items() if dk.endswith(".weight") and lk.endswith(".weight")}


def diffusers_to_ldm(path: str, prefixes: dict[str, str]) -> str | None:
    """LDM module path of a diffusers UNet module path, or None if it has no LDM counterpart."""
    parts = path.split(".")
    for k in range(len(parts), 0, -1):
        head = ".".join(parts[:k])
        if head in prefixes:
            rest = ".".join(parts[k:])
            if ".resnets." in head and rest:
                rest = _RESNET_DIFFUSERS.get(rest, rest)
            return prefixes[head] + ("." + rest if rest else "")
    return None


def ldm_to_diffusers(path: str, inverse_prefixes: dict[str, str]) -> str | None:
    """diffusers module path of an LDM UNet module path (`inverse_prefixes`: LDM -> diffusers
    block prefixes, i.e. `unet_block_prefixes` inverted), or None."""
    parts = path.split(".")
    for k in range(len(parts), 0, -1):
        head = ".".join(parts[:k])
        if head in inverse_prefixes:
            d = inverse_prefixes[head]
            rest = ".".join(parts[k:])
            if ".resnets." in d and rest:
                for ldm_name, dn in _RESNET_LDM.items():
                    if rest == ldm_name or rest.startswith(ldm_name + "."):
                        rest = dn + rest[len(ldm_name):]
                        break
            return d + ("." + rest if rest else "")
    return None


@dataclass
class Target:
    """The module names (and weight shapes, when known) of one component of a network.

    `shapes[path]` is the weight shape of module `path`, or None when only the name is known.
    `ldm` maps LDM module paths to diffusers paths (UNet only); `flat` maps the kohya underscore
    spelling of both to diffusers paths.
    """

    component: str
    shapes: dict[str, tuple | None]
    ldm: dict[str, str] = field(default_factory=dict)
    flat: dict[str, str] = field(default_factory=dict)
    family: str | None = None
    source: str = ""

    def __post_init__(self):
        if not self.flat:
            self.flat = {p.replace(".", "_"): p for p in self.shapes}
            self.flat.update({p.replace(".", "_"): d for p, d in self.ldm.items()})

    def to_ldm(self) -> dict[str, str]:
        return {d: p for p, d in self.ldm.items()}

    def without_shapes(self) -> "Target":
        return Target(self.component, dict.fromkeys(self.shapes), self.ldm, self.flat, self.family, self.source)

    @classmethod
    def from_module(cls, module: torch.nn.Module, component: str, family: str | None = None, source: str = "") -> "Target":
        """Names and shapes of every module of `module` that owns a `weight` parameter.

        PEFT-injected layers are seen through: `x.to_q.base_layer` is reported as `x.to_q`.
        """
        shapes: dict[str, tuple | None] = {}
        for name, mod in module.named_modules():
            w = mod._parameters.get("weight") if hasattr(mod, "_parameters") else None
            if w is None:
                continue
            name = strip_peft_name(name)
            if ".lora_" in f".{name}" or name.endswith(("lora_A", "lora_B")):
                continue
            if component != "unet":
                name = canonical_te_path(name)
            shapes[name] = tuple(w.shape)
        ldm = {}
        config = getattr(module, "config", None)
        if component == "unet" and config is not None and _cfg_get(config, "down_block_types") is not None:
            prefixes = unet_block_prefixes(config)
            ldm = {l: p for p in shapes if (l := diffusers_to_ldm(p, prefixes)) is not None}
            family = family or unet_family(config)
        return cls(component, shapes, ldm, family=family, source=source or type(module).__name__)

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor], component: str, config=None, source: str = "state dict") -> "Target":
        shapes = {k[: -len(".weight")]: tuple(v.shape) for k, v in sd.items() if k.endswith(".weight")}
        ldm = {}
        if component == "unet":
            prefixes = unet_block_prefixes(config or _guess_unet_config(shapes))
            ldm = {l: p for p in shapes if (l := diffusers_to_ldm(p, prefixes)) is not None}
        return cls(component, shapes, ldm, family=unet_family(config) if config else None, source=source)

    @staticmethod
    def standard(family: str, component: str) -> "Target":
        """Target of the standard SD1.5 / SDXL architecture (built on the meta device, cached)."""
        return _standard_target(family, component)


def strip_peft_name(name: str) -> str:
    """Module path without PEFT wrappers: 'base_model.model.x.to_q.base_layer' -> 'x.to_q'."""
    for pre in ("base_model.model.",):
        if name.startswith(pre):
            name = name[len(pre):]
    if name.endswith(".base_layer"):
        name = name[: -len(".base_layer")]
    return name.replace(".base_layer.", ".")


def canonical_te_path(name: str) -> str:
    """Text-encoder module path as transformers 4.x names it ('text_model.encoder...').

    transformers 5 flattened `CLIPTextModel` (no `text_model.` level) but not
    `CLIPTextModelWithProjection`; offsets always use the 4.x spelling that every LoRA file uses.
    """
    if name.startswith("text_model.") or name in ("text_model", "text_projection") or not name:
        return name
    return "text_model." + name


def unet_family(config) -> str:
    """The layout whose standard UNet has the same added conditioning (`addition_embed_type`) as
    `config`: 'sdxl' for SDXL's text_time, else 'sd1'."""
    kind = _cfg_get(config, "addition_embed_type")
    for layout in LAYOUTS.values():
        if layout.unet.get("addition_embed_type") == kind:
            return layout.name
    return next(iter(LAYOUTS))


def _guess_unet_config(shapes: dict) -> dict:
    """Block layout of a UNet given only its diffusers-named weights (for LDM name maps)."""
    n_down = 1 + max((int(p.split(".")[1]) for p in shapes if p.startswith("down_blocks.")), default=0)
    n_up = 1 + max((int(p.split(".")[1]) for p in shapes if p.startswith("up_blocks.")), default=0)
    lpb = 1 + max((int(p.split(".")[3]) for p in shapes if p.startswith("down_blocks.0.resnets.")), default=0)
    down = tuple("CrossAttnDownBlock2D" if any(p.startswith(f"down_blocks.{i}.attentions.") for p in shapes)
                  else "DownBlock2D" for i in range(n_down))
    up = tuple("CrossAttnUpBlock2D" if any(p.startswith(f"up_blocks.{i}.attentions.") for p in shapes)
               else "UpBlock2D" for i in range(n_up))
    return dict(down_block_types=down, up_block_types=up, layers_per_block=lpb,
                addition_embed_type="text_time" if "add_embedding.linear_1" in shapes else None)


@lru_cache(maxsize=8)
def _standard_target(family: str, component: str) -> Target:
    import transformers
    from diffusers import UNet2DConditionModel

    if family not in LAYOUTS:
        raise ValueError(f"unknown model family {family!r} (expected one of {sorted(LAYOUTS)})")
    layout = LAYOUTS[family]
    with torch.device("meta"):
        if component == "unet":
            module = UNet2DConditionModel(**layout.unet)
        elif component in layout.text_encoders:
            cls_name, cfg = layout.text_encoders[component]
            module = getattr(transformers, cls_name)(transformers.CLIPTextConfig(**cfg))
        else:
            raise ValueError(f"{layout.display_name} has no component {component!r}")
    return Target.from_module(module, component, family=family, source=f"standard {layout.display_name}")


def targets_from_base(base) -> dict[str, Target]:
    """Targets per component from a pipeline, a UNet module, a dict of components, a UNet state
    dict, or a diffusers folder (read from its config files on the meta device, no weights)."""
    if base is None:
        return {}
    if isinstance(base, (str, os.PathLike)):
        return _targets_from_dir(Path(base))
    if isinstance(base, torch.nn.Module):
        comp = "te1" if "CLIPText" in type(base).__name__ else "unet"
        return {comp: Target.from_module(base, comp)}
    if isinstance(base, dict) and base and all(isinstance(v, torch.Tensor) for v in base.values()):

        return {"unet": Target.from_state_dict(normalize_unet_state_dict(base), "unet")}
    if isinstance(base, dict):
        out = {}
        for comp, mod in base.items():
            if mod is not None:
                out[comp] = Target.from_module(mod, comp)
        return out
    out = {}
    for attr, comp in (("unet", "unet"), ("text_encoder", "te1"), ("text_encoder_2", "te2")):
        mod = getattr(base, attr, None)
        if isinstance(mod, torch.nn.Module):
            out[comp] = Target.from_module(mod, comp, source=f"{type(base).__name__}.{attr}")
    if not out:
        raise ValueError(f"base: cannot read module names from a {type(base).__name__} (expected a diffusers pipeline, "
                         "a UNet2DConditionModel, a state dict, a dict of components or a diffusers folder)")
    fam = out["unet"].family if "unet" in out else None
    for t in out.values():
        t.family = t.family or fam
    return out


def _targets_from_dir(root: Path) -> dict[str, Target]:
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    if not root.is_dir():
        raise FileNotFoundError(f"{root}: base model folder not found")
    out: dict[str, Target] = {}
    ucfg = root / "unet" / "config.json"
    if not ucfg.is_file():
        raise FileNotFoundError(f"{root}: not a diffusers model folder (no unet/config.json)")
    cfg = {k: v for k, v in json.loads(ucfg.read_text()).items() if not k.startswith("_")}
    with torch.device("meta"):
        out["unet"] = Target.from_module(UNet2DConditionModel(**cfg), "unet", source=str(root))
        for sub, comp in (("text_encoder", "te1"), ("text_encoder_2", "te2")):
            tcfg = root / sub / "config.json"
            if tcfg.is_file():
                tc = CLIPTextConfig.from_json_file(str(tcfg))
                arch = (json.loads(tcfg.read_text()).get("architectures") or ["CLIPTextModel"])[0]
                cls = CLIPTextModelWithProjection if "Projection" in arch else CLIPTextModel
                out[comp] = Target.from_module(cls(tc), comp, family=out["unet"].family, source=str(root))
    return out


# ---------------------------------------------------------------------------------------------
# ComfyUI CLIP keys (text-encoder parts of an offset on a ComfyUI CLIP object)
# ---------------------------------------------------------------------------------------------
# ComfyUI's CLIP wrappers (comfy/sd1_clip.py `SD1ClipModel`, comfy/sdxl_clip.py `SDXLClipModel`)
# hold each text encoder as `clip_<name>.transformer`, a `comfy.clip_model.CLIPTextModel` that uses
# the transformers-4.x module names (`text_model.encoder.layers.N.self_attn.q_proj`, `mlp.fc1`,
# `text_projection`): exactly the canonical text-encoder paths of `Offset.text_encoders`
# (`canonical_te_path`). So the map is a prefix per component, the same one ComfyUI's own LoRA
# loader uses (comfy/lora.py `model_lora_keys_clip`: `lora_te_`/`lora_te1_` -> clip_l, or clip_h
# for SD2; `lora_te2_` -> clip_g).
COMFY_CLIP_NAMES: dict[str, tuple[str, ...]] = {"te1": ("clip_l", "clip_h"), "te2": ("clip_g",)}


def comfy_clip_layout(clip_keys) -> dict[str, str]:
    """{component: key prefix} for the text encoders a ComfyUI CLIP holds, from its state-dict keys
    (or module paths): SD1.x {"te1": "clip_l.transformer."}, SDXL adds {"te2": "clip_g.transformer."}."""
    heads = {k.split(".", 2)[0] for k in clip_keys if ".transformer." in k}
    out = {}
    for comp, names in COMFY_CLIP_NAMES.items():
        name = next((n for n in names if n in heads), None)
        if name is not None:
            out[comp] = f"{name}.transformer."
    return out


def describe_clip_layout(layout: dict[str, str]) -> str:
    """'an SD1.x CLIP (clip_l only)' / 'an SDXL CLIP (clip_l + clip_g)' for messages."""
    names = tuple(p.split(".")[0] for p in layout.values())
    kind = {("clip_l",): "an SD1.x", ("clip_l", "clip_g"): "an SDXL", ("clip_h",): "an SD2.x"}.get(names, "a")
    return f"{kind} CLIP ({' + '.join(names) or 'no known text encoder'}{' only' if len(names) == 1 else ''})"


@dataclass
class ClipKeyMap:
    """The text-encoder deltas of one offset re-keyed to a ComfyUI CLIP's module paths.

    `modules`: ComfyUI module path ("clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj")
    -> Delta (the patch key is `<path>.weight`); `coverage`: component -> (applied, total);
    `unmatched`: "te1:<path>" of the deltas that fit no weight of that CLIP.
    """

    modules: dict = field(default_factory=dict)
    coverage: dict[str, tuple[int, int]] = field(default_factory=dict)
    unmatched: list[str] = field(default_factory=list)


def comfy_clip_deltas(text_encoders, clip_shapes: dict[str, tuple]) -> ClipKeyMap:
    """Map `Offset.text_encoders` ({"te1"/"te2": {path: Delta}}) onto a ComfyUI CLIP.

    clip_shapes: {module path: weight shape} of the CLIP's `cond_stage_model` (keys without
    `.weight`). Raises ValueError when the offset has a text encoder the CLIP lacks (e.g. an SDXL
    offset's te2 on an SD1.x CLIP) or when none of a component's modules fits the CLIP.
    """
    layout = comfy_clip_layout(clip_shapes)
    out = ClipKeyMap()
    for comp, deltas in text_encoders.items():
        if not deltas:
            continue
        prefix = layout.get(comp)
        if prefix is None:
            what = "an SDXL offset's second text encoder (te2, CLIP-G)" if comp == "te2" else f"text encoder {comp!r}"
            raise ValueError(f"the offset has {len(deltas)} modules for {what}, but this is "
                             f"{describe_clip_layout(layout)}: use a CLIP of the offset's model family")
        applied = 0
        for path, d in deltas.items():
            key = prefix + canonical_te_path(path)
            shape = clip_shapes.get(key)
            if shape is None or not delta_fits(d, tuple(shape)):
                out.unmatched.append(f"{comp}:{path}")
                continue
            out.modules[key] = d
            applied += 1
        if applied == 0:
            raise ValueError(f"none of the offset's {len(deltas)} {comp} modules fit {describe_clip_layout(layout)} "
                             f"(e.g. {next(iter(deltas))!r} -> {prefix}{canonical_te_path(next(iter(deltas)))}): "
                             "wrong model family?")
        out.coverage[comp] = (applied, len(deltas))
    return out


def clip_coverage_line(offset, keymap: ClipKeyMap | None, role: str, weight: float) -> str:
    """One report line of NPO Negative CLIP: how many text-encoder modules of an offset apply, and where."""
    if offset is None:
        return f"{role}: none"
    n_te = sum(len(v) for v in offset.text_encoders.values())
    if n_te == 0:
        return f"{role}: no text-encoder part (a UNet-only offset): the CLIP is unchanged for it"
    cov = keymap.coverage if keymap is not None else {}
    where = ", ".join(f"{c} {a}/{t}" for c, (a, t) in cov.items())
    s = f"{role} x {weight:g}: {sum(a for a, _ in cov.values())}/{n_te} text-encoder modules apply ({where})"
    if keymap is not None and keymap.unmatched:
        s += f", {len(keymap.unmatched)} do not (e.g. {keymap.unmatched[0]})"
    if weight == 0.0:
        s += "; weight 0: not applied"
    return s


def ldm_unet_layout(sd) -> dict:
    """The block layout (`unet_block_prefixes` config) of an LDM-named UNet state dict (`input_blocks.*`
    names, prefix removed), read from its keys: a down block ends at each downsampler (`input_blocks.N.0.op`),
    an up block at each upsampler (`output_blocks.N.{1,2}.conv`), a block has attention when its entries
    have a `.1` transformer. The standard SD1.5 and SDXL checkpoints give their published layouts."""
    def entries(prefix):
        idx: dict[int, set[str]] = {}
        for k in sd:
            if k.startswith(prefix):
                n, _, rest = k[len(prefix):].partition(".")
                if n.isdigit():
                    idx.setdefault(int(n), set()).add(rest)
        return [idx[i] for i in sorted(idx)]

    down_types, lpb, cur, attn = [], [], 0, False
    for rest in entries("input_blocks.")[1:]:  # input_blocks.0 is conv_in
        if any(r.startswith("0.op.") for r in rest):
            down_types.append("CrossAttnDownBlock2D" if attn else "DownBlock2D")
            lpb.append(cur)
            cur, attn = 0, False
        else:
            cur += 1
            attn = attn or any(r.startswith("1.") for r in rest)
    if cur:
        down_types.append("CrossAttnDownBlock2D" if attn else "DownBlock2D")
        lpb.append(cur)
    if not down_types:
        raise ValueError("LDM UNet weights without input_blocks: cannot read the block layout")
    up_types, attn = [], False
    for rest in entries("output_blocks."):
        attn = attn or any(r.startswith("1.") and not r.startswith("1.conv.") for r in rest)
        if any(r.startswith(("1.conv.", "2.conv.")) for r in rest):
            up_types.append("CrossAttnUpBlock2D" if attn else "UpBlock2D")
            attn = False
    up_types.append("CrossAttnUpBlock2D" if attn else "UpBlock2D")
    if len(up_types) != len(down_types):
        raise ValueError(f"LDM UNet weights with {len(down_types)} down and {len(up_types)} up blocks: "
                         "not a UNet layout this reader knows")
    return dict(down_block_types=tuple(down_types), up_block_types=tuple(up_types),
                layers_per_block=lpb[0] if len(set(lpb)) == 1 else tuple(lpb),
                addition_embed_type="text_time" if any(k.startswith("label_emb.") for k in sd) else None)


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
    sub = {(k[len(ldm_pre):] if ldm_pre else k): v for k, v in sd.items() if ldm_pre is None or k.startswith(ldm_pre)}
    if config is None:  # the block layout read from the LDM keys themselves (not assumed: a wrong one misnames)
        config = ldm_unet_layout(sub)
    inverse = {v: k for k, v in unet_block_prefixes(config).items()}
    out = {}
    for k, v in sub.items():
        mod, _, pname = k.rpartition(".")
        d = ldm_to_diffusers(mod, inverse)
        out[(d + "." + pname) if d else k] = v
    return out


# ---------------------------------------------------------------------------------------------
# The offset layouts of the two standard families (kohya sd-scripts' own naming; the published
# SD1.5 / SDXL base architectures). Their family modules (families/sd1.py, families/sdxl.py)
# point at these; core keeps them because every offset reader needs them without a model.
# ---------------------------------------------------------------------------------------------
SD1_LAYOUT = register_layout(OffsetLayout(
    name="sd1", display_name="SD1.x", unet=SD15_UNET, text_encoders={"te1": ("CLIPTextModel", CLIP_L)},
    kohya_unet="diffusers", kohya_te={"te1": "lora_te_"}, base_model_version="sd_v1"))
SDXL_LAYOUT = register_layout(OffsetLayout(
    name="sdxl", display_name="SDXL", unet=SDXL_UNET,
    text_encoders={"te1": ("CLIPTextModel", CLIP_L), "te2": ("CLIPTextModelWithProjection", CLIP_BIGG)},
    kohya_unet="ldm", kohya_te={"te1": "lora_te1_", "te2": "lora_te2_"}, base_model_version="sdxl_base_v1-0"))
