"""Collecting preference pairs into a named dataset folder, from a host's image batch (the ComfyUI
nodes Score Images / Collect Preference Pairs call this; it imports no host).

A dataset is a folder `<datasets root>/<name>/` holding `pairs.jsonl` (the trainer's JSONL pair
format, trainer/data/pairs.py) and `images/<sha1 of the PNG>.png`, so `Preference Dataset` lists it
and `nodes.comfy.datasets.dataset_from_path` opens it. Every pair line records prompt, negative
prompt, both seeds, the model hash and who chose it (`chosen_by`: "scorer:<name>" or "user").
Pair ids are content hashes (prompt, negative prompt, chosen PNG, rejected PNG): a re-queued
prompt that renders the same images adds nothing (the duplicates are counted).
"""
from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..core.paths import inside, safe_relative_name
from ..core.jsonl import append_jsonl, read_jsonl
from .pairing import Sample, make_pairs

PAIRS_FILE = "pairs.jsonl"


def dataset_dir(root: str | os.PathLike, name: str) -> Path:
    """root/name for a new or existing dataset; a plain folder name (letters, digits, - _ . space)."""
    n = safe_relative_name(name, "dataset name")
    if "/" in n or n.startswith(".") or not all(c.isalnum() or c in "-_. " for c in n):
        raise ValueError(f"dataset name {name!r}: use one folder name of letters, digits, '-', '_', '.' or spaces")
    return inside(root, n, "dataset name")


