"""The datasets of the ComfyUI training nodes (Preference Dataset, Prompt List): a dataset file or
folder chosen by name in the datasets folder, IMAGE tensors (chosen/rejected), a typed prompt list.
Each becomes a `PreferenceData` (records + a counted summary of what was skipped); the records
come from the trainer's sources (`trainer/data/pairs.py`, `trainer/data/prompts.py`).

Paths: every name is relative to a root folder the host owns; absolute paths and `..` are
rejected (`safe_name`), and resolved paths must stay inside the folder."""
from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ...core.paths import inside
from ...core.prompts import PromptRecord
from ...core.summary import DataSummary
from ...trainer.data.records import PairRecord

DATASET_SUFFIXES = (".jsonl", ".txt", ".parquet")


# ---------------------------------------------------------------------------------------------
# paths
# ---------------------------------------------------------------------------------------------
def list_datasets(roots: list[str]) -> list[str]:
    """Dataset choices: sub-folders and .jsonl/.txt/.parquet files at the top of each datasets folder."""
    out: set[str] = set()
    for r in roots:
        if not os.path.isdir(r):
            continue
        for entry in sorted(os.scandir(r), key=lambda e: e.name):
            if entry.name.startswith("."):
                continue
            if entry.is_dir() or entry.name.lower().endswith(DATASET_SUFFIXES):
                out.add(entry.name)
    return sorted(out)


def resolve_dataset(roots: list[str], name: str) -> Path:
    for r in roots:
        p = inside(r, name, "dataset")
        if p.exists():
            return p
    raise FileNotFoundError(f"dataset {name!r}: not found in the datasets folder(s) {roots}")


# ---------------------------------------------------------------------------------------------
# datasets
# ---------------------------------------------------------------------------------------------
@dataclass
class PreferenceData:
    """Records for the trainer: pairs (DPO family) or prompts (TDFT, DDSPO), with their counts."""

    kind: str  # "pairs" | "prompts"
    records: list
    source: str
    summary: DataSummary = field(default_factory=DataSummary)

    def __post_init__(self) -> None:
        if self.kind not in ("pairs", "prompts"):
            raise ValueError(f"dataset kind {self.kind!r}: expected 'pairs' or 'prompts'")
        if not self.records:
            raise ValueError(f"dataset {self.source}: no usable records\n{self.summary.report()}")

    def counts(self) -> dict[str, int]:
        return {"records": len(self.records), "skipped": self.summary.total_skipped,
                "ties": int(self.summary.skipped.get("tie", 0))}

    def report(self) -> str:
        c = self.counts()
        noun = "pairs" if self.kind == "pairs" else "prompts"
        lines = [f"{self.source}: {c['records']} {noun}, {c['skipped']} skipped ({c['ties']} ties)"]
        lines += self.summary.report().splitlines()[1:]
        return "\n".join(lines)

    def fingerprint(self) -> str:
        return hashlib.sha256("\n".join(r.id for r in self.records).encode()).hexdigest()[:16]


def dataset_from_path(path: Path, kind: str, name: str) -> PreferenceData:
    """A pairs source (JSONL, chosen/ + rejected/ folders, Pick-a-Pic parquet) or a prompts source.

    A pairs folder with neither chosen/ nor .parquet files but exactly one .jsonl at its top (the JSONL
    with its images beside it, the layout `list_datasets` offers as a sub-folder) opens that JSONL."""
    from ...trainer.data.pairs import open_pairs
    from ...trainer.data.prompts import open_prompts

    if kind == "pairs" and path.is_dir() and not (path / "chosen").is_dir() and not any(path.glob("*.parquet")):
        jsonl = sorted(f for f in path.iterdir() if f.is_file() and f.suffix.lower() == ".jsonl")
        if len(jsonl) != 1:
            raise ValueError(f"dataset {name!r} ({path}): a pairs folder needs chosen/ + rejected/ sub-folders, "
                             f".parquet files or exactly one .jsonl file (found {len(jsonl)} .jsonl files)")
        path = jsonl[0]
    src = (open_pairs if kind == "pairs" else open_prompts)(str(path), verbose=False)
    records = list(src)
    return PreferenceData(kind, records, name, src.summary)


def _pil(image: torch.Tensor):
    """[H, W, C] float in [0, 1] -> PIL RGB."""
    import numpy as np
    from PIL import Image

    arr = (image[..., :3].detach().float().cpu().clamp(0, 1).numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(arr))


