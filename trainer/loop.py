"""The training loop: `train(cfg) -> TrainResult`, the single entry point (CLI, demo, ComfyUI).

Reads top to bottom (nanoGPT `train.py`): setup, then one loop  lr -> step -> log -> save -> stop.
The loop never branches on a method's name: `METHODS[cfg.method]` computes the loss and its
metrics (`trainer/methods.py`).

Determinism and distribution:
- The method's generator is re-seeded for every micro-batch from (seed, global micro-batch
  index), where the index counts micro-batches over all processes. A run on 2 processes x
  batch b therefore draws exactly the noise/timesteps of 1 process x batch b x accumulation 2,
  and a resumed run draws what the uninterrupted one drew: no generator state is needed.
- DDP (`torchrun --nproc_per_node N -m npo_suite train ...` or `accelerate launch --multi_gpu
  --num_processes N -m npo_suite train ...`; gloo on CPU, NCCL on GPUs): every process holds the whole
  network; after the accumulated backward the LoRA gradients (the only trainable weights, a few
  MB) are averaged with one all-reduce. The UNet is not wrapped in DDP: methods may run several
  forwards per step (policy, reference, EMA teacher) that DDP's reducer would reject.
- Ctrl-C (SIGINT) and `callbacks.stop_requested()` stop at the next step boundary, then save a
  checkpoint and the LoRA so far; a second Ctrl-C aborts at once.
"""
from __future__ import annotations

import math
import signal
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from . import checkpoint as ckpt
from .config import TrainConfig


@dataclass
class Callbacks:
    """Hooks for embedding the trainer (the ComfyUI node maps `stop_requested` to its interrupt)."""

    stop_requested: Callable[[], bool] | None = None
    progress: Callable[[int, int, float], None] | None = None  # (step, total, loss)


@dataclass
class TrainResult:
    output_dir: Path
    lora_path: Path | None
    steps_done: int
    interrupted: bool
    last_metrics: dict[str, Any] = field(default_factory=dict)
    checkpoint: Path | None = None


# ---------------------------------------------------------------------------- setup helpers
def make_accelerator(cfg: TrainConfig):
    from accelerate import Accelerator

    return Accelerator(mixed_precision=cfg.mixed_precision, cpu=cfg.cpu)


def build_backend(cfg: TrainConfig, device: torch.device):
    from .backends.diffusers import BackendOptions, DiffusersBackend, LoraOptions

    if not cfg.model:
        raise ValueError("config: `model` is empty; set it to a diffusers folder or a .safetensors checkpoint")
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.mixed_precision, torch.float32)
    opts = BackendOptions(lora=LoraOptions(cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, cfg.lora_init or None, cfg.seed),
                          gradient_checkpointing=cfg.gradient_checkpointing, resolution=cfg.resolution,
                          weight_dtype=dtype if device.type == "cuda" else torch.float32)
    return DiffusersBackend.from_pretrained(cfg.model, device=device, options=opts)


def build_data(cfg: TrainConfig, backend, method, process_index: int, num_processes: int):
    """An endless, resumable iterator of this process's micro-batches (trainer/data)."""
    from .stream import build_batches

    return build_batches(cfg, backend, kind=method.data_kind, rank=process_index, world_size=num_processes)


def build_optimizer(cfg: TrainConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    if cfg.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=cfg.lr, scale_parameter=False, relative_step=False, warmup_init=False,
                         weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb

            return bnb.optim.AdamW8bit(params, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps,
                                       weight_decay=cfg.weight_decay)
        except ImportError:
            print("optimizer adamw8bit: bitsandbytes is not installed (pip install bitsandbytes); using adamw",
                  file=sys.stderr)
    return torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps,
                             weight_decay=cfg.weight_decay)


def micro_seed(seed: int, global_micro: int) -> int:
    """Seed of the method generator for one micro-batch (module docstring), in [0, 2**63)."""
    return (seed * 0x9E3779B97F4A7C15 + global_micro * 0xBF58476D1CE4E5B9 + 1) % (2**63)


