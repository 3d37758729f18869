"""The `ddspo-prepare` folder format: what ddspo-prepare (diffusers_host/ddspo_prepare.py) and the digits
world (world/pairs.py) write and the trainer (trainer/data/ddspo_dataset.py) reads.

    ddspo_config.json               generation settings (`PrepareConfig`; a rerun with other settings is refused)
    latents/<h[:2]>/<h>.safetensors latents_w [C, h, w] (+ latents_l), h = sha1(id) (`latents_relpath`)
    manifest.d/part-*.jsonl         one file per finished chunk, written atomically
    manifest.jsonl                  all entries, written atomically when a run completes
Entry: {"id", "prompt", "neg_prompt", "seed", "files": {"latents": ..., "image_w"?, "image_l"?}}.
Each item's noise seed is derived from (seed, id) (`item_seed`), independent of batching.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .atomic import write_text
from .jsonl import iter_jsonl

CONFIG_NAME, MANIFEST_NAME, PARTS_DIR = "ddspo_config.json", "manifest.jsonl", "manifest.d"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class PrepareConfig:
    """Settings that determine the generated data (stored in ddspo_config.json)."""

    model: str
    losers: str = "generate"  # "generate" | "none" (efficient variant)
    rewriter: str = "drop_words"
    min_frac: float = 0.4
    max_frac: float = 0.7
    rewriter_path: str | None = None
    steps: int = 25
    cfg: float | None = None  # None: 7.5 (SD1.x) / 5.0 (SDXL), the paper's settings
    height: int | None = None  # None: the model's default size
    width: int | None = None
    seed: int = 0
    store_dtype: str = "float16"

    def __post_init__(self):
        if self.losers not in ("generate", "none"):
            raise ValueError(f"losers must be 'generate' or 'none', got {self.losers!r}")
        if self.store_dtype not in DTYPES:
            raise ValueError(f"store_dtype must be one of {sorted(DTYPES)}, got {self.store_dtype!r}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")


def item_seed(seed: int, record_id: str) -> int:
    """The noise seed of one item: a pure function of (run seed, id), independent of batching."""
    return int.from_bytes(hashlib.sha256(f"{seed}\0{record_id}".encode("utf-8")).digest()[:7], "little")


def other_index(seed: int, epoch: int, i: int, n: int) -> int:
    """Another item's index j != i of n >= 2, a pure function of (seed, epoch, i): DDSPO's
    efficient variant pairs prompt i with another prompt's image, a new one each epoch."""
    return (i + 1 + item_seed(seed, f"{epoch}:{i}") % (n - 1)) % n


def latents_relpath(record_id: str) -> str:
    h = hashlib.sha1(record_id.encode("utf-8")).hexdigest()
    return f"latents/{h[:2]}/{h}.safetensors"




def read_manifest(out_dir: str | os.PathLike) -> list[dict]:
    """Finished entries (manifest.jsonl, then the parts), de-duplicated by id, in finishing order;
    entries whose latents file is gone are dropped (they will be redone). A corrupt line raises ValueError."""
    out = Path(out_dir)
    files = [out / MANIFEST_NAME] if (out / MANIFEST_NAME).is_file() else []
    files += sorted((out / PARTS_DIR).glob("part-*.jsonl")) if (out / PARTS_DIR).is_dir() else []
    entries: dict[str, dict] = {}
    for f in files:
        for _, e in iter_jsonl(f):
            if (out / e["files"]["latents"]).is_file():
                entries.setdefault(e["id"], e)
    return list(entries.values())


def check_config(out: Path, cfg: PrepareConfig) -> None:
    """Record `cfg` in out/ddspo_config.json, or refuse (ValueError) a folder generated with other settings."""
    path = out / CONFIG_NAME
    want = asdict(cfg)
    if path.is_file():
        have = json.loads(path.read_text(encoding="utf-8"))
        diff = {k: (have.get(k), v) for k, v in want.items() if have.get(k) != v}
        if diff:
            raise ValueError(f"{path}: this folder was generated with other settings {diff} "
                             f"(saved, requested); use another --out or the same settings")
    else:
        write_text(path, json.dumps(want, indent=2) + "\n")


def is_prepared(path: str | os.PathLike) -> bool:
    """True for a `ddspo-prepare` output folder (it holds ddspo_config.json)."""
    return (Path(path) / CONFIG_NAME).is_file()
