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
- Ctrl-C (SIGINT), SIGTERM and `callbacks.stop_requested()` stop at the next step boundary, then
  save a checkpoint and the LoRA so far; a second signal aborts at once.
- Non-finite steps: a step whose loss or gradient norm is not finite (on any process) changes
  nothing: no optimizer, scheduler, EMA (`method.after_step`) or reference-update step; under
  fp16 the GradScaler's own overflow skip counts the same. Such steps are counted
  (`train/skipped_nonfinite`) and warned about once (`health.RunHealth`, also the run's other
  health warnings); after `max_nonfinite_steps` in a row the run saves its last finite state and
  raises `NonFiniteError`, and so does a run that reaches its last step with more than
  `MAX_NONFINITE_SHARE` of its optimizer steps skipped (and at least `MIN_NONFINITE_FAILS` of them).
  Either way the LoRA of the last finite state is saved as `<name>.last_finite.safetensors`, never
  under the finished LoRA's name. Checkpoints and LoRAs holding a non-finite tensor are never written.
"""
from __future__ import annotations

import math
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from ..core.finite import first_nonfinite, is_finite
from . import checkpoint as ckpt
from .config import TrainConfig
from .health import RunHealth


@dataclass
class Callbacks:
    """Hooks for embedding the trainer (the ComfyUI node maps `stop_requested` to its interrupt)."""

    stop_requested: Callable[[], bool] | None = None
    progress: Callable[[int, int, float], None] | None = None  # (step, total, loss)
    warning: Callable[[str], None] | None = None  # a health warning (each kind once per run)


class NonFiniteError(RuntimeError):
    """The run stopped after `max_nonfinite_steps` consecutive non-finite steps, or skipped more than
    `MAX_NONFINITE_SHARE` of its steps (message: step, causes, what to change, files)."""


# A run that skipped more than this share of its optimizer steps as non-finite (and at least
# MIN_NONFINITE_FAILS steps, so that one bad step of a 5-step test run is not a failure) fails at its
# end (docs/training.md "When a run goes wrong"); `max_nonfinite_steps` = 0 turns both guards off.
MAX_NONFINITE_SHARE = 0.10
MIN_NONFINITE_FAILS = 3
LAST_FINITE_SUFFIX = ".last_finite"
# Written into output_dir when a run reaches its last step (not interrupted, not failed); removed when
# a run starts there. The `train` CLI refuses to start a new run over it unless asked (--overwrite).
FINISHED_NAME = "finished.json"
# metrics.csv gets a row every `log_every` steps, and also once this many seconds have passed since the
# last row (or the start): a slow run (grad_accum 16 on CPU: minutes a step) logs from its first step.
LOG_SECONDS = 60.0
_clock = time.monotonic


def finished_run(output_dir) -> dict | None:
    """The record of the finished run in `output_dir` (step, steps, method, lora), else None."""
    import json

    p = Path(output_dir) / FINISHED_NAME
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def too_many_nonfinite(cfg, skipped: int, steps_done: int) -> bool:
    """More than MAX_NONFINITE_SHARE of `steps_done` steps skipped (and >= MIN_NONFINITE_FAILS)."""
    return (bool(cfg.max_nonfinite_steps) and skipped >= MIN_NONFINITE_FAILS
            and skipped > MAX_NONFINITE_SHARE * steps_done)


@dataclass
class TrainResult:
    output_dir: Path
    lora_path: Path | None
    steps_done: int
    interrupted: bool
    last_metrics: dict[str, Any] = field(default_factory=dict)
    checkpoint: Path | None = None
    skipped_nonfinite: int = 0
    warnings: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------- setup helpers
def make_accelerator(cfg: TrainConfig):
    """The run's Accelerator, with the run's own precision and device.

    accelerate keeps both in a process-wide state: a second Accelerator in the same process with
    another `mixed_precision` is refused ("AcceleratorState has already been initialized ... restart
    your runtime"), and one without `cpu` after a `cpu` run silently stays on the CPU. A host that
    trains several times in one process (ComfyUI, the tests) would meet both, so a process that was
    not launched distributed starts each run from a fresh state. A distributed launch (`accelerate
    launch`, several processes) runs one training per process and keeps its state (its process group)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, DistributedType, PartialState

    shared = PartialState._shared_state
    if shared and shared.get("distributed_type") == DistributedType.NO and shared.get("num_processes", 1) == 1:
        AcceleratorState._reset_state(reset_partial_state=True)
    return Accelerator(mixed_precision=cfg.mixed_precision, cpu=cfg.cpu)


def build_backend(cfg: TrainConfig, device: torch.device, load_on: torch.device | None = None):
    """The run's backend for `device` (its weight dtype); built on `load_on` (default `device`: fsdp loads on
    the CPU and shards onto the device, trainer/fsdp.py)."""
    from .backends.diffusers import BackendOptions, DiffusersBackend, LoraOptions

    if not cfg.model:
        raise ValueError("config: `model` is empty; set it to a diffusers folder or a .safetensors checkpoint")
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.mixed_precision, torch.float32)
    opts = BackendOptions(lora=LoraOptions(cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, cfg.lora_init or None, cfg.seed),
                          gradient_checkpointing=cfg.gradient_checkpointing, resolution=cfg.resolution,
                          weight_dtype=dtype if device.type == "cuda" else torch.float32)
    return DiffusersBackend.from_pretrained(cfg.model, device=load_on or device, options=opts, tokenizer=cfg.tokenizer or None,
                                            vae=cfg.vae or None, prediction_type=cfg.prediction_type or None)


