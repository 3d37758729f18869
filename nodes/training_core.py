"""What the training nodes do, in plain Python (no ComfyUI import): datasets, config, run, outputs.

The nodes (`nodes/training.py`) are thin shells over these functions; the run itself is the
project's one loop, `trainer.loop.train`, on a `ComfyBackend` (trainer/backends/comfy.py), so
a LoRA trained in ComfyUI and one trained by `python -m npo_suite train` are the same computation.

Paths: every file name a node receives is relative to one of ComfyUI's own folders; absolute
paths and `..` are rejected (`safe_name`), and resolved paths must stay inside the folder.
"""
from __future__ import annotations

import csv
import gc
import hashlib
import io
import math
import os
import shutil
import tempfile
import time
import traceback
from collections import deque
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


VALIDATION_PROMPTS_FROM_DATA = 2  # validate_every > 0 and no validation_prompts: the dataset's first prompts


def validation_prompts_of(options: dict, data: PreferenceData | None) -> list[str]:
    """The node's `validation_prompts` (one per line, `#` comments skipped), else the dataset's first prompts."""
    lines = [s.strip() for s in (options.get("validation_prompts") or "").splitlines()]
    prompts = [s for s in lines if s and not s.startswith("#")]
    if not prompts and data is not None:
        prompts = list(dict.fromkeys(r.prompt for r in data.records if r.prompt))[:VALIDATION_PROMPTS_FROM_DATA]
    return prompts or [""]


CONFIG_KEYS = ("method", "beta", "lam", "snpo_p", "steps", "lr", "batch_size", "grad_accum", "resolution", "optimizer",
               "gradient_checkpointing", "seed", "ref_update_every", "ref_bound", "ref_on_exceed",
               "timestep_sampler", "timestep_weight", "checkpoint_every")


def node_config(options: dict, run_dir: str, init_lora_path: str | None, data: PreferenceData | None = None):
    """TrainConfig from the node's widgets (+ the `extra` lines): the CLI's config type and checks.

    `validate_every` (0 = off, the default) and `validation_prompts` are optional node inputs; with
    validation on and no prompts typed, the grid uses the dataset's first prompts."""
    import yaml

    from ..trainer.config import from_dict

    extra = yaml.safe_load(options.get("extra") or "") or {}
    if not isinstance(extra, dict):
        raise ValueError("extra: expected 'key: value' lines (YAML mapping)")
    d = {k: options[k] for k in CONFIG_KEYS if k in options}
    d.update(lora_rank=options["rank"], lora_alpha=float(options["rank"]), lora_targets=options["targets"],
             mixed_precision=options["precision"], lora_init=init_lora_path or "", output_dir=run_dir,
             output_name=safe_name(options["output_name"], "output_name"), log_every=1,
             validate_every=int(options.get("validate_every") or 0))
    if d["validate_every"]:
        d["validation_prompts"] = validation_prompts_of(options, data)
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
    validation: Path | None = None  # the run's last validation grid (validation/step_N.png), if any


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
    if not resume and (run_dir / "validation").is_dir():
        shutil.rmtree(run_dir / "validation")
    return None


def last_validation_grid(run_dir: Path) -> Path | None:
    """validation/step_N.png with the largest N (the trainer's grid), or None."""
    grids = sorted((run_dir / "validation").glob("step_*.png")) if (run_dir / "validation").is_dir() else []
    return grids[-1] if grids else None


