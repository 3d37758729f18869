"""One training run of the ComfyUI training node (a host that owns the model): the node's widgets
(their order, TrainConfig from them), the run folder (resume or start over), the run itself through
the project's one loop (`trainer.loop.train`), and the release of every training-only object afterwards."""
from __future__ import annotations

import gc
import hashlib
import shutil
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from ...core.offsets.schema import npo_metadata
from ...core.atomic import copy_file
from ...core.paths import inside, safe_relative_name as safe_name
from ...core.summary import DataSummary
from .datasets import PreferenceData
from .progress import read_losses

RUNS_SUBDIR = "npo_suite_runs"  # inside the host's output folder: one folder per output name


# ---------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------
def data_kind_of(method: str) -> str:
    from ...trainer.methods import METHODS

    return "pairs" if METHODS[method].data_kind == "pairs" else "prompts"


def check_data(method: str, data: PreferenceData) -> None:
    want = data_kind_of(method)
    if data.kind != want:
        hint = "a Preference Dataset" if want == "pairs" else "a Prompt List"
        raise ValueError(f"method {method!r} trains on {want}, but the dataset holds {data.kind}: connect {hint}")


def build_stream(data: PreferenceData, cfg, backend, cache_dir: str | None):
    """The resumable batch stream of `trainer.stream`, over in-memory records: everything is
    encoded once up front (VAE, CLIP), so the UNet stays loaded during the steps."""
    from ...trainer.data.cache import LatentCache
    from ...trainer.methods import METHODS
    from ...trainer.stream import image_transform, stream_of

    cache = LatentCache.from_backend(cache_dir, backend_fingerprint(backend), backend, image_transform(cfg))
    encoded = DataSummary("encode")
    records = cache.fill(data.records, verbose=False, summary=encoded)
    data.summary.skipped.update(encoded.skipped)
    if not records:
        raise ValueError(f"dataset {data.source}: no record could be read\n{data.report()}")
    return stream_of(records, cache, cfg, backend, METHODS[cfg.method].data_kind)


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


# The Train Preference LoRA node's widgets, in the node's order (UI workflows store widget values
# by position: append, never reorder). Every name but NODE_ONLY is a TrainConfig field, and its
# widget (type, default, range, tooltip) is generated from that field (`config_widgets`).
NODE_WIDGETS = ("method", "beta", "lam", "snpo_p", "steps", "lr", "lora_rank", "lora_targets", "batch_size",
                "grad_accum", "resolution", "mixed_precision", "optimizer", "gradient_checkpointing", "seed",
                "ref_update_every", "ref_bound", "ref_on_exceed", "timestep_sampler", "timestep_weight", "output_name",
                "resume", "checkpoint_every", "init_lora", "extra", "validate_every", "validation_prompts")
NODE_ONLY = ("resume", "init_lora", "extra", "validation_prompts")  # the node's own inputs (see node_config)


@dataclass(frozen=True)
class Widget:
    """A host widget for one TrainConfig field: kind "int" | "float" | "bool" | "str" | "combo"."""

    name: str
    kind: str
    default: Any
    tooltip: str
    options: tuple = ()
    min: float | None = None
    max: float | None = None
    step: float | None = None
    round: float | None = None


def config_widget(name: str) -> Widget:
    """The widget of TrainConfig field `name`: its type, default, help and UI metadata (trainer/config.py)."""
    import dataclasses

    from ...trainer.config import TrainConfig, field_types

    f = next(f for f in dataclasses.fields(TrainConfig) if f.name == name)
    meta, tp = f.metadata, field_types()[name]
    choices = meta.get("choices") or meta.get("presets") or ()  # a host offers presets as its dropdown
    kind = "combo" if choices else {bool: "bool", int: "int", float: "float", str: "str"}[tp]
    return Widget(name, kind, f.default, meta.get("help", ""), tuple(choices() if callable(choices) else choices),
                  *(meta.get(k) for k in ("min", "max", "step", "round")))


def config_widgets() -> dict[str, Widget]:
    """name -> Widget for every TrainConfig field among NODE_WIDGETS."""
    return {n: config_widget(n) for n in NODE_WIDGETS if n not in NODE_ONLY}


def node_output_name(options: dict) -> str:
    """The run's LoRA name: the `output_name` widget, or '<method>_lora' when empty (TrainConfig's rule)."""
    from ...trainer.config import lora_name_of

    return safe_name(lora_name_of(options.get("output_name") or "", options["method"]), "output_name")


