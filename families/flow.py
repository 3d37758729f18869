"""Flow-matching transformer families (SD3/SD3.5, Flux, SANA): what they share.

These models predict a velocity v = eps - x0 on the rectified-flow path x_t = (1 - t) x0 + t eps
(`core.flow`), run a transformer instead of a UNet (the bundle's `unet` slot holds it: the
denoiser of the family) and sample with diffusers' `FlowMatchEulerDiscreteScheduler` (its sigmas
and its `shift`, or the resolution-dependent shift `mu` when the scheduler config says
`use_dynamic_shifting`). A `FlowFamily` adds to `Family`:

  pipeline_classes: the diffusers pipeline `_class_name`s of a model folder of this family
    (`model_index.json`), used for detection and loading;
  t5_max_length: the text token length the pipeline uses by default (`max_sequence_length`: T5 for
    SD3/Flux, Gemma2 for SANA);
  encode_text: the pipeline's own prompt encoding (subclasses, checked against `encode_prompt`):
    (hidden, second) where second goes to the transformer as `Cond.added[text_added_key]` (the
    pooled projection of SD3/Flux, SANA's attention mask); `negative=True` encodes a negative prompt
    the way the pipeline encodes those (SANA: without its instruction prefix);
  flow_scheduler: the FlowMatchEulerDiscreteScheduler sampled with, from the folder's scheduler
    (SANA's DPM-Solver config gives its flow_shift), or a refusal;
  pack / unpack / velocity / timesteps: the latent layout, the transformer call and the
    scheduler's timesteps, exactly as the family's diffusers pipeline does them.

The per-row offsets of NPO (`core.branch_lora`) act on the transformer's Linear layers: every one
of them sees the batch as its leading dimension (attention projections [B, L, C], modulation and
embedding linears [B, C]), as the hook requires.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch

from .base import Family, read_model_index

# LoRA target presets of a diffusers SD3 / Flux transformer (PEFT suffixes).
MMDIT_ATTN = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
MMDIT_FF = ("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")


def t5_ids(tokenizer, prompts: Sequence[str], max_length: int, device) -> torch.Tensor:
    """T5 token ids [B, max_length] (padded to max_length, truncated, `</s>` added), as the SD3/Flux pipelines."""
    return tokenizer(list(prompts), padding="max_length", max_length=max_length, truncation=True,
                     add_special_tokens=True, return_tensors="pt").input_ids.to(device)


@dataclass(frozen=True)
class FlowFamily(Family):
    """A flow-matching transformer family (see the module docstring)."""

    prediction_type: str = "flow"
    schedule: dict = field(default_factory=lambda: {"num_train_timesteps": 1000, "shift": 3.0})
    default_scheduler: str = "flow-euler"
    pipeline_classes: tuple[str, ...] = ()
    t5_max_length: int = 256
    folder_components: tuple[str, ...] = ("transformer", "text_encoder", "vae", "scheduler")
    base_model_version: str = ""  # the kohya `ss_base_model_version` of its LoRAs ("sd3", "flux1")
    text_added_key: str = "pooled_projections"  # Cond.added key of encode_text's second output
    vae_class: str = "AutoencoderKL"  # its VAE (a --vae override must be one; SANA: AutoencoderDC)

    @property
    def is_flow_transformer(self) -> bool:
        return True

    # ----------------------------------------------------------------- detection
    def matches_folder(self, path: Path) -> bool:
        """A diffusers folder whose model_index.json names one of this family's pipelines."""
        return read_model_index(Path(path)).get("_class_name") in self.pipeline_classes and \
            all((Path(path) / c).is_dir() for c in self.folder_components)

    def matches_unet_config(self, config) -> bool:
        return False  # a transformer, never a UNet

    def refusal(self, pipeline_class: str) -> str | None:
        """Why a folder of a related pipeline this family does not sample is refused (None: not refused)."""
        return None

    def flow_scheduler(self, scheduler):
        """(the scheduler sampled with, a description) from the folder's scheduler: SD3/Flux's own
        FlowMatchEulerDiscreteScheduler as it is."""
        c = scheduler.config
        shift = (f"dynamic shift (base {c.get('base_shift')}, max {c.get('max_shift')})"
                 if c.get("use_dynamic_shifting") else f"shift {c.get('shift')}")
        return scheduler, f"{type(scheduler).__name__}, {shift}"

    # ----------------------------------------------------------------- sampling
    def pack(self, latents: torch.Tensor) -> torch.Tensor:
        """VAE latents [B, C, h, w] -> the transformer's input layout (identity unless the family packs)."""
        return latents

    def unpack(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """The inverse of `pack` (h, w: the latent size)."""
        return x

    def latent_channels(self, model) -> int:
        return int(model.config.in_channels)

    def latent_multiple(self, model) -> int:
        """Latent height/width must be multiples of this (the transformer's patch size)."""
        return int(getattr(model.config, "patch_size", 1) or 1)

    def image_seq_len(self, model, h: int, w: int) -> int:
        p = int(getattr(model.config, "patch_size", 1) or 1)
        return (h // p) * (w // p)

    def set_timesteps(self, scheduler, steps: int, image_seq_len: int, device) -> None:
        """The pipeline's `retrieve_timesteps` call: the scheduler's own sigmas with its `shift`, or the
        dynamic shift `mu` of the image's sequence length when `use_dynamic_shifting`."""
        kw = {}
        if scheduler.config.get("use_dynamic_shifting", False):
            kw["mu"] = dynamic_mu(scheduler.config, image_seq_len, max_shift_default=1.16)
        scheduler.set_timesteps(steps, device=device, **kw)

    def velocity(self, model, x: torch.Tensor, t: torch.Tensor, hidden: torch.Tensor, added: dict, *, h: int, w: int,
                 guidance: float | None = None) -> torch.Tensor:
        """The transformer's velocity at scheduler timestep t, as the family's pipeline calls it (each
        family module defines it: SD3Family, FluxFamily)."""
        raise NotImplementedError(f"family {self.name!r}: a FlowFamily must define velocity() (its pipeline's "
                                  f"transformer call)")


def dynamic_mu(config, image_seq_len: int, *, max_shift_default: float) -> float:
    """diffusers' `calculate_shift`: mu linear in the image's token count between (base_image_seq_len,
    base_shift) and (max_image_seq_len, max_shift); the scheduler then shifts t by exp(mu)."""
    base_len = config.get("base_image_seq_len", 256)
    max_len = config.get("max_image_seq_len", 4096)
    base_shift = config.get("base_shift", 0.5)
    max_shift = config.get("max_shift", max_shift_default)
    m = (max_shift - base_shift) / (max_len - base_len)
    return image_seq_len * m + (base_shift - m * base_len)



class OriginalModule(NamedTuple):
    """One module of a transformer's original (SAI / BFL) layout, as a family's `original_modules` maps it:
    the diffusers modules it holds, in the order of its output rows (one, or the parts of a fused projection);
    whether its rows are (shift, scale) where diffusers has (scale, shift) (`swap_scale_shift`, applied before
    the split); and the parts' row counts (None: equal parts, as a fused qkv; Flux's `linear1`: q, k, v, mlp)."""
    targets: tuple[str, ...]
    swap: bool = False
    rows: tuple[int, ...] | None = None


# The diffusers modules of one MMDiT joint (double-stream) block by role, SD3's and Flux's alike; each family
# names the roles by its original (SAI / BFL) module names (`joint_block_modules`).
MMDIT_JOINT_BLOCK = {
    "img_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"), "txt_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "img_proj": ("attn.to_out.0",), "txt_proj": ("attn.to_add_out",),
    "img_fc1": ("ff.net.0.proj",), "img_fc2": ("ff.net.2",),
    "txt_fc1": ("ff_context.net.0.proj",), "txt_fc2": ("ff_context.net.2",),
    "img_mod": ("norm1.linear",), "txt_mod": ("norm1_context.linear",),
}


def joint_block_modules(orig: str, diffusers: str, names: dict[str, str], *, omit: Sequence[str] = (),
                        swap: Sequence[str] = ()) -> dict[str, OriginalModule]:
    """{original module: OriginalModule} of one joint block: `orig` + names[role] holds `diffusers` + the role's
    modules (`MMDIT_JOINT_BLOCK`), for every role but `omit`; the roles in `swap` have (shift, scale) rows."""
    return {orig + names[r]: OriginalModule(tuple(diffusers + m for m in parts), r in swap)
            for r, parts in MMDIT_JOINT_BLOCK.items() if r not in omit}


ORIGINAL_PREFIXES = ("model.diffusion_model.", "diffusion_model.")  # dotted original names (ComfyUI's form)
LORA_SUFFIXES = {".lora_down.weight": "down", ".lora_up.weight": "up", ".lora_A.weight": "down",
                 ".lora_B.weight": "up", ".alpha": "alpha"}


def _original_module(key: str, table: dict, flat: dict) -> tuple[str | None, str | None]:
    """(original module, part) of a LoRA key in kohya (`lora_unet_<module with underscores>`) or dotted
    original (`[model.]diffusion_model.<module>`) form; (None, None) when it is neither."""
    for suffix, part in LORA_SUFFIXES.items():
        if key.endswith(suffix):
            stem = key[: -len(suffix)]
            break
    else:
        return None, None
    if stem.startswith("lora_unet_"):
        return flat.get(stem[len("lora_unet_"):]), part
    for prefix in ORIGINAL_PREFIXES:
        if stem.startswith(prefix):
            mod = stem[len(prefix):]
            return (mod if mod in table else None), part
    return None, None


def has_original_names(sd: dict, table: dict) -> bool:
    """Whether any key of a LoRA state dict names a module of `table` (a family's `original_modules`)."""
    flat = {m.replace(".", "_"): m for m in table}
    return any(_original_module(k, table, flat)[0] is not None for k in sd)


def original_lora_to_peft(sd: dict, table: dict, name: str = "<memory>") -> tuple[dict, dict]:
    """A LoRA on a transformer's original (SAI / BFL) module names -> diffusers/PEFT keys
    `transformer.<module>.lora_A.weight` / `.lora_B.weight` with alpha / rank folded into lora_B, exactly:
    a fused projection's delta up @ down [sum(rows), in] is, per output block k, up[k] @ down (lora_A shared,
    lora_B the block's rows: equal blocks, or the entry's `rows`), and a (shift, scale) module's rows are
    reordered as diffusers' `swap_scale_shift`. `table`: {original module: OriginalModule} (a family's
    `original_modules`: SD3Family, FluxFamily). Every key must be placed: a key that names no module of the
    table, a module without both factors, or output rows that do not split into the entry's blocks is a
    ValueError naming it (nothing is applied half-way). Returns (state dict, counts)."""
    import torch

    flat = {m.replace(".", "_"): m for m in table}
    parts: dict[str, dict] = {}
    bad = []
    for k, v in sd.items():
        mod, part = _original_module(k, table, flat)
        if mod is None:
            bad.append(k)
            continue
        parts.setdefault(mod, {})[part] = v
    if bad:
        raise ValueError(f"{name}: {len(bad)} key(s) name no module of this model in its original names: "
                         f"{', '.join(sorted(bad)[:8])}" + (" ..." if len(bad) > 8 else ""))
    out, split, swapped = {}, 0, 0
    for mod, p in parts.items():
        if "down" not in p or "up" not in p:
            raise ValueError(f"{name}: module {mod!r} has no {'lora_down' if 'down' not in p else 'lora_up'} tensor")
        down, up = p["down"].float(), p["up"].float()
        rank = down.shape[0]
        scale = float(p["alpha"]) / rank if "alpha" in p else 1.0
        entry = table[mod]
        up = up * scale
        if entry.swap:
            a, b = up.chunk(2, dim=0)
            up, swapped = torch.cat([b, a], dim=0), swapped + 1
        n = len(entry.targets)
        rows = entry.rows or ((up.shape[0] // n,) * n if up.shape[0] % n == 0 else None)
        if rows is None or sum(rows) != up.shape[0]:
            raise ValueError(f"{name}: module {mod!r}: {up.shape[0]} output rows do not split into "
                             + (f"{n}" if entry.rows is None else f"the blocks {list(entry.rows)} of this model"))
        split += n > 1
        for target, block in zip(entry.targets, up.split(list(rows), dim=0)):
            out[f"transformer.{target}.lora_A.weight"] = down.clone()
            out[f"transformer.{target}.lora_B.weight"] = block.contiguous()
    return out, {"modules": len(parts), "split": split, "swapped": swapped}
