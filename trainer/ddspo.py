"""DDSPO: score-space preference targets from a frozen reference under c and a degraded prompt c⁻
(seed 003 §3.2–3.4, eq. 4–5; METHODS.md "DDSPO"), and the prompt degradations (seed 003 app. G).

Code names -> paper symbols:
    eps_ref_w_c    eps_w* = eps_ref(x_t^w, t, c)        preferred target
    eps_ref_l_neg  eps_l* = eps_ref(x_t^l, t, c⁻)       dispreferred target
    eps_ref_l_c    eps_ref(x_t^l, t, c)                 the reference's own loser prediction
    eps_pol_w/l    eps_θ(x_t^{w/l}, t, c)
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import Protocol, Sequence, runtime_checkable

import torch

from ..core.plugins import load_plugins
from .losses import per_sample_mse


# where the loser image x_l comes from (MethodConfig.ddspo_loser); the only list of these names
DDSPO_LOSERS = {
    "generated": "the reference model's image for c- (the paper's pairs): the data must carry loser images "
                 "(a ddspo-prepare folder made with --losers generate, or a prompts JSONL with loser_image)",
    "other": "another prompt's image (the paper's efficient variant), drawn by the data layer",
    "same": "the winner itself, x_l = x_w (only the prompt differs; not the paper: a warning is logged)",
}


# ---------------------------------------------------------------- loss pieces (pure functions)

@dataclass
class DDSPOMargins:
    """m_w, m_l [B] of METHODS.md plus the raw mse terms they are built from (for logging)."""

    m_w: torch.Tensor
    m_l: torch.Tensor
    mse_pol_l: torch.Tensor  # mse(eps_l*, eps_θ(x_l, c))
    mse_ref_l: torch.Tensor  # mse(eps_l*, eps_ref(x_l, c))


def ddspo_margins(eps_pol_w: torch.Tensor, eps_pol_l: torch.Tensor, eps_ref_w_c: torch.Tensor,
                  eps_ref_l_neg: torch.Tensor, eps_ref_l_c: torch.Tensor) -> DDSPOMargins:
    """Seed 003 eq. 5: m_w = mse(eps_w*, eps_θ(x_w)); m_l = mse(eps_l*, eps_θ(x_l)) − mse(eps_l*, eps_ref(x_l, c)).

    The winner's reference term ‖eps_w* − eps_ref(x_w, c)‖² is identically 0 and dropped.
    """
    m_w = per_sample_mse(eps_ref_w_c, eps_pol_w)  # [B]
    mse_pol_l = per_sample_mse(eps_ref_l_neg, eps_pol_l)  # [B]
    mse_ref_l = per_sample_mse(eps_ref_l_neg, eps_ref_l_c)  # [B]
    return DDSPOMargins(m_w=m_w, m_l=mse_pol_l - mse_ref_l, mse_pol_l=mse_pol_l, mse_ref_l=mse_ref_l)


# ---------------------------------------------------------------- prompt perturbation

def _rng(generator_or_seed) -> random.Random:
    if isinstance(generator_or_seed, random.Random):
        return generator_or_seed
    if isinstance(generator_or_seed, torch.Generator):
        seed = int(torch.randint(0, 2 ** 62, (1,), generator=generator_or_seed,
                                 device=generator_or_seed.device).item())
        return random.Random(seed)
    if isinstance(generator_or_seed, int):
        return random.Random(generator_or_seed)
    raise TypeError(f"expected an int seed, a torch.Generator or a random.Random, got {type(generator_or_seed).__name__}")


def perturb_prompt(prompt: str, generator_or_seed, min_frac: float = 0.4, max_frac: float = 0.7) -> str:
    """Random word removal (seed 003 app. G: drop 40–70% of the tokens), reproducible from the seed.

    A fraction f ~ U[min_frac, max_frac] of the n whitespace-separated words is removed, keeping
    the order of the rest; the count round(f·n) is clamped to [1, n−1], so a prompt of n ≥ 2
    words always changes and never becomes empty. A one-word prompt becomes "" (the null prompt:
    the only degradation left); an empty prompt stays "". Whitespace is normalised to single spaces.
    """
    if not 0 <= min_frac <= max_frac <= 1:
        raise ValueError(f"need 0 <= min_frac <= max_frac <= 1, got {min_frac}, {max_frac}")
    rng = _rng(generator_or_seed)
    words = prompt.split()
    n = len(words)
    if n <= 1:
        return ""
    k = min(max(round(rng.uniform(min_frac, max_frac) * n), 1), n - 1)
    drop = set(rng.sample(range(n), k))
    return " ".join(w for i, w in enumerate(words) if i not in drop)


@runtime_checkable
class PromptRewriter(Protocol):
    """Turns prompts into degraded prompts c⁻; `seeds` make the result reproducible per prompt."""

    def __call__(self, prompts: Sequence[str], seeds: Sequence[int]) -> list[str]: ...


class DropWordsRewriter:
    """The default c⁻: `perturb_prompt` with the configured fractions (seed 003 "Rand-removal")."""

    def __init__(self, min_frac: float = 0.4, max_frac: float = 0.7, path: str | None = None):
        if path:
            raise ValueError("the drop_words rewriter takes no model path (did you mean rewriter 'local_lm'?)")
        if not 0 <= min_frac <= max_frac <= 1:
            raise ValueError(f"need 0 <= min_frac <= max_frac <= 1, got {min_frac}, {max_frac}")
        self.min_frac, self.max_frac = min_frac, max_frac

    def __call__(self, prompts: Sequence[str], seeds: Sequence[int]) -> list[str]:
        return [perturb_prompt(p, int(s), self.min_frac, self.max_frac) for p, s in zip(prompts, seeds)]


REWRITE_INSTRUCTION = (
    "Rewrite the image prompt below so that it loses its most important visual details: remove or "
    "generalise the key objects, attributes, counts and spatial relations, keep the sentence "
    "structure. Answer with the rewritten prompt only.\nPrompt: {prompt}\nRewritten:"
)


class LocalLMRewriter:
    """c⁻ by a local causal language model (seed 003 "LLaMA" strategy), loaded only when configured.

    `path` is a local transformers folder (config + weights + tokenizer); nothing is downloaded
    (local_files_only=True). Decoding is greedy, so the result depends on the prompt alone; when the
    model answers with nothing or with the prompt unchanged, the row falls back to `perturb_prompt`
    with its seed, so c⁻ always differs from c (for prompts of >= 2 words).
    """

    def __init__(self, min_frac: float = 0.4, max_frac: float = 0.7, path: str | None = None,
                 max_new_tokens: int = 60, device: str | torch.device = "cpu"):
        if not path:
            raise ValueError("the local_lm rewriter needs a model folder: set ddspo_rewriter_path")
        if not os.path.isdir(path):
            raise FileNotFoundError(f"local_lm rewriter: model folder {path!r} does not exist")
        from transformers import AutoModelForCausalLM, AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            self.model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True).to(device).eval()
        except (OSError, ValueError) as e:
            raise ValueError(f"local_lm rewriter: cannot load a causal LM and tokenizer from {path!r}: {e}") from e
        self.fallback = DropWordsRewriter(min_frac, max_frac)
        self.max_new_tokens = max_new_tokens

    def _rewrite_one(self, prompt: str) -> str:
        text = REWRITE_INSTRUCTION.format(prompt=prompt)
        ids = self.tokenizer(text, return_tensors="pt").to(self.model.device)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        with torch.no_grad():
            out = self.model.generate(**ids, max_new_tokens=self.max_new_tokens, do_sample=False, pad_token_id=pad)
        answer = self.tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
        lines = [ln.strip().strip('"').strip() for ln in answer.splitlines() if ln.strip()]
        return lines[0] if lines else ""

    def __call__(self, prompts: Sequence[str], seeds: Sequence[int]) -> list[str]:
        out = []
        for p, s in zip(prompts, seeds):
            r = self._rewrite_one(p)
            out.append(r if r and r.split() != p.split() else self.fallback([p], [s])[0])
        return out


# name -> factory(min_frac, max_frac, path) -> PromptRewriter. The only list of rewriter names; plug-ins
# (core/plugins.py) add theirs with register_rewriter.
REWRITERS = {
    "drop_words": DropWordsRewriter,
    "local_lm": LocalLMRewriter,
}


def register_rewriter(name: str, factory) -> None:
    """Add (or replace) the rewriter `name`: factory(min_frac=, max_frac=, path=) -> PromptRewriter."""
    REWRITERS[name] = factory


def rewriter_names() -> tuple[str, ...]:
    """The names of REWRITERS, the plug-ins' included (what choices list)."""
    load_plugins()
    return tuple(REWRITERS)


def build_rewriter(name: str, min_frac: float = 0.4, max_frac: float = 0.7, path: str | None = None) -> PromptRewriter:
    """The rewriter `name` from REWRITERS (a plug-in's included), configured."""
    if name not in REWRITERS:
        load_plugins()
    if name not in REWRITERS:
        raise ValueError(f"unknown DDSPO prompt rewriter {name!r} (expected one of {sorted(REWRITERS)})")
    return REWRITERS[name](min_frac=min_frac, max_frac=max_frac, path=path)