def release_text_encoders(cfg: TrainConfig, backend, method, *, verbose: bool = True) -> int:
    """Free a flow transformer's text encoders once the cache holds every prompt (T5-XXL alone is 4.7 B
    parameters): only when nothing encodes text later (the method's steps, validation grids). Returns the
    parameters freed (0: kept, and why is printed)."""
    if not getattr(backend, "is_transformer", False) or not getattr(backend, "text_encoders", None):
        return 0
    keep = ("no cache_dir: every batch is encoded when it is drawn (set cache_dir to encode once and release "
            "them)" if not cfg.cache_dir else
            "the method encodes prompts at every step" if method.encodes_text_in_training else
            "validation grids encode their prompts" if cfg.validate_every else None)
    if keep:
        if verbose:
            print(f"text encoders: kept in memory ({keep})", file=sys.stderr)
        return 0
    n = backend.release_text_encoders()
    if verbose:
        print(f"text encoders: released after caching ({n / 1e6:,.1f} M parameters)", file=sys.stderr)
    return n


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
        except ImportError:  # said in the run's first lines (`setup_lines`)
            pass
    return torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps,
                             weight_decay=cfg.weight_decay)


ATTENTION_KINDS = {"AttnProcessor2_0": "SDPA (torch scaled_dot_product_attention)",
                   "XFormersAttnProcessor": "xformers (memory-efficient attention)",
                   "SlicedAttnProcessor": "sliced attention", "AttnProcessor": "plain attention (no fused kernel)"}


