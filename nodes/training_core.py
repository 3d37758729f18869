"""What the training nodes do, in plain Python (no ComfyUI import): datasets, config, run, outputs.

The nodes (`nodes/training.py`) are thin shells over these functions; the run itself is the
project's one loop, `trainer.loop.train`, on a `ComfyBackend` (trainer/backends/comfy.py), so
a LoRA trained in ComfyUI and one trained by `python -m npo_suite train` are the same computation.

Paths: every file name a node receives is relative to one of ComfyUI's own folders; absolute
paths and `..` are rejected (`safe_name`), and resolved paths must stay inside the folder.
"""
from __future__ import annotations

import csv
import hashlib
import io
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..core.paths import inside, safe_relative_name as safe_name  # noqa: F401  (safe_name: used by the nodes)
from ..trainer.data.records import DataSummary, PairRecord, PromptRecord

DATASET_SUFFIXES = (".jsonl", ".txt", ".parquet")
RUNS_SUBDIR = "npo_suite_runs"  # inside ComfyUI's output folder: one folder per output name


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
    from ..trainer.data.pairs import open_pairs
    from ..trainer.data.prompts import open_prompts

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
    from ..trainer.data.prompts import line_id

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
    from ..trainer.ddspo import perturb_prompt

    lines = []
    for i, r in enumerate(data.records[:n]):
        lines.append(f"{r.prompt}\n  -> {perturb_prompt(r.prompt, seed + i, min_frac, max_frac)!r}")
    return "\n".join(lines)


def preview_images(data: PreferenceData, k: int = 4, size: int = 128) -> torch.Tensor | None:
    """Up to k pairs side by side (chosen | rejected), or k prompt images: IMAGE [k, size, 2*size or size, 3]."""
    import numpy as np

    from ..trainer.data.records import load_image

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


# ---------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------
def data_kind_of(method: str) -> str:
    from ..trainer.methods import METHODS

    return "pairs" if METHODS[method].data_kind == "pairs" else "prompts"


def check_data(method: str, data: PreferenceData) -> None:
    want = data_kind_of(method)
    if data.kind != want:
        hint = "a Preference Dataset" if want == "pairs" else "a Prompt List"
        raise ValueError(f"method {method!r} trains on {want}, but the dataset holds {data.kind}: connect {hint}")


