"""The family-agnostic pieces of prompt encoding and latent decoding, shared by the sampler
(`diffusers_host.generate`), the training backend (`trainer.backends.diffusers`) and the DDSPO data
preparation. Plain torch over the model objects they pass in (no host import). Which hidden state,
how many encoders, pooled or not: the model family's `encode_text` (`families.base.Family`).

- Prompts: `tokenize` pads and cuts to what the encoder can take (`prompt_length`); cut prompts are
  counted (`TRUNCATED`, reported once per command).
- Latents: `z = (vae_latent - shift) * scaling_factor`; decoding inverts it. `vae=None` means pixel
  space: the latents are the pixels in [-1, 1].
"""
from __future__ import annotations

import sys
from collections.abc import Sequence

import torch


def prompt_length(tokenizer, text_encoder=None) -> int:
    """Tokens per prompt: what the text encoder can take, min(tokenizer.model_max_length,
    text_encoder.config.max_position_embeddings). A tokenizer folder may say more than its encoder
    holds (ComfyUI's `comfy/sd1_tokenizer` says 8192: ComfyUI chunks prompts itself); CLIP's position
    table (77 for SD1.x / SDXL) is the limit."""
    n = int(tokenizer.model_max_length)
    cap = getattr(getattr(text_encoder, "config", None), "max_position_embeddings", None)
    return min(n, int(cap)) if cap else n


class Truncations:
    """The prompts cut to the encoder's length in this process (counted once per distinct prompt). The first
    one is announced when it happens; `take_note()` gives the total (e.g. at the end of a command, cli/)."""

    def __init__(self):
        self.prompts: dict[str, int] = {}  # prompt -> its token count (special tokens included)
        self.limit = 0

    def add(self, prompt: str, n_tokens: int, limit: int) -> None:
        if prompt in self.prompts:
            return
        if not self.prompts:
            print(f"note: a prompt has {n_tokens} tokens, more than the text encoder's {limit}: it is cut at {limit} "
                  f"(training and sampling alike; docs/training.md 'Long prompts'), e.g. {_short(prompt)!r}; "
                  f"the total is reported at the end", file=sys.stderr, flush=True)
        self.prompts[prompt] = n_tokens
        self.limit = limit

    def take_note(self) -> str | None:
        """One line with the count and an example, or None; resets the count."""
        if not self.prompts:
            return None
        example, n = max(self.prompts.items(), key=lambda kv: kv[1])
        line = (f"{len(self.prompts)} prompt(s) longer than the text encoder's {self.limit} tokens were truncated "
                f"(longest: {n} tokens, {_short(example)!r}); ComfyUI and A1111 would encode them in 75-token chunks "
                f"(docs/training.md 'Long prompts')")
        self.prompts.clear()
        return line


def _short(text: str, n: int = 80) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


TRUNCATED = Truncations()


def tokenize(tokenizer, prompts: Sequence[str], device, max_length: int | None = None) -> torch.Tensor:
    """Token ids [B, L], padded / truncated to L = min(tokenizer.model_max_length, max_length) (`prompt_length`:
    pass the encoder's max_position_embeddings). A prompt longer than L keeps its first L - 2 tokens
    between the start and end tokens, and is counted in `TRUNCATED`."""
    prompts = list(prompts)
    L = int(tokenizer.model_max_length) if max_length is None else min(int(tokenizer.model_max_length), int(max_length))
    full = tokenizer(prompts, truncation=False, verbose=False).input_ids
    for p, ids in zip(prompts, full):
        if len(ids) > L:
            TRUNCATED.add(p, len(ids), L)
    return tokenizer(prompts, padding="max_length", max_length=L, truncation=True,
                     return_tensors="pt").input_ids.to(device)


def vae_decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """Latents [B, C, h, w] -> the model's pixels [B, 3, H, W] in (about) [-1, 1], not clamped; float32."""
    if vae is None:
        return latents.float()
    z = latents.to(vae.device, vae.dtype) / vae.config.scaling_factor
    if getattr(vae.config, "shift_factor", None):
        z = z + vae.config.shift_factor
    return vae.decode(z).sample.float()