def setup_lines(cfg: TrainConfig, acc, backend, opt) -> list[str]:
    """What the run actually uses, for its first lines: device, weight dtype and autocast (the one in
    effect, which on a CPU may differ from the one asked for), the optimizer built, attention kernels."""
    dev = acc.device
    name = f" ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda" else ""
    lines = [f"device: {dev}{name}" + (f", {acc.num_processes} processes" if acc.num_processes > 1 else "")]
    unet = getattr(backend, "unet", None)
    first = next(iter(unet.parameters()), None) if isinstance(unet, torch.nn.Module) else None
    wdtype = first.dtype if first is not None else None
    wd = str(wdtype).replace("torch.", "") if wdtype is not None else "as the host loaded them"
    asked = cfg.mixed_precision
    if asked == "no":
        lines.append(f"precision: {wd} weights, no autocast (mixed_precision no)")
    elif acc.native_amp:
        lines.append(f"precision: {wd} base weights, {asked} autocast (mixed_precision {asked})")
    else:
        lines.append(f"precision: mixed_precision {asked} requested; running {wd} weights without autocast on "
                     f"{dev.type} ({asked} autocast is not available there)")
    built = type(getattr(opt, "optimizer", opt))
    label = f"{built.__module__.split('.')[0]} {built.__name__}"
    if cfg.optimizer == "adamw8bit" and built.__name__ != "AdamW8bit":
        lines.append(f"optimizer: {label} (adamw8bit requested: bitsandbytes is not installed; "
                     f"pip install 'npo-suite[gpu]' or bitsandbytes)")
    else:
        lines.append(f"optimizer: {label} (optimizer {cfg.optimizer})")
    procs = getattr(unet, "attn_processors", None) if unet is not None else None
    if procs:
        kinds = sorted({ATTENTION_KINDS.get(type(p).__name__, type(p).__name__) for p in procs.values()})
        lines.append("attention: " + ", ".join(kinds))
    else:
        lines.append("attention: the host model's own")
    return lines


def micro_seed(seed: int, global_micro: int) -> int:
    """Seed of the method generator for one micro-batch (module docstring), in [0, 2**63)."""
    return (seed * 0x9E3779B97F4A7C15 + global_micro * 0xBF58476D1CE4E5B9 + 1) % (2**63)


