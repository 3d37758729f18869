"""Prompt encoding and latent decoding for SD1.x / SDXL / pixel-space models: the one home for the
sampler (`diffusers_host.generate`), the training backend (`trainer.backends.diffusers`) and the
DDSPO data preparation. Plain torch over the model objects they pass in (no host import).

Conventions (as the diffusers SD / SDXL pipelines build them):
- SD1.x and the pixel-space world: the last hidden state of the CLIP text encoder [B, L, D].
- SDXL: the penultimate hidden states of both encoders concatenated [B, L, D1 + D2] and the
  pooled projection (`text_embeds`) of the second [B, P].
- Latents: `z = (vae_latent - shift) * scaling_factor`; decoding inverts it. `vae=None` means pixel
  space: the latents are the pixels in [-1, 1].
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

RunEncoder = Callable[[int, torch.nn.Module, torch.Tensor], object]


def tokenize(tokenizer, prompts: Sequence[str], device) -> torch.Tensor:
    """Token ids [B, L], padded / truncated to the tokenizer's model_max_length."""
    return tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids.to(device)


def _run(i: int, te: torch.nn.Module, ids: torch.Tensor):
    return te(ids, output_hidden_states=True)


def encode_text(tokenizers: Sequence, text_encoders: Sequence, prompts: Sequence[str], device, *, sdxl: bool,
                run: RunEncoder = _run) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(hidden [B, L, D], pooled [B, P] or None) of `prompts`, in the encoders' dtype.

    run(i, encoder, ids) -> the encoder's output with hidden states; a caller may wrap the forward
    (e.g. per-row offsets on the text encoder, `generate.encode_prompts`).
    """
    if not sdxl:
        return run(0, text_encoders[0], tokenize(tokenizers[0], prompts, device))[0], None  # [B, L, D]
    hidden, pooled = [], None
    for i, (te, tok) in enumerate(zip(text_encoders, tokenizers)):
        out = run(i, te, tokenize(tok, prompts, device))
        hidden.append(out.hidden_states[-2])  # penultimate layer, as the SDXL pipeline
        pooled = getattr(out, "text_embeds", None)
        if pooled is None:
            pooled = out[0]
    return torch.cat(hidden, dim=-1), pooled  # [B, L, D1 + D2], [B, P] of the last (projection) encoder


def vae_decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """Latents [B, C, h, w] -> the model's pixels [B, 3, H, W] in (about) [-1, 1], not clamped; float32."""
    if vae is None:
        return latents.float()
    z = latents.to(vae.device, vae.dtype) / vae.config.scaling_factor
    if getattr(vae.config, "shift_factor", None):
        z = z + vae.config.shift_factor
    return vae.decode(z).sample.float()
