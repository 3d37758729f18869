"""Preference pairs from a model's own samples: render (or read) K images per prompt on fixed
seeds, score each once, pair them (evaluation/pairing.py rules), write the trainer's JSONL.

Folder layout of one pairs dataset (`DIR`):

    pairs_config.json  what made the samples (model hash, sampler settings, scorer); a re-run into
                       the same DIR must match it, so scores of different settings never mix
    samples.jsonl      one line per scored sample {key, prompt, negative_prompt, seed, file, score},
                       appended atomically after each batch: the resume state
    images/*.png       the samples (`<prompt hash>_s<seed>.png`)
    pairs.jsonl        the pairs, rebuilt from samples.jsonl on every run (trainer/data/pairs.py format)
    report.md, scores.png, pairs_grid.png, summary.json

Resuming: a job (prompt, negative prompt, seed) whose key is in samples.jsonl is neither rendered
nor scored again; the rest are. The pairing rule and margin may change between runs (pairs are
recomputed from the stored scores).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..core.jsonl import append_jsonl, read_jsonl, write_jsonl
from .pairing import Pairing, Sample, make_pairs, pair_row, sample_from_row, sample_key, sample_row


@dataclass(frozen=True)
class Job:
    prompt: str
    negative_prompt: str
    seed: int

    @property
    def key(self) -> str:
        return sample_key(self.prompt, self.negative_prompt, self.seed)

    @property
    def file(self) -> str:
        h = hashlib.sha1(json.dumps([self.prompt, self.negative_prompt]).encode()).hexdigest()[:10]
        return f"images/{h}_s{self.seed}.png"


# render(jobs) -> one PIL image per job
Render = Callable[[list[Job]], list]


def plan_jobs(items: list[dict], samples_per_prompt: int, seed_start: int) -> tuple[list[Job], int]:
    """Jobs of prompt items [{prompt, negative_prompt, seeds}] and the number of duplicate items dropped.

    Item i's seeds are seeds[0] + k when it names its own seed (a .jsonl line's "seed"), else
    seed_start + i * K + k, k = 0..K-1: fixed, distinct across prompts, reproducible.
    """
    if samples_per_prompt < 2:
        raise ValueError(f"--samples-per-prompt must be >= 2 to make pairs, got {samples_per_prompt}")
    jobs, seen, dups = [], set(), 0
    for i, it in enumerate(items):
        g = (it["prompt"], it.get("negative_prompt", ""))
        if g in seen:
            dups += 1
            continue
        seen.add(g)
        s0 = int(it["seeds"][0]) if it.get("seeds") else seed_start + i * samples_per_prompt
        jobs += [Job(g[0], g[1], s0 + k) for k in range(samples_per_prompt)]
    return jobs, dups


def check_config(out: Path, config: dict) -> None:
    """Write `pairs_config.json`, or refuse a DIR whose samples were made with other settings."""
    path = out / "pairs_config.json"
    if path.is_file():
        old = json.loads(path.read_text(encoding="utf-8"))
        diff = {k: (old.get(k), config.get(k)) for k in sorted(set(old) | set(config)) if old.get(k) != config.get(k)}
        if diff:
            lines = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in ((k, *v) for k, v in diff.items()))
            raise ValueError(f"{out} holds samples made with other settings ({lines}); use a new --out "
                             "(scores of different settings must not be paired)")
        return
    if (out / "samples.jsonl").is_file():
        raise ValueError(f"{out}: samples.jsonl without pairs_config.json; use a new --out")
    tmp = out / ".pairs_config.json.tmp"
    tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def load_samples(out: Path) -> tuple[dict[str, Sample], dict]:
    """Stored samples by key (first wins) and counts of what was skipped (duplicates, torn lines)."""
    rows, skipped = read_jsonl(out / "samples.jsonl")
    done: dict[str, Sample] = {}
    for r in rows:
        try:
            s = sample_from_row(r)
        except (KeyError, TypeError, ValueError):
            skipped["bad_row"] += 1
            continue
        if s.key in done:
            skipped["duplicate_sample"] += 1
            continue
        done[s.key] = s
    return done, dict(skipped)


def _save_png(im, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    im.save(tmp, format="PNG")
    os.replace(tmp, path)


def collect(out: Path, jobs: list[Job], render: Render, scorer, *, batch_size: int = 16, progress=None) -> dict:
    """Render and score every job not yet in out/samples.jsonl, appending one batch at a time.

    Returns {"samples": [Sample] in job order, "new": n rendered and scored now, "resumed": n reused,
    "skipped": counts}. progress(n) is called after each batch.
    """
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    (out / "images").mkdir(parents=True, exist_ok=True)
    done, skipped = load_samples(out)
    todo = [j for j in jobs if j.key not in done]
    if progress is not None and len(todo) < len(jobs):
        progress(len(jobs) - len(todo))
    for i in range(0, len(todo), batch_size):
        chunk = todo[i:i + batch_size]
        images = render(chunk)
        if len(images) != len(chunk):
            raise RuntimeError(f"render returned {len(images)} images for {len(chunk)} jobs")
        for j, im in zip(chunk, images):
            _save_png(im, out / j.file)
        scores = np.asarray(scorer.score(images, [j.prompt for j in chunk]), dtype=np.float64)
        new = [Sample(j.prompt, j.negative_prompt, j.seed, j.file, float(s)) for j, s in zip(chunk, scores)]
        append_jsonl(out / "samples.jsonl", [sample_row(s) for s in new])
        done.update((s.key, s) for s in new)
        if progress is not None:
            progress(len(chunk))
    return {"samples": [done[j.key] for j in jobs], "new": len(todo), "resumed": len(jobs) - len(todo),
            "skipped": skipped}


def write_pairs(out: Path, pairing: Pairing, **provenance) -> Path:
    """out/pairs.jsonl (atomic replace) from a Pairing; `provenance` keys go on every line."""
    path = out / "pairs.jsonl"
    write_jsonl(path, [pair_row(p, **provenance) for p in pairing.pairs])
    return path


# ----------------------------------------------------------------------------- report

def summarize(samples: list[Sample], pairing: Pairing, rule: str, margin: float) -> dict:
    s = np.asarray([x.score for x in samples], dtype=np.float64)
    q = np.quantile(s, [0, 0.25, 0.5, 0.75, 1]).tolist() if len(s) else [float("nan")] * 5
    per = list(pairing.per_group.values())
    return {"samples": len(samples), "prompts": len(pairing.per_group), "pairs": len(pairing.pairs),
            "candidates": pairing.candidates, "near_ties": pairing.near_ties, "rule": rule, "margin": margin,
            "skipped": dict(pairing.skipped), "score": {"mean": float(s.mean()) if len(s) else float("nan"),
                                                        "std": float(s.std()) if len(s) else float("nan"),
                                                        "quantiles": dict(zip(("min", "q25", "median", "q75", "max"), q))},
            "pairs_per_prompt": {"min": min(per, default=0), "max": max(per, default=0),
                                 "mean": float(np.mean(per)) if per else 0.0,
                                 "no_pair": sum(1 for v in per if v == 0)},
            "mean_margin": float(np.mean([p.margin for p in pairing.pairs])) if pairing.pairs else 0.0}


def plot_scores(samples: list[Sample], pairing: Pairing, path: Path, scorer: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.hist([x.score for x in samples], bins=30, color="#888", label="all samples")
    if pairing.pairs:
        ax.hist([p.chosen.score for p in pairing.pairs], bins=30, histtype="step", color="tab:green", label="chosen")
        ax.hist([p.rejected.score for p in pairing.pairs], bins=30, histtype="step", color="tab:red", label="rejected")
    ax.set_xlabel(scorer)
    ax.set_ylabel("samples")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def pairs_grid(out: Path, pairing: Pairing, path: Path, n: int = 16, cell: int = 64) -> Path | None:
    """First n pairs as rows: chosen | rejected, each upsampled (nearest) to `cell` pixels."""
    from PIL import Image

    from ..diffusers_host.generate import make_grid

    if not pairing.pairs:
        return None

    def load(f):
        with Image.open(out / f) as im:
            return im.convert("RGB").resize((cell, cell), Image.NEAREST)
    grid = make_grid([[load(p.chosen.file), load(p.rejected.file)] for p in pairing.pairs[:n]])
    grid.save(path)
    return path


def write_report(out: Path, samples: list[Sample], pairing: Pairing, summary: dict, scorer: str) -> Path:
    from ..core.stats import markdown_table

    plot_scores(samples, pairing, out / "scores.png", scorer)
    grid = pairs_grid(out, pairing, out / "pairs_grid.png")
    q = summary["score"]["quantiles"]
    rows = [{"prompt": g[0] + (f" (negative: {g[1]})" if g[1] else ""), "pairs": k} for g, k in pairing.per_group.items()]
    lines = [
        f"# Preference pairs ({scorer})", "",
        f"{summary['samples']} samples of {summary['prompts']} prompts; rule `{summary['rule']}`, margin "
        f"{summary['margin']}: {summary['pairs']} pairs kept of {summary['candidates']} candidates, "
        f"{summary['near_ties']} near-ties dropped; {summary['pairs_per_prompt']['no_pair']} prompts gave no pair. "
        f"Mean score margin of the kept pairs: {summary['mean_margin']:.4f}.", "",
        f"Scores: mean {summary['score']['mean']:.4f}, std {summary['score']['std']:.4f}, min {q['min']:.4f}, "
        f"quartiles {q['q25']:.4f} / {q['median']:.4f} / {q['q75']:.4f}, max {q['max']:.4f}.", "",
        "![scores](scores.png)", "",
    ]
    if grid is not None:
        lines += [f"First {min(16, len(pairing.pairs))} pairs, chosen (left) and rejected (right):", "",
                  "![pairs](pairs_grid.png)", ""]
    lines += ["## Pairs per prompt", "", markdown_table(rows, [("prompt", "prompt"), ("pairs", "pairs")])]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return path


def build_dataset(out: Path, jobs: list[Job], render: Render, scorer, *, scorer_name: str, rule: str, margin: float,
                  config: dict, batch_size: int = 16, progress=None, extra: dict | None = None) -> dict:
    """The whole pipeline into `out`: check settings, collect (resumable), pair, write pairs + report."""
    out.mkdir(parents=True, exist_ok=True)
    check_config(out, config)
    got = collect(out, jobs, render, scorer, batch_size=batch_size, progress=progress)
    pairing = make_pairs(got["samples"], rule, margin)
    path = write_pairs(out, pairing, scorer=scorer_name, chosen_by=f"scorer:{scorer_name}", rule=rule,
                       model_hash=config.get("model_hash"))
    summary = {**summarize(got["samples"], pairing, rule, margin), "new": got["new"], "resumed": got["resumed"],
               "skipped_sample_rows": got["skipped"], **(extra or {})}
    write_report(out, got["samples"], pairing, summary, scorer_name)
    return {**summary, "pairs_file": str(path), "report": str(out / "report.md")}