class StopFlag:
    """Set by SIGINT / SIGTERM (the first; a second raises KeyboardInterrupt) or by `stop_requested`."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, callback: Callable[[], bool] | None):
        self.callback, self.set, self._old = callback, False, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._old = {s: signal.signal(s, self._on_signal) for s in self.SIGNALS}
        return self

    def _on_signal(self, signum, _frame):
        if self.set:
            raise KeyboardInterrupt
        self.set = True
        print(f"\n{signal.Signals(signum).name}: finishing this step, then saving a checkpoint and the LoRA "
              "(again to abort)", file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        for s, old in self._old.items():
            signal.signal(s, old)

    def __call__(self) -> bool:
        return self.set or bool(self.callback and self.callback())


# ---------------------------------------------------------------------------- step helpers
def train_step(cfg, acc, backend, method, data: Iterator, opt, step: int, generator: torch.Generator,
               on_micro: Callable[[int], None] | None = None):
    """One optimizer step: grad_accum micro-batches -> all-reduce LoRA grads -> clip -> step.
    `on_micro(1)` after each micro-batch's backward (the progress bar under gradient accumulation).

    Returns (metrics, batch, applied). `applied` is False when the loss (on any process) or the
    gradient norm is not finite: the optimizer did not step. Under fp16 the GradScaler decides:
    a non-finite loss poisons the gradients so that its inf check skips the step and lowers the
    scale (its own overflow skips are reported the same way)."""
    params = backend.trainable_parameters()
    sums: dict[str, float] = {}
    finite = True
    for k in range(cfg.grad_accum):
        batch = next(data)
        generator.manual_seed(micro_seed(cfg.seed, (step * cfg.grad_accum + k) * acc.num_processes + acc.process_index))
        with acc.autocast():
            out = method.compute(backend, batch, cfg, generator)
        acc.backward(out.loss / cfg.grad_accum)
        finite = finite and is_finite(out.loss.detach())
        for name, v in {"loss": out.loss, **out.metrics}.items():
            sums[name] = sums.get(name, 0.0) + float(v.detach() if torch.is_tensor(v) else v) / cfg.grad_accum
        if on_micro is not None:
            on_micro(1)
    finite = not any_process(acc, not finite)
    scaler = getattr(acc, "scaler", None)
    if not finite and scaler is not None:
        for p in params:
            if p.grad is not None:
                p.grad.fill_(math.nan)
    all_reduce_grads(acc, params)
    norm = acc.clip_grad_norm_(params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf)
    finite = finite and is_finite(norm)
    if finite or scaler is not None:
        opt.step()
    applied = finite and not getattr(opt, "step_was_skipped", False)
    opt.zero_grad(set_to_none=True)
    metrics = reduce_metrics(acc, sums)
    metrics["grad_norm"] = float(norm)
    return metrics, batch, applied


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


def save_checkpoint(cfg, acc, backend, method, opt, sched, data, updater, step: int, skipped: int = 0) -> Path | None:
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
                 "data": _state(data), "reference": _state(updater), "method": _state(method),
                 "skipped_nonfinite": skipped}
        path = ckpt.commit(tmp, step, adapters, state, cfg.to_yaml(), cfg.keep_last)
    acc.wait_for_everyone()
    return path


def _state(obj) -> Any:
    return obj.state_dict() if obj is not None and hasattr(obj, "state_dict") else None


def restore(path: Path, cfg, acc, backend, opt, sched, data, updater, method, run=None) -> int:
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
    if run is not None:
        run.skipped, run.path, run.last_saved = int(c.state.get("skipped_nonfinite", 0)), path, c.step
    return c.step


# ---------------------------------------------------------------------------- the loop
def train(cfg: TrainConfig, *, backend=None, callbacks: Callbacks | None = None, data=None,
          resume: str | None = None) -> TrainResult:
    """Train `cfg.method`'s LoRA; `backend` may be prebuilt (ComfyUI), `data` an iterator of batches."""
    from accelerate.utils import set_seed
    from diffusers.optimization import get_scheduler

    from . import fsdp
    from .methods import METHODS
    from .reference import ReferenceUpdater
    from .validation import MetricsLog, validate

    cb = callbacks or Callbacks()
    acc = make_accelerator(cfg)
    set_seed(cfg.seed + acc.process_index)
    out = Path(cfg.output_dir)
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / FINISHED_NAME).unlink(missing_ok=True)  # this run is not finished (yet)
    prebuilt = backend is not None
    backend = backend if prebuilt else build_backend(cfg, acc.device, load_on=fsdp.load_device(cfg, acc))
    method = METHODS[cfg.method]
    method.setup(backend, cfg)
    fsdp.prepare(cfg, acc, backend, prebuilt=prebuilt)  # fsdp: checked; encoders + VAE on the device for the fill
    data = iter(data) if data is not None else build_data(cfg, backend, method, acc.process_index, acc.num_processes)
    release_text_encoders(cfg, backend, method, verbose=acc.is_main_process)
    fsdp.shard_backend(cfg, acc, backend)  # fsdp: the transformer split over the processes (trainer/fsdp.py)
    opt = acc.prepare_optimizer(build_optimizer(cfg, backend.trainable_parameters()), device_placement=False)
    if acc.is_main_process:
        for line in setup_lines(cfg, acc, backend, opt):
            print(line, file=sys.stderr)
    sched = get_scheduler(cfg.lr_scheduler, opt, num_warmup_steps=cfg.lr_warmup_steps, num_training_steps=cfg.steps)
    updater = ReferenceUpdater.from_config(cfg)
    generator = torch.Generator(device=acc.device if acc.device.type == "cuda" else "cpu")
    run = RunState(cfg, acc, backend, method, opt, sched, data, updater, cb)
    step = restore(ckpt.resolve(resume, out), cfg, acc, backend, opt, sched, data, updater, method, run) if resume else 0
    log = MetricsLog(out, enabled=acc.is_main_process, resume_step=step)
    bar = _progress_bar(cfg, step, acc.is_main_process)
    micro = cfg.grad_accum > 1  # the bar counts micro-batches (module docstring of _progress_bar)
    metrics: dict[str, Any] = {}
    interrupted, bad_in_a_row, logged_at = False, 0, _clock()
    with StopFlag(cb.stop_requested) as stop:
        while step < cfg.steps and not (interrupted := any_process(acc, stop())):
            metrics, batch, applied = train_step(cfg, acc, backend, method, data, opt, step, generator,
                                                 on_micro=bar.update if micro else None)
            metrics["lr"] = sched.get_last_lr()[0]
            step += 1
            event = None
            if applied:  # a skipped step changes nothing: no scheduler, EMA or reference step
                sched.step()
                method.after_step(backend, cfg)
                event = updater.maybe_update(step, backend, batch) if updater is not None else None
            run.skipped += not applied
            bad_in_a_row = 0 if applied else bad_in_a_row + 1
            metrics["train/skipped_nonfinite"] = run.skipped
            run.observe(step, metrics, skipped=not applied, bar=bar)
            slow = _clock() - logged_at >= LOG_SECONDS
            if step % cfg.log_every == 0 or event or step == cfg.steps or not applied or slow:
                log.write(step, {**metrics, **(event or {})})
                logged_at = _clock()
            if cfg.max_nonfinite_steps and bad_in_a_row >= cfg.max_nonfinite_steps:
                break
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                run.checkpoint(step)
            if cfg.validate_every and step % cfg.validate_every == 0 and acc.is_main_process:
                validate(cfg, backend, method, step, out, log)
            if not micro:
                bar.update(1)
            bar.set_postfix(**({"step": f"{step}/{cfg.steps}"} if micro else {}), loss=f"{metrics['loss']:.4f}",
                            **({"skipped": run.skipped} if run.skipped else {}))
            if cb.progress:
                cb.progress(step, cfg.steps, metrics["loss"])
    bar.close()
    diverged = bool(cfg.max_nonfinite_steps) and bad_in_a_row >= cfg.max_nonfinite_steps
    failed = diverged or too_many_nonfinite(cfg, run.skipped, step)
    if (interrupted or failed) and run.last_saved != step:  # a periodic save already covers step otherwise
        run.checkpoint(step)
    suffix = LAST_FINITE_SUFFIX if failed else ""
    lora = run.save_lora(step, suffix) if acc.is_main_process and step > 0 else None
    log.close()
    if acc.is_main_process and not (interrupted or failed):
        import json

        from ..core.atomic import write_text

        write_text(out / FINISHED_NAME, json.dumps({"step": step, "steps": cfg.steps, "method": cfg.method,
                                                    "lora": str(lora) if lora else None}) + "\n")
    acc.wait_for_everyone()
    if diverged:
        raise NonFiniteError(nonfinite_message(cfg, step, bad_in_a_row, metrics, run.path, lora))
    if failed:
        raise NonFiniteError(nonfinite_share_message(cfg, step, run.skipped, metrics, run.path, lora))
    return TrainResult(out, lora, step, interrupted, metrics, run.path, run.skipped, run.warnings)


