"""The family-agnostic pieces of prompt encoding and latent decoding, shared by the sampler
(`diffusers_host.generate`), the training backend (`trainer.backends.diffusers`) and the DDSPO data
preparation. Plain torch over the model objects they pass in (no host import). Which hidden state,
how many encoders, pooled or not: the model family's `encode_text` (`families.base.Family`).

- Latents: `z = (vae_latent - shift) * scaling_factor`; decoding inverts it. `vae=None` means pixel
  space: the latents are the pixels in [-1, 1].
"""
from __future__ import annotations

from collections.abc import Sequence

import torch


def tokenize(tokenizer, prompts: Sequence[str], device) -> torch.Tensor:
    """Token ids [B, L], padded / truncated to the tokenizer's model_max_length."""
    return tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids.to(device)


def vae_decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """Latents [B, C, h, w] -> the model's pixels [B, 3, H, W] in (about) [-1, 1], not clamped; float32."""
    if vae is None:
        return latents.float()
    z = latents.to(vae.device, vae.dtype) / vae.config.scaling_factor
    if getattr(vae.config, "shift_factor", None):
        z = z + vae.config.shift_factor
    return vae.decode(z).sample.float()
