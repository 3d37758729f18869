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

JSONL files are appended atomically (`append_jsonl`: every line of a call in one `write` on an
O_APPEND descriptor, then fsync), so a reader never sees half of an append except after a crash
mid-write; `read_jsonl` drops such a torn last line and counts it.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
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


# ----------------------------------------------------------------------------- JSONL files

def append_jsonl(path: str | os.PathLike, rows: list[dict]) -> None:
    """Append `rows` as JSON lines in ONE write on an O_APPEND descriptor, then fsync.

    A torn tail left by an earlier crash (no final newline) is cut first, so the new lines start
    on a line of their own.
    """
    if not rows:
        return
    path = Path(path)
    _cut_torn_tail(path)
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        n = os.write(fd, data)
        if n != len(data):
            raise OSError(f"{path}: short write ({n} of {len(data)} bytes); the file may end in a torn line")
        os.fsync(fd)
    finally:
        os.close(fd)


def _cut_torn_tail(path: Path) -> None:
    if not path.is_file() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as fh:
        data = fh.read()
        if data.endswith(b"\n"):
            return
        fh.truncate(data.rfind(b"\n") + 1)


def read_jsonl(path: str | os.PathLike) -> tuple[list[dict], Counter]:
    """(objects, skipped) of a JSONL file; a torn last line (no newline, bad JSON) and bad lines are counted."""
    path = Path(path)
    skipped: Counter = Counter()
    if not path.is_file():
        return [], skipped
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    rows = []
    for n, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            skipped["torn_line" if n == len(lines) - 1 else "bad_row"] += 1
            continue
        if not isinstance(obj, dict):
            skipped["bad_row"] += 1
            continue
        rows.append(obj)
    return rows, skipped


def write_jsonl_atomic(path: str | os.PathLike, rows: list[dict]) -> None:
    """Replace `path` with `rows` (temp file in the same folder, then os.replace)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
