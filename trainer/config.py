"""`TrainConfig`: the one typed configuration of a training run (trl `dpo_config.py` style).

Every field carries its help text (`field(metadata={"help": ...})`); cross-field checks live in
`__post_init__`; the `train` CLI is generated from the fields; every checkpoint stores the
resolved config as YAML. Method hyper-parameters (β, λ, p, ...) come from `MethodConfig`
(below), which this class extends.

Sources, lowest precedence first: a preset (`configs/NAME.yaml`), a YAML/TOML file, plain CLI
flags (`--lr 1e-4`), `--set key=value` overrides. Values are typed by the field types: a YAML
`1e-4` (a string to YAML 1.1) still becomes a float; list fields take a YAML list or
`a|b|c` on the command line.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.schedule import TIMESTEP_SAMPLERS, TIMESTEP_WEIGHTS
from .ddspo import DDSPO_LOSERS, REWRITERS
from .losses import LOSS_WEIGHTINGS, TDFT_X0_LOSSES
from .reference import ON_EXCEED
from .tdft import FULL_SIM_STEPS, TDFT_STARTS, TDFT_TIMESTEPS

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
OPTIMIZERS = ("adamw", "adamw8bit", "adafactor")
PRECISIONS = ("no", "fp16", "bf16")
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")


def _h(default: Any, help: str, **kw):
    """A field with its help text and UI metadata in `kw` (min, max, step, round; choices: the allowed
    values, presets: suggested ones, each a tuple or a function returning one), read by the ComfyUI
    node's widgets (`trainer.session.config_widgets`) and the train CLI's help."""
    if isinstance(default, list):
        return field(default_factory=lambda d=tuple(default): list(d), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


def _m(text: str, *, default: Any, **kw) -> Any:
    return field(default=default, metadata={"help": text, **kw})


def method_names() -> tuple[str, ...]:
    """The keys of the one method registry, `trainer.methods.METHODS` (imported on first use)."""
    from .methods import METHODS

    return tuple(METHODS)


def target_presets() -> tuple[str, ...]:
    """The LoRA target presets (`lora_targets` also takes a comma list of module names)."""
    from .backends.diffusers import TARGET_PRESETS

    return tuple(TARGET_PRESETS)


@dataclass
class MethodConfig:
    """Every method hyper-parameter (the trainer's TrainConfig inherits from this), grouped by the
    method that reads it; a method ignores the other groups."""

    method: str = _m("training method (a key of trainer.methods.METHODS)", default="dpo", choices=method_names)
    # --- DPO family: dpo, npo, bdpo, snpo, snpo_naive (seeds 000, 001)
    beta: float = _m("DPO-family beta, Diffusion-DPO's own convention: logit = -(beta/2)*(m_w - m_l); paper "
                     "values 2000..5000 for SD1.5/SDXL (the diffusers example's beta' is beta/2)", default=5000.0,
                     min=1.0, max=100000.0, step=100.0)
    lam: float = _m("BDPO/SNPO mixing lambda in (0, 1]; the loser's pull is bounded by -log(1-lambda); "
                    "1 = plain DPO", default=0.9, min=0.01, max=1.0, step=0.01)
    snpo_p: float = _m("SNPO probability of the null branch (null cond, pair swapped) per pair", default=0.5,
                       min=0.0, max=1.0, step=0.05)
    # --- timesteps: every method except TDFT under tdft_timesteps=solver_grid
    timestep_sampler: str = _m("timestep sampler: " + ", ".join(TIMESTEP_SAMPLERS), default="uniform",
                               choices=tuple(TIMESTEP_SAMPLERS))
    timestep_gamma: float = _m("gamma_bins: P(bin k) ~ gamma^k, k=0 the noisiest bin", default=0.9)
    timestep_bins: int = _m("gamma_bins: number of bins over [0, T)", default=10)
    timestep_weight: str = _m("per-timestep loss scale w(t): " + ", ".join(TIMESTEP_WEIGHTS), default="none",
                              choices=tuple(TIMESTEP_WEIGHTS))
    # --- TDFT: Self-NPO truncated diffusion fine-tuning (seed 002); defaults = the authors' SD1.5 code
    tdft_timesteps: str = _m("TDFT timesteps: " + "; ".join(f"{k} = {v}" for k, v in TDFT_TIMESTEPS.items()),
                             default="solver_grid")
    tdft_solver_steps: int = _m("TDFT: solver grid size N (one teacher step spans T//N timesteps; authors 25)",
                                default=FULL_SIM_STEPS)
    tdft_k: int = _m("TDFT: teacher solver steps K of the truncated rollout (authors 5)", default=5)
    tdft_start: str = _m("TDFT rollout start: " + "; ".join(f"{k} = {v}" for k, v in TDFT_STARTS.items()),
                         default="auto")
    tdft_guidance: float = _m("TDFT teacher guidance w: eps = eps_c + w*(eps_c - eps_uncond), any sign (CFG scale "
                              "1 + w); -1 = the unconditional prediction (authors' SD1.5), -5 authors' SDXL",
                              default=-1.0)
    tdft_loss: str = _m("TDFT x0 distance: pseudo_huber = sqrt(r^2 + c^2) - c (authors), l2, huber = "
                        "F.huber_loss(delta=1)", default="pseudo_huber")
    tdft_huber_c: float = _m("TDFT pseudo_huber c (authors 1e-3)", default=1e-3)
    ema_decay: float = _m("TDFT: EMA decay of the teacher adapter, applied to each LoRA factor (authors 0.999 on "
                          "the full UNet)", default=0.999)
    # --- DDSPO: direct score-space preference optimization (seed 003)
    ddspo_beta: float = _m("DDSPO beta (same beta/2 convention); paper 16000 for SD1.x/SDXL; lr must shrink as "
                           "beta grows (docs/training.md)", default=16000.0)
    ddspo_loser: str = _m("DDSPO loser image x_l: " + "; ".join(f"{k} = {v}" for k, v in DDSPO_LOSERS.items()),
                          default="generated")
    ddspo_loss_weighting: str = _m("DDSPO per-pair weight outside the sigmoid: none, or linear = t/(T-1) (the "
                                   "authors' SDXL script)", default="none")
    ddspo_min_frac: float = _m("DDSPO: minimum fraction of words removed from the prompt", default=0.4)
    ddspo_max_frac: float = _m("DDSPO: maximum fraction of words removed from the prompt", default=0.7)
    ddspo_rewriter: str = _m("DDSPO degraded-prompt rewriter: " + ", ".join(REWRITERS), default="drop_words")
    ddspo_rewriter_path: str | None = _m("DDSPO local_lm rewriter: local transformers causal-LM folder", default=None)
    # --- reference update: every method with a reference (seed 004)
    ref_update_every: int = _m("reference update period tau in optimizer steps (16/32/64 in seed 004); 0 = off",
                               default=0, min=0, max=100000)
    ref_bound: float = _m("reference divergence bound delta (per-element mse scale, see trainer/reference.py); "
                          "0.005 SD1.5, 0.002 SDXL", default=0.005, min=1e-6, max=10.0, step=0.001)
    ref_on_exceed: str = _m("when the bound is exceeded: freeze (keep the last reference) or reinit (reset it to "
                            "the base model)", default="freeze", choices=ON_EXCEED)
    ref_probe_size: int = _m("reference update: winners of the batch used to estimate the divergence", default=4)
    ref_probe_timesteps: int = _m("reference update: timesteps per winner in the divergence estimate", default=4)

    def __post_init__(self) -> None:
        errors = []

        def check(ok: bool, msg: str) -> None:
            if not ok:
                errors.append(msg)

        def one_of(name: str, allowed) -> None:
            check(getattr(self, name) in allowed, f"{name} {getattr(self, name)!r} is not one of {list(allowed)}")

        from .methods import METHODS  # the registry of method implementations (imported when a config is made)

        check(self.method in METHODS, f"method {self.method!r} is not one of {list(METHODS)}")
        check(self.beta > 0, f"beta must be > 0, got {self.beta}")
        check(0 < self.lam <= 1, f"lam must be in (0, 1], got {self.lam}")
        check(0 <= self.snpo_p <= 1, f"snpo_p must be in [0, 1], got {self.snpo_p}")
        one_of("timestep_sampler", TIMESTEP_SAMPLERS)
        check(0 < self.timestep_gamma <= 1, f"timestep_gamma must be in (0, 1], got {self.timestep_gamma}")
        check(self.timestep_bins >= 1, f"timestep_bins must be >= 1, got {self.timestep_bins}")
        one_of("timestep_weight", TIMESTEP_WEIGHTS)
        one_of("tdft_timesteps", TDFT_TIMESTEPS)
        check(self.tdft_solver_steps >= 1, f"tdft_solver_steps must be >= 1, got {self.tdft_solver_steps}")
        check(self.tdft_k >= 1, f"tdft_k must be >= 1, got {self.tdft_k}")
        one_of("tdft_start", TDFT_STARTS)
        check(math.isfinite(self.tdft_guidance), f"tdft_guidance must be finite, got {self.tdft_guidance}")
        one_of("tdft_loss", TDFT_X0_LOSSES)
        check(self.tdft_huber_c > 0, f"tdft_huber_c must be > 0, got {self.tdft_huber_c}")
        check(0 <= self.ema_decay < 1, f"ema_decay must be in [0, 1), got {self.ema_decay}")
        check(self.ddspo_beta > 0, f"ddspo_beta must be > 0, got {self.ddspo_beta}")
        one_of("ddspo_loser", DDSPO_LOSERS)
        one_of("ddspo_loss_weighting", LOSS_WEIGHTINGS)
        check(0 <= self.ddspo_min_frac <= self.ddspo_max_frac <= 1,
              f"need 0 <= ddspo_min_frac <= ddspo_max_frac <= 1, got {self.ddspo_min_frac}, {self.ddspo_max_frac}")
        one_of("ddspo_rewriter", REWRITERS)
        check(self.ddspo_rewriter != "local_lm" or bool(self.ddspo_rewriter_path),
              "ddspo_rewriter 'local_lm' needs ddspo_rewriter_path (a local model folder)")
        check(self.ref_update_every >= 0, f"ref_update_every must be >= 0 (0 = off), got {self.ref_update_every}")
        check(self.ref_bound > 0, f"ref_bound must be > 0, got {self.ref_bound}")
        one_of("ref_on_exceed", ON_EXCEED)
        check(self.ref_probe_size >= 1, f"ref_probe_size must be >= 1, got {self.ref_probe_size}")
        check(self.ref_probe_timesteps >= 1, f"ref_probe_timesteps must be >= 1, got {self.ref_probe_timesteps}")
        if errors:
            raise ValueError("invalid method config: " + "; ".join(errors))


def method_config_help() -> dict[str, str]:
    """field name -> help text (for the CLI generator and docs)."""
    return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(MethodConfig)}


@dataclass
class TrainConfig(MethodConfig):
    # --- model and data
    model: str = _h("", "base model: a diffusers folder or a single-file .safetensors checkpoint (SD1.x / SDXL)")
    data_kind: str = _h("auto", "data source kind (trainer/data): auto, jsonl, folders, pickapic, prompts, images; "
                                "auto guesses from data_path")
    data_path: list[str] = _h([], "data source path(s); several sources are concatenated")
    resolution: int = _h(512, "training resolution in pixels (square); SDXL default size conditioning too",
                         min=64, max=4096, step=64)
    crop: str = _h("center", "crop to the resolution: center or random")
    random_flip: bool = _h(False, "random horizontal flip (the same flip for both images of a pair)")
    cache_dir: str = _h("", "latent + text-embedding cache folder ('' = no cache)")
    cache_batch_size: int = _h(4, "images per VAE call while filling the latent cache (its memory peak: lower it "
                                  "if the cache fill runs out of memory)", min=1, max=256)
    # --- batch and schedule
    batch_size: int = _h(1, "pairs (or prompts) per device per micro-batch", min=1, max=256)
    grad_accum: int = _h(1, "micro-batches accumulated per optimizer step; effective batch = batch_size x grad_accum x processes",
                         min=1, max=1024)
    steps: int = _h(1000, "optimizer steps", min=1, max=1000000)
    lr: float = _h(1e-5, "peak learning rate of the LoRA weights", min=1e-8, max=1.0, step=1e-6, round=1e-8)
    lr_scheduler: str = _h("constant_with_warmup", f"diffusers get_scheduler name: {', '.join(LR_SCHEDULERS)}")
    lr_warmup_steps: int = _h(0, "linear warm-up steps")
    optimizer: str = _h("adamw", "adamw | adamw8bit (bitsandbytes; falls back to adamw with a message) | adafactor",
                        choices=OPTIMIZERS)
    adam_beta1: float = _h(0.9, "Adam beta1")
    adam_beta2: float = _h(0.999, "Adam beta2")
    adam_eps: float = _h(1e-8, "Adam epsilon")
    weight_decay: float = _h(1e-2, "decoupled weight decay")
    max_grad_norm: float = _h(1.0, "clip the global grad norm to this (0 = no clipping)")
    max_nonfinite_steps: int = _h(20, "stop the run (saving its last finite state) after this many consecutive steps "
                                      "whose loss or gradient norm is not finite; such steps change nothing and are "
                                      "counted as train/skipped_nonfinite; a run that skipped more than a tenth of its steps fails at its end "
                                      "(0 = never stop, never fail)")
    # --- precision and memory
    mixed_precision: str = _h("no", "no | fp16 | bf16: autocast dtype; frozen base weights are stored in it (GPU)",
                              choices=PRECISIONS)
    gradient_checkpointing: bool = _h(False, "recompute UNet activations in backward (less memory, ~30% slower)")
    seed: int = _h(0, "seed of LoRA init, noise, timesteps and data order", min=0, max=2**31 - 1)
    cpu: bool = _h(False, "force CPU even when a GPU is present")
    # --- LoRA
    lora_rank: int = _h(8, "LoRA rank", min=1, max=256)
    lora_alpha: float = _h(8.0, "LoRA alpha (scale = alpha / rank)")
    lora_targets: str = _h("attn", "target modules: attn | attn_ff | attn+conv | attn_ff+conv | comma list of module names",
                           presets=target_presets)
    lora_init: str = _h("", "continue training from this LoRA file ('' = fresh LoRA)")
    # --- output
    output_dir: str = _h("runs/npo", "run folder: the LoRA, checkpoints/, logs, validation images")
    output_name: str = _h("", "LoRA file name without extension ('' = '<method>_lora')")
    save_format: str = _h("kohya", "LoRA file format (core.offsets.save_offset): kohya loads in ComfyUI, Forge, A1111, diffusers")
    checkpoint_every: int = _h(500, "save a resumable checkpoint every N steps (0 = only at the end / on interrupt)",
                               min=0, max=1000000)
    keep_last: int = _h(3, "checkpoints kept (older ones deleted)")
    log_every: int = _h(10, "log metrics every N steps (CSV, TensorBoard when installed)")
    validate_every: int = _h(0, "validation images + curves every N steps (0 = never)", min=0, max=1000000)
    validation_prompts: list[str] = _h(["a photo of a cat"], "prompts of the validation grid")
    validation_seeds: list[int] = _h([0, 1], "seeds of the validation grid (one column each)")
    validation_sample_steps: int = _h(20, "sampler steps of validation images")
    validation_guidance: float = _h(7.5, "CFG scale of validation images")

    def __post_init__(self):
        parent = getattr(super(), "__post_init__", None)
        if parent is not None:
            parent()
        for name in ("batch_size", "grad_accum", "steps", "lora_rank", "log_every", "keep_last", "resolution",
                     "validation_sample_steps", "cache_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("checkpoint_every", "validate_every", "lr_warmup_steps", "max_nonfinite_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name, allowed in (("optimizer", OPTIMIZERS), ("mixed_precision", PRECISIONS),
                              ("lr_scheduler", LR_SCHEDULERS), ("crop", ("center", "random"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r}: expected one of {', '.join(allowed)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.lora_alpha <= 0:
            raise ValueError(f"lora_alpha must be > 0, got {self.lora_alpha}")
        if self.max_grad_norm < 0:
            raise ValueError(f"max_grad_norm must be >= 0 (0 = off), got {self.max_grad_norm}")
        if self.lr_warmup_steps > self.steps:
            raise ValueError(f"lr_warmup_steps ({self.lr_warmup_steps}) exceeds steps ({self.steps})")
        if self.validate_every and not (self.validation_prompts and self.validation_seeds):
            raise ValueError("validate_every > 0 needs validation_prompts and validation_seeds")
        if self.resolution % 8:
            raise ValueError(f"resolution must be a multiple of 8, got {self.resolution}")

    # ------------------------------------------------------------------ io
    @property
    def effective_batch(self) -> int:
        """Pairs per optimizer step on one process (x number of processes under DDP)."""
        return self.batch_size * self.grad_accum

    @property
    def lora_name(self) -> str:
        return lora_name_of(self.output_name, self.method)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)

    def replace(self, **changes) -> "TrainConfig":
        return from_dict({**self.to_dict(), **changes}, source="replace()")


def lora_name_of(output_name: str, method: str) -> str:
    """The LoRA file's stem: `output_name`, or '<method>_lora' when it is empty."""
    return output_name or f"{method}_lora"


def field_types(cls=TrainConfig) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _strip_optional(tp):
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return (args[0] if len(args) == 1 else tp), True
    return tp, False


def coerce(name: str, value: Any, tp) -> Any:
    """Convert `value` (a YAML value or a command-line string) to the field type `tp`."""
    base, optional = _strip_optional(tp)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null", "")):
        if optional:
            return None
        raise ValueError(f"{name}: a value is required")
    if typing.get_origin(base) is list:
        (item,) = typing.get_args(base) or (str,)
        if isinstance(value, str):
            import yaml

            value = yaml.safe_load(value) if value.strip().startswith("[") else [v for v in value.split("|") if v != ""]
        if not isinstance(value, (list, tuple)):
            value = [value]
        return [coerce(name, v, item) for v in value]
    if base is bool:
        if isinstance(value, bool):
            return value
        s = str(value).strip().lower()
        if s in ("1", "true", "yes", "on"):
            return True
        if s in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{name}: expected true/false, got {value!r}")
    if base in (int, float, str):
        try:
            if base is int and isinstance(value, float) and not value.is_integer():
                raise ValueError
            return base(float(value)) if base is int and isinstance(value, str) and "e" in value.lower() else base(value)
        except (TypeError, ValueError):
            raise ValueError(f"{name}: expected {base.__name__}, got {value!r}") from None
    return value


def from_dict(d: dict[str, Any], source: str = "config") -> TrainConfig:
    """Build a TrainConfig from a mapping; unknown keys are an error naming the source and a close match."""
    types_ = field_types()
    unknown = [k for k in d if k not in types_]
    if unknown:
        hints = {k: difflib.get_close_matches(k, list(types_), n=1) for k in unknown}
        msg = ", ".join(f"{k!r}" + (f" (did you mean {h[0]!r}?)" if h else "") for k, h in hints.items())
        raise ValueError(f"{source}: unknown config key(s) {msg}")
    return TrainConfig(**{k: coerce(k, v, types_[k]) for k, v in d.items()})


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """A YAML (.yaml/.yml) or TOML (.toml) mapping of TrainConfig fields."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file {p} does not exist")
    text = p.read_text(encoding="utf-8")
    if p.suffix.lower() == ".toml":
        import tomllib

        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"{p}: invalid TOML: {e}") from None
    else:
        import yaml

        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"{p}: invalid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{p}: expected a mapping of config keys, got {type(data).__name__}")
    return data


def preset_path(name: str) -> Path:
    p = CONFIG_DIR / f"{name}.yaml"
    if not p.is_file():
        names = sorted(q.stem for q in CONFIG_DIR.glob("*.yaml"))
        raise FileNotFoundError(f"unknown preset {name!r} (no {p}); presets: {', '.join(names)}")
    return p


def parse_set(items: list[str]) -> dict[str, str]:
    """['lr=1e-4', 'method=snpo'] -> {'lr': '1e-4', 'method': 'snpo'}."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set {item!r}: expected key=value")
        out[key.strip()] = value
    return out


