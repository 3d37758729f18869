"""DDSPO's degraded prompt c⁻ for the digits world: the content removed by rule.

DDSPO (seed 003 §3.3, app. G) builds c⁻ by removing or generalising a prompt's key objects and
attributes (its "LLaMA" strategy) or by dropping 40–70% of its words. A world prompt has one
content word (the digit) and at most one attribute (thin / thick) among 3–4 words, so word
dropping keeps the digit word in about 40% of draws and c⁻ then still names the class. This
rewriter does what the LLM instruction asks, by rule: the digit word is generalised to "digit"
and the style word removed, so every c⁻ is GENERIC_PROMPT ("a handwritten digit"), which the
world's base model was trained on (WorldConfig.generic_prob).

Registered in `trainer.ddspo.REWRITERS` as "world_digits" by world/plugin.py.
It is deterministic (the seeds are not needed) and has no fractions: `min_frac` / `max_frac`
are accepted by the factory interface and not used; a model `path` is refused.
"""
from __future__ import annotations

from typing import Sequence

from .build import CLASS_WORDS, STYLE_WORDS

REWRITER_NAME = "world_digits"


def remove_content(prompt: str) -> str:
    """'a thin handwritten seven' -> 'a handwritten digit': class word -> 'digit', style words dropped.

    A prompt that names no digit class is refused (it has no content this rule knows how to remove).
    """
    words = prompt.lower().replace(",", " ").split()
    if not any(w in CLASS_WORDS for w in words):
        raise ValueError(f"world_digits rewriter: {prompt!r} names no digit class (expected a world prompt)")
    return " ".join("digit" if w in CLASS_WORDS else w for w in words if w not in STYLE_WORDS)


class WorldDigitsRewriter:
    """c⁻ = remove_content(c) for every prompt (a `trainer.ddspo.PromptRewriter`)."""

    def __init__(self, min_frac: float = 0.4, max_frac: float = 0.7, path: str | None = None):
        if path:
            raise ValueError("the world_digits rewriter takes no model path")

    def __call__(self, prompts: Sequence[str], seeds: Sequence[int]) -> list[str]:
        if len(prompts) != len(seeds):
            raise ValueError(f"world_digits rewriter: {len(prompts)} prompts but {len(seeds)} seeds")
        return [remove_content(p) for p in prompts]
