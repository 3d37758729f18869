"""`TrainConfig`: the one typed configuration of a training run (trl `dpo_config.py` style).

Every field carries its help text (`field(metadata={"help": ...})`); cross-field checks live in
`__post_init__`; the `train` CLI is generated from the fields; every checkpoint stores the
resolved config as YAML. Method hyper-parameters (β, λ, p, ...) come from `MethodConfig`
(trainer/methods.py, beside the method registry it is checked against), which this class extends.

Sources, lowest precedence first: a preset (`configs/NAME.yaml`), a YAML/TOML file, plain CLI
flags (`--lr 1e-4`), `--set key=value` overrides. Values are typed by the field types: a YAML
`1e-4` (a string to YAML 1.1) still becomes a float; list fields take a YAML list or
`a|b|c` on the command line.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .methods import MethodConfig

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
OPTIMIZERS = ("adamw", "adamw8bit", "adafactor")
PRECISIONS = ("no", "fp16", "bf16")
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")


def _h(default: Any, help: str, **kw):
    """A field with its help text and UI metadata in `kw` (min, max, step, round; choices: the allowed
    values, presets: suggested ones, each a tuple or a function returning one), read by the ComfyUI
    node's widgets (`nodes.comfy.session.config_widgets`) and the train CLI's help."""
    if isinstance(default, list):
        return field(default_factory=lambda d=tuple(default): list(d), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


def target_presets() -> tuple[str, ...]:
    """The LoRA target presets (`lora_targets` also takes a comma list of module names)."""
    from ..families.base import UNET_LORA_TARGETS

    return tuple(UNET_LORA_TARGETS)


@dataclass
class TrainConfig(MethodConfig):
    # --- model and data
    model: str = _h("", "base model: a diffusers folder or a single-file .safetensors checkpoint (SD1.x / SDXL)")
    tokenizer: str = _h("", "CLIP tokenizer folder ('' = the model folder's own; for a single-file checkpoint the "
                            "standard CLIP tokenizer shipped in configs/clip_tokenizer)")
    vae: str = _h("", "a diffusers VAE folder or a VAE .safetensors ('' = the model's own; required for a single "
                      "file without VAE weights)")
    prediction_type: str = _h("", "epsilon | v_prediction ('' = detected: a folder's scheduler config, a single "
                                  "file's `v_pred` key as ComfyUI saves it, else the family's default)")
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
    fsdp: bool = _h(False, "several processes: shard the transformer's frozen weights over them (FSDP2 fully_shard; "
                           "the LoRA stays whole on every process); one process: ignored")
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
                              ("prediction_type", ("", "epsilon", "v_prediction")),
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
        if self.fsdp and self.validate_every:
            raise ValueError("fsdp with validate_every: validation grids are sampled on the main process only, and a "
                             "sharded forward needs every process; set validate_every 0 (trainer/fsdp.py)")
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