class StopFlag:
    """Set by SIGINT (first Ctrl-C; the second raises KeyboardInterrupt) or by `stop_requested`."""

    def __init__(self, callback: Callable[[], bool] | None):
        self.callback, self.set, self._old = callback, False, None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._on_sigint)
        return self

    def _on_sigint(self, *_):
        if self.set:
            raise KeyboardInterrupt
        self.set = True
        print("\ninterrupt: finishing this step, then saving a checkpoint and the LoRA (Ctrl-C again to abort)",
              file=sys.stderr)

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)

    def __call__(self) -> bool:
        return self.set or bool(self.callback and self.callback())


# ---------------------------------------------------------------------------- step helpers
def train_step(cfg, acc, backend, method, data: Iterator, opt, step: int, generator: torch.Generator):
    """One optimizer step: grad_accum micro-batches -> all-reduce LoRA grads -> clip -> step. Returns (metrics, batch)."""
    params = backend.trainable_parameters()
    sums: dict[str, float] = {}
    for k in range(cfg.grad_accum):
        batch = next(data)
        generator.manual_seed(micro_seed(cfg.seed, (step * cfg.grad_accum + k) * acc.num_processes + acc.process_index))
        with acc.autocast():
            out = method.compute(backend, batch, cfg, generator)
        acc.backward(out.loss / cfg.grad_accum)
        for name, v in {"loss": out.loss, **out.metrics}.items():
            sums[name] = sums.get(name, 0.0) + float(v) / cfg.grad_accum
    all_reduce_grads(acc, params)
    norm = acc.clip_grad_norm_(params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf)
    opt.step()
    opt.zero_grad(set_to_none=True)
    metrics = reduce_metrics(acc, sums)
    metrics["grad_norm"] = float(norm)
    return metrics, batch


def all_reduce_grads(acc, params: list[torch.nn.Parameter]) -> None:
    """Average the LoRA gradients over processes with one flat all-reduce (no-op on one process)."""
    if acc.num_processes == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])  # [P]
    torch.distributed.all_reduce(flat)
    flat /= acc.num_processes
    offset = 0
    for p, g in zip(params, grads):
        p.grad = flat[offset:offset + g.numel()].view_as(g).clone()
        offset += g.numel()


def reduce_metrics(acc, metrics: dict[str, float]) -> dict[str, float]:
    if acc.num_processes == 1:
        return metrics
    keys = list(metrics)  # the same insertion order on every process (same method code)
    t = torch.tensor([metrics[k] for k in keys], dtype=torch.float64, device=acc.device)
    torch.distributed.all_reduce(t)
    return {k: float(v) / acc.num_processes for k, v in zip(keys, t.tolist())}


def any_process(acc, flag: bool) -> bool:
    if acc.num_processes == 1:
        return flag
    t = torch.tensor([float(flag)], device=acc.device)
    torch.distributed.all_reduce(t)
    return bool(t.item() > 0)


def save_checkpoint(cfg, acc, backend, method, opt, sched, data, updater, step: int) -> Path | None:
    """All processes write their RNG; the main process writes the rest and commits (checkpoint.py)."""
    out = Path(cfg.output_dir)
    tmp = ckpt.begin(out, step) if acc.is_main_process else ckpt.checkpoints_dir(out) / f".tmp_{ckpt.step_name(step)}"
    acc.wait_for_everyone()
    ckpt.write_rng(tmp, acc.process_index)
    acc.wait_for_everyone()
    path = None
    if acc.is_main_process:
        adapters = {a: backend.adapter_state(a) for a in backend.adapters}
        state = {"step": step, "optimizer": opt.state_dict(), "lr_scheduler": sched.state_dict(),
                 "data": _state(data), "reference": _state(updater), "method": _state(method)}
        path = ckpt.commit(tmp, step, adapters, state, cfg.to_yaml(), cfg.keep_last)
    acc.wait_for_everyone()
    return path


def _state(obj) -> Any:
    return obj.state_dict() if obj is not None and hasattr(obj, "state_dict") else None