def node_config(options: dict, run_dir: str, init_lora_path: str | None, data: PreferenceData | None = None):
    """TrainConfig from the node's widgets (+ the `extra` lines): the CLI's config type and checks.

    The widgets are TrainConfig fields by name; besides them the node sets lora_alpha = lora_rank
    (scale 1), the LoRA start (`init_lora`), the run folder, log_every = 1. `validate_every`
    (0 = off, the default) and `validation_prompts` are optional node inputs; with validation on
    and no prompts typed, the grid uses the dataset's first prompts. `extra` overrides all of it."""
    import yaml

    from ...trainer.config import from_dict

    extra = yaml.safe_load(options.get("extra") or "") or {}
    if not isinstance(extra, dict):
        raise ValueError("extra: expected 'key: value' lines (YAML mapping)")
    d = {k: options[k] for k in NODE_WIDGETS if k in options and k not in NODE_ONLY}
    d.update(lora_alpha=float(options["lora_rank"]), lora_init=init_lora_path or "",
             output_dir=run_dir, output_name=node_output_name(options), log_every=1,
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
    from ...trainer import checkpoint as ckpt

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
                 on_ready: Callable[[Any], None] | None = None,
                 warning: Callable[[str], None] | None = None) -> RunOutcome:
    """Train on an already-built backend (the caller closes it). Writes the LoRA into cfg.output_dir.

    `on_ready(backend)` runs after the data is encoded, right before the first step (the ComfyUI
    node asks model management for the training working set there)."""
    from ...trainer.loop import Callbacks, train

    check_data(cfg.method, data)
    run_dir = Path(cfg.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    resume_from = prepare_run_dir(run_dir, resume)
    stream = build_stream(data, cfg, backend, cache_dir)
    if on_ready is not None:
        on_ready(backend)
    result = train(cfg, backend=backend, callbacks=Callbacks(stop_requested, progress, warning), data=stream,
                   resume=resume_from)
    offset = None
    if result.steps_done > 0:
        offset = backend.export_offset()
        offset.metadata = npo_metadata(method=cfg.method, steps=result.steps_done)
    losses = read_losses(run_dir / "metrics.csv")
    state = "interrupted" if result.interrupted else "finished"
    report = (f"{cfg.method}: {state} at step {result.steps_done}/{cfg.steps}"
              + (f", loss {result.last_metrics['loss']:.4f}" if "loss" in result.last_metrics else "")
              + (" (resumed)" if resume_from else "")
              + (f", {result.skipped_nonfinite} non-finite step(s) skipped" if result.skipped_nonfinite else "")
              + "".join(f"\nwarning: {w}" for w in result.warnings) + f"\n{data.report()}")
    grid = last_validation_grid(run_dir) if cfg.validate_every else None
    if grid is not None:
        report += f"\nvalidation grid: {grid.name} (rows: prompts; columns: seed x (base, LoRA))"
    return RunOutcome(result.lora_path, offset, result.steps_done, result.interrupted, run_dir, losses, report, grid)


def run_and_release(make_backend: Callable[[], Any], data: PreferenceData, cfg, *, resume: bool,
                    cache_dir: str | None, stop_requested: Callable[[], bool] | None = None,
                    progress: Callable[[int, int, float], None] | None = None,
                    on_ready: Callable[[Any], None] | None = None,
                    release: Callable[[], None] | None = None,
                    warning: Callable[[str], None] | None = None) -> RunOutcome:
    """Build a backend, train (`run_training`), then release every training-only object, on success,
    error and interrupt alike: `backend.close()` (hooks, forward patches, LoRA layers and params,
    requires_grad flags, grads), the loop's optimizer/scheduler/accelerator (the frames of a failed
    run are cleared so its traceback pins none of them), autocast caches, a garbage collection
    (the optimizer and accelerate objects form reference cycles), then `release()` (ComfyUI:
    `soft_empty_cache`). The caller gets only the outcome: file paths, copies of the LoRA, losses."""
    backend = make_backend()
    try:
        return run_training(backend, data, cfg, resume=resume, cache_dir=cache_dir, stop_requested=stop_requested,
                            progress=progress, on_ready=on_ready, warning=warning)
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


def publish_lora(src: Path, loras_dir: str, name: str) -> Path:
    """Copy the trained LoRA into ComfyUI's loras folder atomically (core.atomic)."""
    dst = inside(loras_dir, f"{safe_name(name, 'output name')}.safetensors", "output name")
    return copy_file(src, dst)