def _png(image: torch.Tensor) -> bytes:
    """[H, W, C] in [0, 1] -> PNG bytes (lossless at 8 bit; a bytes ImageSource has a content-hash cache tag)."""
    buf = io.BytesIO()
    _pil(image).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def dataset_from_images(chosen: torch.Tensor, rejected: torch.Tensor, prompts: list[str]) -> PreferenceData:
    """Pairs from two IMAGE batches [N, H, W, C] in [0, 1] (row i of chosen beats row i of rejected).

    `prompts`: one prompt for all pairs or one per pair. Ids are content hashes, so the same
    images give the same ids (stable cache entries and resumable data order).
    """
    if chosen.ndim != 4 or rejected.ndim != 4:
        raise ValueError(f"chosen/rejected must be IMAGE batches [N, H, W, C], got {tuple(chosen.shape)} and {tuple(rejected.shape)}")
    if chosen.shape[0] != rejected.shape[0]:
        raise ValueError(f"chosen has {chosen.shape[0]} images, rejected has {rejected.shape[0]}: they pair row by row")
    prompts = [p.strip() for p in prompts if p.strip()]
    if len(prompts) not in (1, chosen.shape[0]):
        raise ValueError(f"{len(prompts)} prompts for {chosen.shape[0]} pairs: give one prompt or one per line per pair")
    summary = DataSummary("images")
    records = []
    for i in range(chosen.shape[0]):
        w, l_ = _png(chosen[i]), _png(rejected[i])
        prompt = prompts[0] if len(prompts) == 1 else prompts[i]
        rid = hashlib.sha1(w + l_ + prompt.encode()).hexdigest()[:16]
        if any(r.id == rid for r in records):
            summary.skip("duplicate_id", rid)
            continue
        records.append(PairRecord(rid, prompt, w, l_))
        summary.keep()
    return PreferenceData("pairs", records, f"{len(records)} image pairs", summary)


def prompt_list(text: str, images: torch.Tensor | None = None) -> PreferenceData:
    """Prompts, one per line (blank lines and `#` comments skipped); `images` [N, H, W, C] optional:
    one per prompt (TDFT starts from them, DDSPO uses them as winners)."""
    from ...core.prompts import line_id

    summary = DataSummary("prompts")
    lines = [(n, s.strip()) for n, s in enumerate(text.splitlines(), 1)]
    prompts = []
    for n, s in lines:
        if not s or s.startswith("#"):
            if not s:
                summary.skip("empty_prompt", f"line {n}")
            continue
        prompts.append((n, s))
    if images is not None and images.shape[0] != len(prompts):
        raise ValueError(f"{images.shape[0]} images for {len(prompts)} prompts: give one image per prompt (or none)")
    records = []
    for i, (n, p) in enumerate(prompts):
        img = None if images is None else _png(images[i])
        rid = line_id(n, p) if img is None else f"{line_id(n, p)}-{hashlib.sha1(img).hexdigest()[:8]}"
        records.append(PromptRecord(rid, p, img))
        summary.keep()
    return PreferenceData("prompts", records, f"{len(records)} prompts", summary)


def ddspo_preview(data: PreferenceData, seed: int, min_frac: float, max_frac: float, n: int = 4) -> str:
    """The DDSPO degraded prompt c⁻ (seed 003 app. G, random word removal) of the first prompts."""
    from ...trainer.ddspo import perturb_prompt

    lines = []
    for i, r in enumerate(data.records[:n]):
        lines.append(f"{r.prompt}\n  -> {perturb_prompt(r.prompt, seed + i, min_frac, max_frac)!r}")
    return "\n".join(lines)


def preview_images(data: PreferenceData, k: int = 4, size: int = 128) -> torch.Tensor | None:
    """Up to k pairs side by side (chosen | rejected), or k prompt images: IMAGE [k, size, 2*size or size, 3]."""
    import numpy as np

    from ...trainer.data.records import load_image

    tiles = []
    for r in data.records[:k]:
        srcs = [r.chosen, r.rejected] if data.kind == "pairs" else ([r.image] if r.image is not None else [])
        if not srcs:
            continue
        try:
            ims = [load_image(s).convert("RGB").resize((size, size)) for s in srcs]
        except ValueError:  # BadRecord: shown in the counts, not in the preview
            continue
        tiles.append(np.concatenate([np.asarray(im, dtype=np.float32) / 255.0 for im in ims], axis=1))
    if not tiles:
        return None
    return torch.from_numpy(np.stack(tiles))  # [k, size, w, 3]