class RunState:
    """What the loop keeps about its own run: skipped steps, health warnings, the last checkpoint saved."""

    def __init__(self, cfg, acc, backend, method, opt, sched, data, updater, cb: Callbacks):
        self.cfg, self.acc, self.backend, self.method, self.cb = cfg, acc, backend, method, cb
        self.objects = (opt, sched, data, updater)
        self.health = RunHealth()
        self.skipped, self.warnings = 0, []
        self.last_saved: int | None = None
        self.path: Path | None = None

    def observe(self, step: int, metrics: dict, skipped: bool, bar) -> None:
        if not self.acc.is_main_process:
            return
        for msg in self.health.observe(step, metrics, skipped=skipped, cfg=self.cfg):
            self.warnings.append(msg)
            bar.write(f"warning: {msg}", file=sys.stderr)
            if self.cb.warning:
                self.cb.warning(msg)

    def nonfinite_weights(self) -> str | None:
        """The first adapter tensor holding a NaN/inf ("adapter/key"), else None."""
        return first_nonfinite((f"{a}/{k}", v) for a in self.backend.adapters
                               for k, v in self.backend.adapter_state(a).items())

    def checkpoint(self, step: int) -> None:
        """Save a checkpoint unless the weights are not finite (then the last good one stays `latest`)."""
        bad = self.nonfinite_weights()
        if bad is not None:
            self.warnings.append(f"step {step}: checkpoint not written, {bad} holds a non-finite value; "
                                 f"the last good checkpoint is {self.path}")
            print(f"warning: {self.warnings[-1]}", file=sys.stderr)
            return
        self.path = save_checkpoint(self.cfg, self.acc, self.backend, self.method, *self.objects, step,
                                    skipped=self.skipped)
        self.last_saved = step

    def save_lora(self, step: int, suffix: str = "") -> Path | None:
        """The LoRA as `<lora_name><suffix>.safetensors` (suffix LAST_FINITE_SUFFIX for a failed run)."""
        import dataclasses

        from .validation import save_lora

        bad = self.nonfinite_weights()
        if bad is not None:
            raise NonFiniteError(f"step {step}: the LoRA is not written, {bad} holds a non-finite value; "
                                 f"the last good checkpoint is {self.path} (resume from it with a lower lr)")
        cfg = dataclasses.replace(self.cfg, output_name=self.cfg.lora_name + suffix) if suffix else self.cfg
        return save_lora(cfg, self.backend, self.method, step, Path(self.cfg.output_dir))


