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