def load_config(preset: str | None = None, config: str | None = None, overrides: dict[str, Any] | None = None,
                sets: list[str] | None = None) -> TrainConfig:
    """preset < config file < overrides (typed CLI flags) < --set key=value.

    A preset's `lr_warmup_steps` (not set by the user) longer than the run's `steps` is capped at
    `steps` with a notice on stderr (a short test run of a preset); a user's value stays an error.
    `output_dir`, unless the user sets it, is `runs/<preset>_<method>` (`runs/<method>` without a preset)."""
    d: dict[str, Any] = {}
    if preset:
        d.update(read_config_file(preset_path(preset)))
    preset_keys = set(d)
    for user in (read_config_file(config) if config else {}, overrides or {}, parse_set(sets or [])):
        d.update(user)
        preset_keys -= set(user)
    if "lr_warmup_steps" in preset_keys and "steps" in d:
        warmup, steps = (coerce(k, d[k], int) for k in ("lr_warmup_steps", "steps"))
        if warmup > steps >= 1:
            import sys

            print(f"train: lr_warmup_steps {warmup} of preset {preset} capped at steps {steps} (set lr_warmup_steps "
                  "to choose)", file=sys.stderr)
            d["lr_warmup_steps"] = steps
    flags = {**(overrides or {}), **parse_set(sets or [])}
    if "beta" in flags:  # a β flag for a method whose β is another field (or none) would be silently ignored
        from .methods import METHODS

        method = METHODS.get(str(d.get("method", MethodConfig.method)))
        key = getattr(method, "beta_key", "beta") if method is not None else "beta"
        if key is None:
            raise ValueError(f"{method.name} has no beta (it is not a preference loss); drop --beta")
        if key != "beta":
            raise ValueError(f"{method.name} reads its beta from {key} (now {d.get(key, getattr(MethodConfig, key))}), "
                             f"not beta: set --{key.replace('_', '-')} (or --set {key}=...) instead of --beta, and "
                             "scale lr with it: the logit moves about beta*lr per step, so doubling beta means "
                             "halving lr (docs/training.md)")
    if "output_dir" not in d or "output_dir" in preset_keys:  # not chosen by the user: named by preset and method
        method = str(d.get("method", MethodConfig.method))
        d["output_dir"] = f"runs/{preset}_{method}" if preset else f"runs/{method}"
    return from_dict(d, source=config or (f"preset {preset}" if preset else "command line"))