def nonfinite_message(cfg, step: int, n: int, metrics: dict, checkpoint: Path | None, lora: Path | None) -> str:
    precision = {"fp16": "fp16 (it overflows: try bf16 or no)"}.get(cfg.mixed_precision, cfg.mixed_precision)
    return (f"step {step}: {n} consecutive steps with a non-finite loss or gradient norm "
            f"(loss {metrics.get('loss', math.nan):.4g}, grad norm {metrics.get('grad_norm', math.nan):.4g}); "
            f"the run stopped (max_nonfinite_steps={cfg.max_nonfinite_steps}). Likely causes: lr {cfg.lr:g} too high, "
            f"beta {cfg.beta:g} too high (the preference logits overflow), precision {precision} (fp32: "
            f"mixed_precision no), gradient clipping max_grad_norm {cfg.max_grad_norm:g}. Nothing of the "
            f"skipped steps was applied; the last finite state is saved: checkpoint {checkpoint}, LoRA {lora}. "
            "Resume with `--resume latest` and a lower lr or beta.")


def nonfinite_share_message(cfg, step: int, skipped: int, metrics: dict, checkpoint: Path | None,
                            lora: Path | None) -> str:
    """A run that reached its end having skipped too many steps (`too_many_nonfinite`)."""
    precision = ("mixed_precision fp16 overflows: use bf16 or no (fp32)" if cfg.mixed_precision == "fp16"
                 else f"mixed_precision {cfg.mixed_precision}")
    clip = (f"max_grad_norm {cfg.max_grad_norm:g} (lower it)" if cfg.max_grad_norm > 0
            else "max_grad_norm 0 = no clipping (set e.g. 1.0)")
    return (f"step {step}: {skipped} of {step} optimizer steps ({100 * skipped / max(step, 1):.0f}%) had a non-finite "
            f"loss or gradient norm and were skipped, more than the {100 * MAX_NONFINITE_SHARE:.0f}% a run may skip "
            f"(last loss {metrics.get('loss', math.nan):.4g}, grad norm {metrics.get('grad_norm', math.nan):.4g}); "
            f"the run failed. What to change: a lower lr (now {cfg.lr:g}) or beta (now {cfg.beta:g}), fp32 "
            f"({precision}), gradient clipping ({clip}). Nothing of the skipped steps was applied; the LoRA of the "
            f"last finite state is saved as {lora} (not the finished LoRA's name), checkpoint {checkpoint}.")


def _progress_bar(cfg, step: int, enabled: bool):
    """tqdm over optimizer steps; under gradient accumulation over micro-batches (steps x grad_accum,
    the optimizer step in the postfix), so it moves, with elapsed<remaining, within a long step."""
    from tqdm.auto import tqdm

    if cfg.grad_accum > 1:
        return tqdm(total=cfg.steps * cfg.grad_accum, initial=step * cfg.grad_accum, disable=not enabled,
                    desc=f"train {cfg.method} ({cfg.grad_accum} micro-batches/step)", unit="micro-batch",
                    dynamic_ncols=True)
    return tqdm(total=cfg.steps, initial=step, disable=not enabled, desc=f"train {cfg.method}", dynamic_ncols=True)
