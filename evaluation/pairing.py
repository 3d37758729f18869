"""Preference pairs from scored samples, and the JSONL files they live in (no torch, no host).

A *sample* is one image of a (prompt, negative prompt, seed) with one score, higher is better.
Pairs are made within a *group* (the samples of one prompt and negative prompt), by a rule of
`PAIR_RULES`:

    best_worst   one pair per group: the highest score against the lowest (ties between equal
                 scores broken by the lower seed first)
    all          every two samples of a group whose scores differ, the higher one chosen

A candidate pair whose scores differ by `margin` or less is a near-tie: dropped and counted
(`Pairing.near_ties`), never kept with a coin-flip winner. A group with one sample yields no
candidate (counted as `single_sample`).

Their JSONL files are read and written by core/jsonl.py (`append_jsonl`: every line of a call in one
durable append; `read_jsonl` drops a torn last line and counts it).
"""
from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable


@dataclass(frozen=True)
class Sample:
    prompt: str
    negative_prompt: str
    seed: int
    file: str  # relative to the dataset folder
    score: float

    @property
    def key(self) -> str:
        return sample_key(self.prompt, self.negative_prompt, self.seed)

    @property
    def group(self) -> tuple[str, str]:
        return (self.prompt, self.negative_prompt)


def sample_key(prompt: str, negative_prompt: str, seed: int) -> str:
    """Identity of a sample: sha1 of prompt, negative prompt and seed (16 hex)."""
    return hashlib.sha1(json.dumps([prompt, negative_prompt, int(seed)]).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Pair:
    chosen: Sample
    rejected: Sample

    @property
    def margin(self) -> float:
        return self.chosen.score - self.rejected.score

    @property
    def id(self) -> str:
        return f"{self.chosen.key}>{self.rejected.key}"


@dataclass
class Pairing:
    pairs: list[Pair] = field(default_factory=list)
    candidates: int = 0
    near_ties: int = 0
    skipped: Counter = field(default_factory=Counter)
    per_group: dict = field(default_factory=dict)  # (prompt, negative) -> pairs kept


def _best_worst(group: list[Sample]) -> list[tuple[Sample, Sample]]:
    order = sorted(group, key=lambda s: (-s.score, s.seed))
    return [(order[0], order[-1])]


def _all(group: list[Sample]) -> list[tuple[Sample, Sample]]:
    out = []
    for i, a in enumerate(group):
        for b in group[i + 1:]:
            out.append((a, b) if (a.score, -a.seed) >= (b.score, -b.seed) else (b, a))
    return out


# rule -> (candidate pairs of one group (winner first), one-line help)
PAIR_RULES: dict[str, tuple[Callable[[list[Sample]], list[tuple[Sample, Sample]]], str]] = {
    "best_worst": (_best_worst, "one pair per prompt: highest score vs lowest"),
    "all": (_all, "every two samples of a prompt whose scores differ by more than the margin"),
}


def group_samples(samples: Iterable[Sample]) -> dict[tuple[str, str], list[Sample]]:
    """Samples by (prompt, negative prompt), in first-seen order, each group sorted by seed."""
    groups: dict[tuple[str, str], list[Sample]] = {}
    for s in samples:
        groups.setdefault(s.group, []).append(s)
    return {k: sorted(v, key=lambda s: s.seed) for k, v in groups.items()}


def make_pairs(samples: Iterable[Sample], rule: str = "best_worst", margin: float = 0.05) -> Pairing:
    """Pairs of `samples` by `rule`; candidates with |score difference| <= margin are dropped (counted)."""
    if rule not in PAIR_RULES:
        raise ValueError(f"unknown pairing rule {rule!r}; choose one of: {', '.join(PAIR_RULES)}")
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    out = Pairing()
    for g, group in group_samples(samples).items():
        out.per_group[g] = 0
        if len(group) < 2:
            out.skipped["single_sample"] += 1
            continue
        for w, l_ in PAIR_RULES[rule][0](group):
            out.candidates += 1
            if w.score - l_.score <= margin:
                out.near_ties += 1
                continue
            out.pairs.append(Pair(w, l_))
            out.per_group[g] += 1
    return out


def pair_row(p: Pair, **extra) -> dict:
    """One line of the trainer's JSONL pair format (trainer/data/pairs.py JsonlPairs) + provenance."""
    return {"id": p.id, "prompt": p.chosen.prompt, "negative_prompt": p.chosen.negative_prompt,
            "chosen": p.chosen.file, "rejected": p.rejected.file, "score_chosen": round(p.chosen.score, 6),
            "score_rejected": round(p.rejected.score, 6), "seed_chosen": p.chosen.seed,
            "seed_rejected": p.rejected.seed, **extra}


def sample_row(s: Sample) -> dict:
    return {"key": s.key, **asdict(s)}


def sample_from_row(row: dict) -> Sample:
    return Sample(str(row["prompt"]), str(row["negative_prompt"]), int(row["seed"]), str(row["file"]), float(row["score"]))