def run_training(backend, data: PreferenceData, cfg, *, resume: bool, cache_dir: str | None,
                 stop_requested: Callable[[], bool] | None = None,
                 progress: Callable[[int, int, float], None] | None = None,
                 on_ready: Callable[[Any], None] | None = None) -> RunOutcome:
    """Train on an already-built backend (the caller closes it). Writes the LoRA into cfg.output_dir.

    `on_ready(backend)` runs after the data is encoded, right before the first step (the ComfyUI
    node asks model management for the training working set there)."""
    from ..trainer.loop import Callbacks, train

    check_data(cfg.method, data)
    run_dir = Path(cfg.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    resume_from = prepare_run_dir(run_dir, resume)
    stream = build_stream(data, cfg, backend, cache_dir)
    if on_ready is not None:
        on_ready(backend)
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
    grid = last_validation_grid(run_dir) if cfg.validate_every else None
    if grid is not None:
        report += f"\nvalidation grid: {grid.name} (rows: prompts; columns: seed x (base, LoRA))"
    return RunOutcome(result.lora_path, offset, result.steps_done, result.interrupted, run_dir, losses, report, grid)


def run_and_release(make_backend: Callable[[], Any], data: PreferenceData, cfg, *, resume: bool,
                    cache_dir: str | None, stop_requested: Callable[[], bool] | None = None,
                    progress: Callable[[int, int, float], None] | None = None,
                    on_ready: Callable[[Any], None] | None = None,
                    release: Callable[[], None] | None = None) -> RunOutcome:
    """Build a backend, train (`run_training`), then release every training-only object, on success,
    error and interrupt alike: `backend.close()` (hooks, forward patches, LoRA layers and params,
    requires_grad flags, grads), the loop's optimizer/scheduler/accelerator (the frames of a failed
    run are cleared so its traceback pins none of them), autocast caches, a garbage collection
    (the optimizer and accelerate objects form reference cycles), then `release()` (ComfyUI:
    `soft_empty_cache`). The caller gets only the outcome: file paths, copies of the LoRA, losses."""
    backend = make_backend()
    try:
        return run_training(backend, data, cfg, resume=resume, cache_dir=cache_dir, stop_requested=stop_requested,
                            progress=progress, on_ready=on_ready)
    except BaseException as e:
        traceback.clear_frames(e.__traceback__)  # finished frames only: this one keeps running
        raise
    finally:
        backend.close()
        del backend
        torch.clear_autocast_cache()
        gc.collect()
        if release is not None:
            release()


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


def image_tensor(path: Path) -> torch.Tensor:
    """An image file as IMAGE [1, H, W, 3] in [0, 1]."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(arr)[None]  # [1, H, W, 3]


def blank_image(size: int = 64) -> torch.Tensor:
    """IMAGE [1, size, size, 3] of zeros: the `validation` output of a run without validation."""
    return torch.zeros(1, size, size, 3)


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


# ---------------------------------------------------------------------------------------------
# live progress: text and loss-curve preview, rate-limited
# ---------------------------------------------------------------------------------------------
def format_duration(seconds: float) -> str:
    """ETA text: 42s, 3m05s, 2h07m ('?' when unknown)."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def format_rate(steps_per_s: float | None) -> str:
    """'2.35 it/s', or seconds per step when slower than one step a second ('61.2 s/it')."""
    if steps_per_s is None or not math.isfinite(steps_per_s) or steps_per_s <= 0:
        return "? it/s"
    return f"{steps_per_s:.2f} it/s" if steps_per_s >= 1 else f"{1 / steps_per_s:.1f} s/it"


@dataclass
class ProgressUpdate:
    """What the UI should show after one step: `text` (None: not yet) and whether to redraw the curve."""

    text: str | None
    image: bool


class ProgressDisplay:
    """Step, loss, running mean, speed and ETA of a run, for a UI that must not slow the run down.

    `update(step, total, loss)` after every optimizer step returns what to emit. Text goes out at
    most every `text_every` s, the curve image at most every `image_every` s (and only with 2+
    points); both always at the last step. Each kind also waits `cost / max_overhead` s after an
    emission that took `cost` s (`spent(kind, cost)`), so drawing and sending stay under
    `max_overhead` of the run's wall time however slow the UI side is. Speed is measured over the
    last `rate_window` steps of this session (a resumed run does not count the steps it skipped)."""

    def __init__(self, total: int, *, text_every: float = 0.5, image_every: float = 5.0, mean_window: int = 20,
                 rate_window: int = 20, max_overhead: float = 0.02, clock: Callable[[], float] = time.monotonic):
        self.total, self.text_every, self.image_every = total, text_every, image_every
        self.mean_window, self.max_overhead, self.clock = mean_window, max_overhead, clock
        self.losses: list[tuple[int, float]] = []
        self._times: deque[tuple[float, int]] = deque(maxlen=rate_window + 1)  # (time, step)
        self._last = {"text": -math.inf, "image": -math.inf}
        self._cost = {"text": 0.0, "image": 0.0}

    def start(self, step: int | None = None) -> None:
        """Anchor the speed now, right before a step (optional). `step` None: the step before the
        first update's (a resumed run learns its first step only from the loop)."""
        self._times.clear()
        self._times.append((self.clock(), step))

    def running_mean(self) -> float:
        tail = [v for _, v in self.losses[-self.mean_window:] if math.isfinite(v)]
        return sum(tail) / len(tail) if tail else math.nan

    def steps_per_s(self) -> float | None:
        if len(self._times) < 2:
            return None
        (t0, s0), (t1, s1) = self._times[0], self._times[-1]
        return (s1 - s0) / (t1 - t0) if t1 > t0 and s1 > s0 else None

    def eta(self, step: int, total: int) -> float:
        rate = self.steps_per_s()
        return (total - step) / rate if rate else math.nan

    def text(self, step: int, total: int, loss: float) -> str:
        n = min(self.mean_window, len(self.losses))
        return (f"step {step}/{total} | loss {loss:.5f} | mean({n}) {self.running_mean():.5f} | "
                f"{format_rate(self.steps_per_s())} | ETA {format_duration(self.eta(step, total))}")

    def _due(self, kind: str, every: float, now: float, last_step: bool) -> bool:
        wait = max(every, self._cost[kind] / self.max_overhead if self.max_overhead > 0 else 0.0)
        return last_step or now - self._last[kind] >= wait

    def update(self, step: int, total: int, loss: float) -> ProgressUpdate:
        now = self.clock()
        self.total = total
        self.losses.append((step, float(loss)))
        if self._times and self._times[0][1] is None:
            self._times[0] = (self._times[0][0], step - 1)
        self._times.append((now, step))
        last = step >= total
        text = self.text(step, total, loss) if self._due("text", self.text_every, now, last) else None
        image = len(self.losses) >= 2 and self._due("image", self.image_every, now, last)
        if text is not None:
            self._last["text"] = now
        if image:
            self._last["image"] = now
        return ProgressUpdate(text, image)

    def spent(self, kind: str, seconds: float) -> None:
        """Record how long emitting `kind` ("text" | "image") took (it spaces the next ones)."""
        self._cost[kind] = max(0.0, float(seconds))


def loss_curve_preview(losses: list[tuple[int, float]], mean_window: int = 20, size: tuple[int, int] = (320, 180)):
    """PIL RGB image of the loss (light) and its running mean (dark) over steps; PIL only (~1 ms)."""
    from PIL import Image, ImageDraw

    w, h = size
    img = Image.new("RGB", size, (250, 250, 250))
    draw = ImageDraw.Draw(img)
    pts = [(s, v) for s, v in losses if math.isfinite(v)]
    left, right, top, bottom = 56, w - 8, 16, h - 20
    draw.rectangle([left, top, right, bottom], outline=(160, 160, 160))
    if not pts:
        draw.text((left + 6, top + 6), "loss: no finite value yet", fill=(60, 60, 60))
        return img
    vals = [v for _, v in pts]
    lo, hi = min(vals), max(vals)
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5 * max(abs(lo), 1e-6), hi + 0.5 * max(abs(hi), 1e-6)
    s0, s1 = pts[0][0], max(pts[-1][0], pts[0][0] + 1)

    def xy(s, v):
        return (left + (s - s0) / (s1 - s0) * (right - left), bottom - (v - lo) / (hi - lo) * (bottom - top))

    mean, acc = [], deque(maxlen=mean_window)
    for s, v in pts:
        acc.append(v)
        mean.append((s, sum(acc) / len(acc)))
    stride = max(1, len(pts) // (2 * w))  # a long run: at most ~2 points per pixel column (always the last)

    def thin(series):
        return series[::stride] + ([series[-1]] if (len(series) - 1) % stride else [])
    for series, colour, width in ((pts, (150, 180, 230), 1), (mean, (20, 70, 170), 2)):
        line = [xy(s, v) for s, v in thin(series)]
        if len(line) == 1:
            x, y = line[0]
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
        else:
            draw.line(line, fill=colour, width=width)
    draw.text((4, top - 2), f"{hi:.4g}", fill=(60, 60, 60))
    draw.text((4, bottom - 10), f"{lo:.4g}", fill=(60, 60, 60))
    draw.text((left, bottom + 4), f"step {s0}", fill=(60, 60, 60))
    draw.text((right - 70, bottom + 4), f"step {pts[-1][0]}", fill=(60, 60, 60))
    draw.text((left + 4, 2), f"loss {vals[-1]:.5f}  mean({len(acc)}) {mean[-1][1]:.5f}", fill=(20, 20, 20))
    return img


# ---------------------------------------------------------------------------------------------
# memory: the training working set, asked of ComfyUI's model management before the first step
# ---------------------------------------------------------------------------------------------
# Stored activations per latent pixel per UNet row with grad, at 2-byte activations (fp16/bf16
# autocast). Analytic count of the tensors autograd keeps for backward (per transformer block
# ~30 channel-widths: norms, q/k/v, attention out, GEGLU 8C + 4C + 4C; per ResNet ~7; x1.5 for
# float32 norm statistics and residual copies), summed over the UNet levels at their resolution
# (SD1.x: 320/640/1280 ch, attention on levels 0-2; SDXL: 320/640/1280 ch, 0/2/10 transformer
# blocks). Not calibrated on a GPU: a planning figure, with ACTIVATION_SLACK for the allocator.
ACT_BYTES_PER_LATENT_PIXEL = {"sd1": 350e3, "sdxl": 650e3}
ACTIVATION_SLACK = 1.3
CHECKPOINTED_FRACTION = 0.15  # per-block checkpointing: block inputs + the largest block's recompute
POLICY_ROWS = {"pairs": 2, "images_or_prompts": 1, "prompts_with_winners": 2}  # rows per sample with grad
OPTIMIZER_BYTES_PER_PARAM = {"adamw": 8, "adamw8bit": 2, "adafactor": 1}  # state per float32 LoRA parameter


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes of the training working set beyond the loaded base weights (which ComfyUI accounts itself)."""

    lora: int  # policy + extra adapters (float32)
    grads: int  # policy grads (float32)
    optimizer: int
    activations: int
    autocast_weights: int  # low-precision copies of float32 base weights cached by autocast for a step

    @property
    def total(self) -> int:
        return self.lora + self.grads + self.optimizer + self.activations + self.autocast_weights

    def report(self) -> str:
        parts = ", ".join(f"{k} {getattr(self, k) / 2**20:.0f} MiB"
                          for k in ("lora", "grads", "optimizer", "activations", "autocast_weights"))
        return f"training memory estimate {self.total / 2**30:.2f} GiB ({parts})"


def estimate_training_memory(*, family: str, resolution: int, batch_size: int, data_kind: str, policy_params: int,
                             adapter_params: int, optimizer: str, gradient_checkpointing: bool, precision: str,
                             float32_base_params: int = 0) -> MemoryEstimate:
    """The working set of one optimizer step (METHODS forwards, autograd, optimizer) from the run's settings.

    policy_params / adapter_params: trainable LoRA parameters / those of the frozen extra adapters (ref, ema).
    float32_base_params: base weights held in float32 (autocast caches a 2-byte copy of each under fp16/bf16)."""
    if family not in ACT_BYTES_PER_LATENT_PIXEL:
        raise ValueError(f"memory estimate: unknown family {family!r} (expected {sorted(ACT_BYTES_PER_LATENT_PIXEL)})")
    if data_kind not in POLICY_ROWS:
        raise ValueError(f"memory estimate: unknown data kind {data_kind!r} (expected {sorted(POLICY_ROWS)})")
    low = precision in ("fp16", "bf16")
    rows = POLICY_ROWS[data_kind] * batch_size
    act = ACT_BYTES_PER_LATENT_PIXEL[family] * (resolution // 8) ** 2 * rows * (1 if low else 2) * ACTIVATION_SLACK
    if gradient_checkpointing:
        act *= CHECKPOINTED_FRACTION
    return MemoryEstimate(lora=4 * (policy_params + adapter_params), grads=4 * policy_params,
                          optimizer=OPTIMIZER_BYTES_PER_PARAM.get(optimizer, 8) * policy_params,
                          activations=int(act), autocast_weights=2 * float32_base_params if low else 0)


def memory_estimate_for(backend, cfg) -> MemoryEstimate:
    """`estimate_training_memory` for a built backend (its LoRA sizes, base dtype) and a TrainConfig."""
    from ..trainer.methods import METHODS

    method = METHODS[cfg.method]
    policy = sum(p.numel() for p in backend.trainable_parameters())
    adapters = policy * len(method.extra_adapters(cfg))  # ref / ema: created by the loop, same shapes as policy
    network = getattr(backend, "network", None)
    fp32 = sum(p.numel() for p in network.parameters() if p.dtype == torch.float32) if network is not None else 0
    return estimate_training_memory(
        family=backend.family, resolution=cfg.resolution, batch_size=cfg.batch_size,
        data_kind=method.data_kind, policy_params=policy, adapter_params=adapters,
        optimizer=cfg.optimizer, gradient_checkpointing=cfg.gradient_checkpointing, precision=cfg.mixed_precision,
        float32_base_params=fp32)