def png_bytes(image) -> bytes:
    """A PIL image -> PNG bytes (lossless; the bytes name the file)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


@dataclass
class Collected:
    added: int
    duplicates: int
    near_ties: int
    path: Path
    note: str = ""

    def report(self) -> str:
        return (f"{self.path}: {self.added} pairs added, {self.duplicates} already there, "
                f"{self.near_ties} near-ties dropped" + (f"\n{self.note}" if self.note else ""))


def _pair_id(prompt: str, negative: str, chosen: bytes, rejected: bytes) -> str:
    h = hashlib.sha1()
    for part in (prompt.encode(), b"\0", negative.encode(), b"\0", chosen, b"\0", rejected):
        h.update(part)
    return h.hexdigest()[:16]


def _write_image(folder: Path, data: bytes) -> str:
    name = f"images/{hashlib.sha1(data).hexdigest()[:20]}.png"
    path = folder / name
    if not path.is_file():
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    return name


def pairs_by_score(scores, rule: str = "best_worst", margin: float = 0.0) -> tuple[list[tuple[int, int]], int]:
    """(chosen index, rejected index) pairs of one batch by a pairing rule, and the near-ties dropped."""
    samples = [Sample("", "", i, str(i), float(s)) for i, s in enumerate(np.asarray(scores, dtype=np.float64))]
    p = make_pairs(samples, rule, margin)
    return [(x.chosen.seed, x.rejected.seed) for x in p.pairs], p.near_ties


def append_pairs(folder: Path, images: list, picks: list[tuple[int, int]], *, prompt: str, negative_prompt: str = "",
                 seeds: list[int] | None = None, model_hash: str | None = None, chosen_by: str,
                 scores=None, near_ties: int = 0) -> Collected:
    """Append pairs (chosen index, rejected index) of the batch `images` (PIL) to folder/pairs.jsonl."""
    if not prompt.strip():
        raise ValueError("collect pairs: the prompt is empty; pairs need the prompt they were made for")
    for c, r in picks:
        if not (0 <= c < len(images) and 0 <= r < len(images)) or c == r:
            raise ValueError(f"collect pairs: pick ({c}, {r}) is not two different images of a batch of {len(images)}")
    if seeds is not None and len(seeds) != len(images):
        raise ValueError(f"collect pairs: {len(seeds)} seeds for {len(images)} images")
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows, skipped = read_jsonl(folder / PAIRS_FILE)
    known = {r.get("id") for r in rows}
    pngs = [png_bytes(im) for im in images]
    new, dups = [], 0
    for c, r in picks:
        pid = _pair_id(prompt, negative_prompt, pngs[c], pngs[r])
        if pid in known:
            dups += 1
            continue
        known.add(pid)
        row = {"id": pid, "prompt": prompt, "negative_prompt": negative_prompt,
               "chosen": _write_image(folder, pngs[c]), "rejected": _write_image(folder, pngs[r]),
               "seed_chosen": None if seeds is None else int(seeds[c]),
               "seed_rejected": None if seeds is None else int(seeds[r]), "batch_index_chosen": c,
               "batch_index_rejected": r, "model_hash": model_hash,
               "chosen_by": chosen_by}
        if scores is not None:
            row["score_chosen"], row["score_rejected"] = float(scores[c]), float(scores[r])
        new.append(row)
    append_jsonl(folder / PAIRS_FILE, new)
    return Collected(len(new), dups, near_ties, folder / PAIRS_FILE)


def parse_picks(text: str, n: int) -> list[tuple[int, int]]:
    """Hand-made picks "chosen>rejected" (0-based batch indices), one or more separated by commas
    or new lines, e.g. "2>0, 2>3"; the frontend widget writes this string."""
    out = []
    for part in text.replace("\n", ",").split(","):
        part = part.strip()
        if not part:
            continue
        a, sep, b = part.partition(">")
        if not sep or not a.strip().isdigit() or not b.strip().isdigit():
            raise ValueError(f"pick {part!r}: write chosen>rejected with batch indices, e.g. 2>0")
        out.append((int(a), int(b)))
    if not out:
        raise ValueError("no picks: click a preferred and a rejected image in the node (or write e.g. 1>0)")
    for c, r in out:
        if c >= n or r >= n or c == r:
            raise ValueError(f"pick {c}>{r}: needs two different images of the batch of {n}")
    return out


# ----------------------------------------------------------------------------- host batches

def tensor_to_pil(images) -> list:
    """IMAGE batch [N, H, W, C] float in [0, 1] -> PIL RGB images (8 bit, as a PNG stores them)."""
    from PIL import Image

    arr = (images[..., :3].detach().float().cpu().clamp(0, 1).numpy() * 255).round().astype(np.uint8)
    return [Image.fromarray(np.ascontiguousarray(a)) for a in arr]


def make_local_scorer(name: str, weights: str | None, extra: str | None):
    """A scorer of evaluation.SCORERS from local paths only: `weights` is its model folder / checkpoint
    (`model_path`: what a plug-in scorer reads there is the plug-in's), `extra` the aesthetic head or
    ImageReward's med_config."""
    from .scorers import make_scorer

    kw = {"model_path": weights, "allow_pickle": False}
    if name == "laion_aesthetic":
        kw["head_path"] = extra
    elif name == "image_reward":
        kw["med_config"] = extra
    return make_scorer(name, **kw)


def score_tensor_batch(scorer, images, prompt: str) -> list[float]:
    """One score per image of an IMAGE batch for one prompt."""
    if not prompt.strip():
        raise ValueError("score images: the prompt is empty")
    pil = tensor_to_pil(images)
    return [float(x) for x in scorer.score(pil, [prompt] * len(pil))]


def scores_report(name: str, scores: list[float], order: list[int]) -> str:
    return f"{name}: " + ", ".join(f"#{i} {scores[i]:.4f}" for i in order) + " (best first)"


def collect_batch(folder: Path, images, *, prompt: str, negative_prompt: str, seed: int, model_hash: str | None,
                  by_hand: bool, picks: str = "", scores: dict | None = None, rule: str = "best_worst",
                  margin: float = 0.0) -> Collected:
    """Pairs of one IMAGE batch into `folder`: by hand (picks "c>r") or by the scores of Score Images."""
    pil = tensor_to_pil(images)
    seeds = [int(seed)] * len(pil)
    if by_hand:
        if not picks.strip():
            return Collected(0, 0, 0, folder / PAIRS_FILE, "no pair picked yet: click the preferred, then the rejected "
                                                           "thumbnail below, then queue again")
        return append_pairs(folder, pil, parse_picks(picks, len(pil)), prompt=prompt, negative_prompt=negative_prompt,
                            seeds=seeds, model_hash=model_hash, chosen_by="user")
    if scores is None:
        raise ValueError("collect pairs by score: connect the scores output of Score Images")
    if len(scores["scores"]) != len(pil):
        raise ValueError(f"collect pairs: {len(scores['scores'])} scores for {len(pil)} images")
    chosen, ties = pairs_by_score(scores["scores"], rule, margin)
    return append_pairs(folder, pil, chosen, prompt=prompt, negative_prompt=negative_prompt, seeds=seeds,
                        model_hash=model_hash, chosen_by=f"scorer:{scores['scorer']}", scores=scores["scores"],
                        near_ties=ties)