def restore(path: Path, cfg, acc, backend, opt, sched, data, updater, method) -> int:
    """Load a checkpoint into the live objects; returns the step to continue from."""
    import yaml

    c = ckpt.load(path)
    saved, now = yaml.safe_load(c.config_yaml) or {}, cfg.to_dict()
    changed = sorted(k for k in now if saved.get(k) != now[k])
    if changed and acc.is_main_process:
        print(f"resume {path}: config differs from the checkpoint's in {changed}; continuing with the new values",
              file=sys.stderr)
    missing = [a for a in backend.adapters if a not in c.adapters]
    if missing:
        raise ValueError(f"checkpoint {path}: no weights for adapter(s) {missing}")
    for a in backend.adapters:
        backend.load_adapter_state(a, c.adapters[a])
    opt.load_state_dict(c.state["optimizer"])
    sched.load_state_dict(c.state["lr_scheduler"])
    for obj, key in ((data, "data"), (updater, "reference"), (method, "method")):
        if c.state.get(key) is not None and hasattr(obj, "load_state_dict"):
            obj.load_state_dict(c.state[key])
    rng = c.rng(acc.process_index)
    if rng is not None:
        ckpt.restore_rng(rng)
    return c.step


# ---------------------------------------------------------------------------- the loop
def train(cfg: TrainConfig, *, backend=None, callbacks: Callbacks | None = None, data=None,
          resume: str | None = None) -> TrainResult:
    """Train `cfg.method`'s LoRA; `backend` may be prebuilt (ComfyUI), `data` an iterator of batches."""
    from accelerate.utils import set_seed
    from diffusers.optimization import get_scheduler

    from .methods import METHODS
    from .reference import ReferenceUpdater
    from .validation import MetricsLog, save_lora, validate

    cb = callbacks or Callbacks()
    acc = make_accelerator(cfg)
    set_seed(cfg.seed + acc.process_index)
    out = Path(cfg.output_dir)
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
    backend = backend if backend is not None else build_backend(cfg, acc.device)
    method = METHODS[cfg.method]
    method.setup(backend, cfg)
    data = iter(data) if data is not None else build_data(cfg, backend, method, acc.process_index, acc.num_processes)
    opt = acc.prepare_optimizer(build_optimizer(cfg, backend.trainable_parameters()), device_placement=False)
    sched = get_scheduler(cfg.lr_scheduler, opt, num_warmup_steps=cfg.lr_warmup_steps, num_training_steps=cfg.steps)
    updater = ReferenceUpdater.from_config(cfg)
    generator = torch.Generator(device=acc.device if acc.device.type == "cuda" else "cpu")
    step = restore(ckpt.resolve(resume, out), cfg, acc, backend, opt, sched, data, updater, method) if resume else 0
    log = MetricsLog(out, enabled=acc.is_main_process, resume_step=step)
    bar = _progress_bar(cfg, step, acc.is_main_process)
    metrics: dict[str, Any] = {}
    last_saved, path, interrupted = None, None, False
    with StopFlag(cb.stop_requested) as stop:
        while step < cfg.steps and not (interrupted := any_process(acc, stop())):
            metrics, batch = train_step(cfg, acc, backend, method, data, opt, step, generator)
            metrics["lr"] = sched.get_last_lr()[0]
            sched.step()
            step += 1
            method.after_step(backend, cfg)
            event = updater.maybe_update(step, backend, batch) if updater is not None else None
            if step % cfg.log_every == 0 or event or step == cfg.steps:
                log.write(step, {**metrics, **(event or {})})
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                path = save_checkpoint(cfg, acc, backend, method, opt, sched, data, updater, step)
                last_saved = step
            if cfg.validate_every and step % cfg.validate_every == 0 and acc.is_main_process:
                validate(cfg, backend, method, step, out, log)
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}")
            if cb.progress:
                cb.progress(step, cfg.steps, metrics["loss"])
    bar.close()
    if interrupted and last_saved != step:  # a periodic save already covers step otherwise
        path = save_checkpoint(cfg, acc, backend, method, opt, sched, data, updater, step)
    lora = save_lora(cfg, backend, method, step, out) if acc.is_main_process and step > 0 else None
    log.close()
    acc.wait_for_everyone()
    return TrainResult(out, lora, step, interrupted, metrics, path)


def _progress_bar(cfg, step: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=cfg.steps, initial=step, disable=not enabled, desc=f"train {cfg.method}", dynamic_ncols=True)
