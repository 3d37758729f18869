"""Preference pairs of the digits world, labelled by the world's reward from the base model's own
samples (same prompt, two seeds; near-ties dropped), as the project's JSONL pair format:

    {"prompt": ..., "chosen": "images/p0003_s17.png", "rejected": "images/p0003_s18.png", ...}

Image paths are relative to the JSONL file; images are 8x8 grey PNGs (upsample only for viewing).
Extra keys (rewards, seeds) are informative; readers need only prompt/chosen/rejected.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..core.jsonl import iter_jsonl, write_jsonl

from .build import all_prompts, parse_prompt

# sample_fn(prompts, seeds) -> images [N, 8, 8] float in [0, 1]
SampleFn = Callable[[list[str], list[int]], torch.Tensor]


@dataclass
class PairStats:
    prompts: int
    samples: int
    pairs: int
    dropped_ties: int
    mean_margin: float
    path: Path


def to_png(image01, path: Path) -> None:
    """[8, 8] in [0, 1] -> 8-bit grey PNG (exactly 8x8)."""
    from PIL import Image

    a = np.asarray(image01.detach().cpu() if hasattr(image01, "detach") else image01, dtype=np.float64)
    Image.fromarray(np.round(np.clip(a, 0, 1) * 255).astype(np.uint8), mode="L").save(path)


def load_png01(path) -> np.ndarray:
    """An 8-bit grey PNG -> [H, W] float in [0, 1]."""
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("L"), dtype=np.float64) / 255.0


def quantize01(images01: torch.Tensor) -> torch.Tensor:
    """Round to the 8-bit grid a PNG stores, so scores of saved and in-memory images agree."""
    return torch.round(images01.clamp(0, 1) * 255) / 255


def make_pairs(sample_fn: SampleFn, reward, out_dir: str | os.PathLike, *, prompts: list[str] | None = None,
               samples_per_prompt: int = 8, tie_margin: float = 0.05, seed_offset: int = 100_000,
               batch: int = 256) -> PairStats:
    """Sample `samples_per_prompt` images per prompt, pair seeds (0,1), (2,3), ... of each prompt,
    keep the pairs whose reward differs by more than `tie_margin` (winner = higher p(class | x)),
    and write `out_dir/pairs.jsonl` + `out_dir/images/*.png`.

    Seeds start at `seed_offset` so the training pairs never share a seed with evaluation seeds.
    """
    prompts = list(prompts or all_prompts())
    if samples_per_prompt < 2 or samples_per_prompt % 2:
        raise ValueError(f"samples_per_prompt must be an even number >= 2, got {samples_per_prompt}")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rows_p, rows_s = [], []
    for i, p in enumerate(prompts):
        if parse_prompt(p)[0] is None:
            raise ValueError(f"pair prompt {p!r} names no digit class, so the world's reward cannot label it")
        for k in range(samples_per_prompt):
            rows_p.append(p)
            rows_s.append(seed_offset + i * samples_per_prompt + k)
    images = torch.cat([quantize01(sample_fn(rows_p[j:j + batch], rows_s[j:j + batch]).float())
                        for j in range(0, len(rows_p), batch)])  # [N, 8, 8]
    labels = [parse_prompt(p)[0] for p in rows_p]
    r = reward.reward(images.reshape(len(images), -1).numpy(), labels)  # [N]
    lines, dropped, margins = [], 0, []
    for j in range(0, len(rows_p), 2):
        a, b = j, j + 1
        if abs(r[a] - r[b]) <= tie_margin:
            dropped += 1
            continue
        w, l = (a, b) if r[a] > r[b] else (b, a)
        names = []
        for idx in (w, l):
            name = f"images/p{prompts.index(rows_p[idx]):03d}_s{rows_s[idx]}.png"
            to_png(images[idx], out / name)
            names.append(name)
        margins.append(float(r[w] - r[l]))
        lines.append({"prompt": rows_p[w], "chosen": names[0], "rejected": names[1],
                      "reward_chosen": round(float(r[w]), 6), "reward_rejected": round(float(r[l]), 6),
                      "seed_chosen": rows_s[w], "seed_rejected": rows_s[l]})
    path = write_jsonl(out / "pairs.jsonl", lines, ensure_ascii=True)
    return PairStats(len(prompts), len(rows_p), len(lines), dropped, float(np.mean(margins)) if margins else 0.0, path)


def read_pairs(path: str | os.PathLike) -> list[dict]:
    """The pairs of a JSONL file with image paths resolved against its folder (for checks and tests)."""
    p = Path(path)
    out = []
    for n, rec in iter_jsonl(p):
        missing = [k for k in ("prompt", "chosen", "rejected") if k not in rec]
        if missing:
            raise ValueError(f"{p}:{n}: missing {', '.join(missing)}")
        rec["chosen_path"], rec["rejected_path"] = p.parent / rec["chosen"], p.parent / rec["rejected"]
        out.append(rec)
    return out


def write_real_images(split, out_dir: str | os.PathLike) -> Path:
    """The real digits of a split (build.DigitsSplit) as `prompts.jsonl` {"prompt", "image"} + PNGs: the
    images TDFT noises when given images (Self-NPO's real-image starts). The prompt names the style
    word where the digit has one (the base model was trained on both forms)."""
    from .build import prompt_for

    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for i, (idx, im, label, style) in enumerate(zip(split.indices, split.images, split.labels, split.styles)):
        name = f"images/real_{int(idx):04d}.png"
        to_png(im / 16.0, out / name)
        records.append({"prompt": prompt_for(int(label), style), "image": name, "digits_index": int(idx)})
    return write_jsonl(out / "prompts.jsonl", records, ensure_ascii=True)


def make_ddspo_data(sample_fn: SampleFn, rewriter, out_dir: str | os.PathLike, *, prompts: list[str] | None = None,
                    samples_per_prompt: int = 8, seed_offset: int = 200_000, batch: int = 256,
                    settings: dict | None = None) -> Path:
    """DDSPO's pairs as its paper makes them (seed 003 §3.3): for each prompt c and seed, the winner is
    the base model's image for c and the loser its image for c⁻ = rewriter(c) from the SAME initial
    noise. Written as a `ddspo-prepare` folder (core/ddspo_format.py: ddspo_config.json,
    latents/ with latents_w and latents_l in the world's model space [1, 8, 8], manifest.jsonl),
    read with ddspo_loser "generated"; the PNGs are kept under images/ for viewing. `settings`:
    PrepareConfig fields recorded in ddspo_config.json (how the images were sampled). Seeds start at
    `seed_offset` (never an evaluation or a pair seed). Returns the folder."""
    from ..core.atomic import save_item
    from ..core.ddspo_format import MANIFEST_NAME, PrepareConfig, check_config, latents_relpath

    prompts = list(prompts or all_prompts())
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    check_config(out, PrepareConfig(**{"store_dtype": "float32", **(settings or {})}))
    rows_p = [p for p in prompts for _ in range(samples_per_prompt)]
    rows_s = [seed_offset + i for i in range(len(rows_p))]
    negs = rewriter(rows_p, rows_s)
    entries = []
    for j in range(0, len(rows_p), batch):
        ps, ns, ss = rows_p[j:j + batch], negs[j:j + batch], rows_s[j:j + batch]
        win, lose = (quantize01(sample_fn(x, ss).float()) for x in (ps, ns))  # [n, 8, 8] each in [0, 1]
        for p, n, s, w, l in zip(ps, ns, ss, win, lose):
            rid = f"p{prompts.index(p):03d}_s{s}"
            rel = latents_relpath(rid)
            save_item(out / rel, {"latents_w": (w * 2 - 1)[None], "latents_l": (l * 2 - 1)[None]},  # [1, 8, 8] in [-1, 1]
                      {"id": rid, "prompt": p, "neg_prompt": n, "seed": str(s)})
            images = {"image_w": f"images/{rid}_w.png", "image_l": f"images/{rid}_l.png"}
            to_png(w, out / images["image_w"])
            to_png(l, out / images["image_l"])
            entries.append({"id": rid, "prompt": p, "neg_prompt": n, "seed": s, "files": {"latents": rel, **images}})
    write_jsonl(out / MANIFEST_NAME, entries, ensure_ascii=True)
    return out