def build_stream(data: PreferenceData, cfg, backend, cache_dir: str | None):
    """The resumable batch stream of `trainer.stream`, over in-memory records: everything is
    encoded once up front (VAE, CLIP), so the UNet stays loaded during the steps."""
    from functools import partial

    from ..trainer.data.cache import LatentCache
    from ..trainer.data.dataset import PairDataset, PromptDataset, ResumableSampler, collate_pairs, collate_prompts
    from ..trainer.data.transforms import ImageTransform
    from ..trainer.stream import BatchStream

    transform = ImageTransform(cfg.resolution, cfg.crop, "random" if cfg.random_flip else "none", seed=cfg.seed)
    cache = LatentCache.from_backend(cache_dir, backend_fingerprint(backend), backend, transform)
    encoded = DataSummary("encode")
    records = cache.fill(data.records, verbose=False, summary=encoded)
    data.summary.skipped.update(encoded.skipped)
    if not records:
        raise ValueError(f"dataset {data.source}: no record could be read\n{data.report()}")
    sampler = ResumableSampler(len(records), seed=cfg.seed, batch_size=cfg.batch_size)
    if data.kind == "pairs":
        return BatchStream(PairDataset(records, cache), sampler, collate_pairs, cfg.batch_size)
    shape = tuple(backend.encode_images(torch.zeros(1, 3, cfg.resolution, cfg.resolution)).shape[1:]) \
        if getattr(backend, "_encode_pixels", None) is not None else (4, cfg.resolution // 8, cfg.resolution // 8)
    return BatchStream(PromptDataset(records, cache), sampler, partial(collate_prompts, latent_shape=shape),
                       cfg.batch_size)


def backend_fingerprint(backend) -> str:
    """Cache key of the encoders: the text encoding of a probe prompt and the family (file-name safe)."""
    probe = backend.encode_prompts(["npo suite cache probe"]).hidden.float().cpu()
    h = hashlib.sha256(f"{backend.family}|{tuple(probe.shape)}".encode())
    h.update(probe.flatten()[:: max(1, probe.numel() // 4096)].numpy().tobytes())
    return h.hexdigest()[:16]


CONFIG_KEYS = ("method", "beta", "lam", "snpo_p", "steps", "lr", "batch_size", "grad_accum", "resolution", "optimizer",
               "gradient_checkpointing", "seed", "ref_update_every", "ref_bound", "ref_on_exceed",
               "timestep_sampler", "timestep_weight", "checkpoint_every")


def node_config(options: dict, run_dir: str, init_lora_path: str | None):
    """TrainConfig from the node's widgets (+ the `extra` lines): the CLI's config type and checks."""
    import yaml

    from ..trainer.config import from_dict

    extra = yaml.safe_load(options.get("extra") or "") or {}
    if not isinstance(extra, dict):
        raise ValueError("extra: expected 'key: value' lines (YAML mapping)")
    d = {k: options[k] for k in CONFIG_KEYS if k in options}
    d.update(lora_rank=options["rank"], lora_alpha=float(options["rank"]), lora_targets=options["targets"],
             mixed_precision=options["precision"], lora_init=init_lora_path or "", output_dir=run_dir,
             output_name=safe_name(options["output_name"], "output_name"), log_every=1, validate_every=0)
    d.update(extra)
    return from_dict(d, source="Train Preference LoRA")



@dataclass
class RunOutcome:
    lora_path: Path | None
    offset: Any
    steps_done: int
    interrupted: bool
    run_dir: Path
    losses: list[tuple[int, float]]
    report: str


def prepare_run_dir(run_dir: Path, resume: bool) -> str | None:
    """`resume`: continue from the run's latest checkpoint (None if it has none). Otherwise start
    over: that run's old checkpoints are removed so they cannot mix with the new run."""
    from ..trainer import checkpoint as ckpt

    ck = ckpt.checkpoints_dir(run_dir)
    if resume and (ck / ckpt.LATEST).is_file():
        return ckpt.LATEST
    if not resume and ck.is_dir():
        shutil.rmtree(ck)
    for name in ("metrics.csv",):
        if not resume and (run_dir / name).is_file():
            (run_dir / name).unlink()
    return None


def run_training(backend, data: PreferenceData, cfg, *, resume: bool, cache_dir: str | None,
                 stop_requested: Callable[[], bool] | None = None,
                 progress: Callable[[int, int, float], None] | None = None) -> RunOutcome:
    """Train on an already-built backend (the caller closes it). Writes the LoRA into cfg.output_dir."""
    from ..trainer.loop import Callbacks, train

    check_data(cfg.method, data)
    run_dir = Path(cfg.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    resume_from = prepare_run_dir(run_dir, resume)
    stream = build_stream(data, cfg, backend, cache_dir)
    result = train(cfg, backend=backend, callbacks=Callbacks(stop_requested, progress), data=stream, resume=resume_from)
    offset = None
    if result.steps_done > 0:
        offset = backend.export_offset()
        offset.metadata = {"npo_suite.method": cfg.method, "npo_suite.steps": str(result.steps_done)}
    losses = read_losses(run_dir / "metrics.csv")
    state = "interrupted" if result.interrupted else "finished"
    report = (f"{cfg.method}: {state} at step {result.steps_done}/{cfg.steps}"
              + (f", loss {result.last_metrics['loss']:.4f}" if "loss" in result.last_metrics else "")
              + (" (resumed)" if resume_from else "") + f"\n{data.report()}")
    return RunOutcome(result.lora_path, offset, result.steps_done, result.interrupted, run_dir, losses, report)


def read_losses(path: Path) -> list[tuple[int, float]]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [(int(r["step"]), float(r["loss"])) for r in csv.DictReader(f) if r.get("loss") not in (None, "")]


def publish_lora(src: Path, loras_dir: str, name: str) -> Path:
    """Copy the trained LoRA into ComfyUI's loras folder atomically (temp file + os.replace)."""
    dst = inside(loras_dir, f"{safe_name(name, 'output name')}.safetensors", "output name")
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent)
    os.close(fd)
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return dst


def loss_curve_image(losses: list[tuple[int, float]], title: str = "loss") -> torch.Tensor:
    """IMAGE [1, H, W, 3] in [0, 1]: the per-step loss (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from PIL import Image

    fig, ax = plt.subplots(figsize=(5, 3), dpi=100)
    if losses:
        ax.plot([s for s, _ in losses], [v for _, v in losses], marker="o" if len(losses) < 30 else None)
    ax.set_xlabel("step")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    img = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(img)[None]  # [1, H, W, 3]
