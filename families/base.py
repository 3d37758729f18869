"""A model family: what differs between SD1.x, SDXL, the pixel-space world (and the next ones).

Everything outside this package asks the family (`get_family(name)`) instead of testing a name:
text encoding, null conditioning, size conditioning, defaults, LoRA targets, offset key maps,
what a single-file checkpoint or a folder of that family looks like. A family is one `Family`
value in one module (`families/sd1.py`, `families/sdxl.py`; the digits world registers its own
from `world/plugin.py`), registered with `register_family`.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..core.conditioning import prompt_length, tokenize
from ..core.offsets.keys import OffsetLayout, register_layout

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"

# (i, encoder, token ids [B, L], **kw) -> the encoder's output with hidden states (kw: e.g. SANA's
# attention_mask, passed to the forward); a caller may wrap the forward (e.g. per-row offsets on the text
# encoder, `diffusers_host.generate.encode_prompts`).
RunEncoder = Callable[..., object]

# LoRA target-module presets (module-name suffixes matched by PEFT) of a diffusers UNet2DConditionModel.
UNET_LORA_TARGETS: dict[str, tuple[str, ...]] = {
    "attn": ("to_q", "to_k", "to_v", "to_out.0"),
    "attn_ff": ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"),
    "attn_ff+conv": ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2",
                     "conv1", "conv2", "conv_shortcut", "proj_in", "proj_out", "time_emb_proj"),
}
UNET_LORA_TARGETS["attn+conv"] = UNET_LORA_TARGETS["attn"] + ("conv1", "conv2", "conv_shortcut", "proj_in", "proj_out")

# SD1.x / SDXL's training schedule (the `scheduler_config.json` of runwayml/stable-diffusion-v1-5 and SDXL base).
SD_SCHEDULE = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}


def _run(i: int, te: torch.nn.Module, ids: torch.Tensor, **kw):
    return te(ids, output_hidden_states=True, **kw)


@dataclass(frozen=True)
class Family:
    """What differs per model family (one value per family, registered in `FAMILIES`).

    name / display_name: "sdxl" / "SDXL".
    prediction_type, schedule: the defaults of its published checkpoints (a loaded model's own
      scheduler config wins).
    text_encoders: how many CLIP encoders; hidden_layer: "last" (SD1.x) or "penultimate" (SDXL,
      concatenated over the encoders); pooled: the last encoder's pooled projection is conditioning
      (`text_embeds`); time_ids: SDXL's size micro-conditioning (`added_cond_kwargs["time_ids"]`);
      force_zeros_for_empty_prompt: the null conditioning is zeros unless the pipeline config says
      otherwise (SDXL's default).
    latent: the model works on VAE latents (False: pixel space, no VAE).
    default_resolution, default_cfg: sampling defaults (pixels, guidance scale).
    lora_targets: LoRA target-module presets of its denoiser (PEFT suffixes).
    offsets: its offset key maps (kohya / PEFT / diffusers / LDM names, `core.offsets.keys.OffsetLayout`);
      None when offset files of this family are not supported.
    single_file_keys: key prefixes that identify a single-file (LDM) checkpoint of this family;
      single_file_pipeline: the diffusers pipeline class that converts one; config_dir: the shipped
      architecture configs (`configs/<config_dir>`) used for that conversion.
    folder_components: the sub-folders that identify a diffusers folder of this family, and
      folder_absent: those it must not have.
    tokenizer_pads: the pad token of each encoder's tokenizer when one CLIP vocabulary serves every encoder
      (a single file's shipped tokenizer, `--tokenizer DIR`): SDXL's OpenCLIP bigG pads with "!" (id 0)
      where CLIP-L pads with <|endoftext|>, as diffusers' SDXL `tokenizer_2` and ComfyUI's SDXL clip_g do.
    """

    name: str
    display_name: str
    prediction_type: str = "epsilon"
    schedule: dict = field(default_factory=lambda: dict(SD_SCHEDULE))
    text_encoders: int = 1
    hidden_layer: str = "last"
    pooled: bool = False
    time_ids: bool = False
    force_zeros_for_empty_prompt: bool = False
    latent: bool = True
    default_resolution: int = 512
    default_cfg: float = 7.5
    lora_targets: dict = field(default_factory=lambda: dict(UNET_LORA_TARGETS))
    offsets: OffsetLayout | None = None
    single_file_keys: tuple[str, ...] = ()
    single_file_pipeline: str | None = None
    config_dir: str | None = None
    folder_components: tuple[str, ...] = ("unet", "text_encoder", "vae")
    folder_absent: tuple[str, ...] = ()
    folder_scheduler: tuple[str, ...] = ()  # scheduler classes its folders name (scheduler_config.json); () = any
    unet_added_cond: str | None = None  # the UNet config's addition_embed_type ("text_time" for SDXL)
    tokenizer_pads: tuple = ()  # per encoder, the pad token when one CLIP tokenizer folder serves all (None: its own)
    default_scheduler: str = "ddim"  # generate's sampler when none is named (flow families: "flow-euler")

    @property
    def is_flow_transformer(self) -> bool:
        """A flow-matching transformer family (`families.flow.FlowFamily`: SD3, Flux, SANA), loaded through its
        diffusers pipeline and sampled by its pipeline's loop. False for every plain `Family`, including a
        flow-prediction UNet (the digits world's `world_flow`), which keeps the UNet paths."""
        return False

    def __post_init__(self):
        if self.hidden_layer not in ("last", "penultimate"):
            raise ValueError(f"family {self.name!r}: hidden_layer must be 'last' or 'penultimate'")

    # ----------------------------------------------------------------- text
    def encode_text(self, tokenizers: Sequence, text_encoders: Sequence, prompts: Sequence[str], device, *,
                    run: RunEncoder = _run) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(hidden [B, L, D], pooled [B, P] or None) of `prompts`, in the encoders' dtype; L is what the
        encoder can take (`core.conditioning.prompt_length`), longer prompts are cut there and counted.

        last: the last hidden state of the (one) encoder. penultimate: the penultimate hidden states
        of every encoder concatenated [B, L, D1 + D2], as the SDXL pipeline; pooled: the projection
        (`text_embeds`) of the last encoder.
        """
        if self.hidden_layer == "last" and not self.pooled:
            ids = tokenize(tokenizers[0], prompts, device, prompt_length(tokenizers[0], text_encoders[0]))
            return run(0, text_encoders[0], ids)[0], None  # [B, L, D]
        hidden, pooled = [], None
        for i, (te, tok) in enumerate(zip(text_encoders, tokenizers)):
            out = run(i, te, tokenize(tok, prompts, device, prompt_length(tok, te)))
            hidden.append(out.hidden_states[-2] if self.hidden_layer == "penultimate" else out[0])
            pooled = getattr(out, "text_embeds", None)
            if pooled is None:
                pooled = out[0]
        return torch.cat(hidden, dim=-1), (pooled if self.pooled else None)  # [B, L, sum D], [B, P]

    def cache_tag(self) -> str:
        """What else, besides the encoders' weights, decides this family's cached text encodings (part of the
        trainer's latent-cache key); "" for most families (SANA: its instruction prefix and token length)."""
        return ""

    def size_ids(self, batch: int, original_size, crop_top_left=(0, 0), target_size=None, *, dtype=torch.float32,
                 device="cpu") -> torch.Tensor | None:
        """SDXL micro-conditioning [B, 6] (orig_h, orig_w, crop_top, crop_left, target_h, target_w), or
        None for a family without it."""
        if not self.time_ids:
            return None
        row = [*original_size, *crop_top_left, *(target_size or original_size)]
        return torch.tensor([row], dtype=dtype, device=device).repeat(batch, 1)

    # ----------------------------------------------------------------- training
    def lora_target_modules(self, targets: str | Sequence[str]) -> list[str]:
        """A preset name (`lora_targets`) or a comma list / sequence of module suffixes."""
        if isinstance(targets, (list, tuple)):
            return list(targets)
        if targets in self.lora_targets:
            return list(self.lora_targets[targets])
        names = [s.strip() for s in targets.split(",") if s.strip()]
        if not names:
            raise ValueError(f"lora targets {targets!r}: expected a preset ({', '.join(self.lora_targets)}) or module names")
        return names

    # ----------------------------------------------------------------- detection
    def matches_folder(self, path: Path) -> bool:
        """A diffusers folder of this family (sub-folders present / absent)."""
        return all((path / c).is_dir() for c in self.folder_components) and \
            not any((path / c).is_dir() for c in self.folder_absent) and \
            (not self.folder_scheduler or _scheduler_class(path) in self.folder_scheduler)

    def matches_single_file(self, keys: Sequence[str]) -> bool:
        return bool(self.single_file_keys) and any(k.startswith(self.single_file_keys) for k in keys)

    def matches_unet_config(self, config) -> bool:
        """A UNet config (diffusers `addition_embed_type`, or ComfyUI/LDM `adm_in_channels`) of this family."""
        get = config.get if isinstance(config, dict) else (lambda k, d=None: getattr(config, k, d))
        added = get("addition_embed_type") or ("text_time" if get("adm_in_channels") else None)
        return self.latent and added == self.unet_added_cond


FAMILIES: dict[str, Family] = {}


def _scheduler_class(path: Path) -> str | None:
    """The `_class_name` of a diffusers folder's scheduler/scheduler_config.json, or None."""
    import json

    f = path / "scheduler" / "scheduler_config.json"
    try:
        return json.loads(f.read_text(encoding="utf-8")).get("_class_name")
    except (OSError, ValueError):
        return None


def register_family(family: Family) -> Family:
    """Add (or replace) a family; its offset layout, if any, is registered with core.offsets."""
    if not isinstance(family, Family):
        raise TypeError(f"register_family: expected a Family, got {type(family).__name__}")
    FAMILIES[family.name] = family
    if family.offsets is not None:
        register_layout(family.offsets)
    return family


def _load_plugins() -> None:
    from ..core.plugins import load_plugins

    load_plugins()


def family_names() -> list[str]:
    """Every registered family (plug-ins loaded first)."""
    _load_plugins()
    return list(FAMILIES)


def get_family(name: str) -> Family:
    """The family called `name`; ValueError listing the known ones."""
    if isinstance(name, Family):
        return name
    if name not in FAMILIES:
        _load_plugins()
    if name not in FAMILIES:
        raise ValueError(f"unknown family {name!r} (expected one of {sorted(FAMILIES)})")
    return FAMILIES[name]


def _first(pred) -> Family | None:
    for f in FAMILIES.values():
        if pred(f):
            return f
    _load_plugins()
    return next((f for f in FAMILIES.values() if pred(f)), None)


def detect_folder(path) -> Family | None:
    """The family of a diffusers model folder, or None (the most specific match: most components)."""
    p = Path(path)
    found = [f for f in FAMILIES.values() if f.matches_folder(p)]
    if not found:
        _load_plugins()
        found = [f for f in FAMILIES.values() if f.matches_folder(p)]
    return max(found, key=lambda f: (len(f.folder_components), bool(f.folder_scheduler)), default=None)


def detect_single_file(keys: Sequence[str], path="checkpoint") -> Family:
    """The family of a single-file (LDM) checkpoint from its tensor names; ValueError if none."""
    keys = list(keys)
    fam = _first(lambda f: f.matches_single_file(keys))
    if fam is not None:
        return fam
    names = [f.name for f in FAMILIES.values() if f.single_file_keys and f.single_file_pipeline]  # loadable ones
    if any(k.startswith("model.diffusion_model.") for k in keys):
        raise ValueError(f"{path}: an LDM checkpoint without text-encoder weights; pass family="
                         + " or ".join(repr(n) for n in names))
    raise ValueError(f"{path}: not an {'/'.join(FAMILIES[n].display_name for n in names)} single-file checkpoint "
                     f"(no model.diffusion_model.* keys); for a diffusers model pass its folder")


def detect_unet_config(config) -> Family:
    """The family of a UNet config (a diffusers UNet2DConditionModel config or a ComfyUI unet_config)."""
    fam = _first(lambda f: f.matches_unet_config(config))
    if fam is None:
        raise ValueError(f"no registered model family has this UNet (expected one of {sorted(FAMILIES)})")
    return fam


def family_with_text_encoders(n: int) -> Family:
    """The latent family whose checkpoints have `n` CLIP text encoders (a diffusers SD / SDXL pipeline,
    or a bare UNet + encoders handed to the trainer)."""
    fam = _first(lambda f: f.latent and not f.is_flow_transformer and f.single_file_pipeline is not None and f.text_encoders == n)
    if fam is None:
        raise ValueError(f"no registered model family has {n} text encoder(s) (known: {sorted(FAMILIES)})")
    return fam


def read_model_index(path: Path) -> dict:
    f = Path(path) / "model_index.json"
    return json.loads(f.read_text(encoding="utf-8")) if f.exists() else {}
