"""The in-memory representation of a weight offset (eta, delta in METHODS.md).

Every loader in `offsets.py` produces an `Offset`; every consumer (merge, branch LoRA, save,
ComfyUI/Forge adapters) reads one. Module keys are *diffusers module paths* of the component:
  unet:  "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
  te1 / te2 (text encoders): "text_model.encoder.layers.0.self_attn.q_proj"
A delta applies to `module.weight` of that nn.Linear / nn.Conv2d: W' = W + scale * delta.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


@dataclass
class LowRankDelta:
    """delta W = scale * up @ (mid) @ down, kohya/PEFT convention.

    down: [r, in] (Linear) or [r, in, kh, kw] (Conv2d); up: [out, r] or [out, r, 1, 1];
    mid: optional LoCon/Tucker core [r, r, kh, kw] (then down is [r, in, 1, 1]); scale = alpha / r.
    """

    down: torch.Tensor
    up: torch.Tensor
    scale: float = 1.0
    mid: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def dense(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The full weight delta (scale included), shaped like the target weight."""
        down, up = self.down.to(dtype), self.up.to(dtype)
        if self.mid is not None:  # LoCon Tucker core (as ComfyUI's lora adapter): W[p,r,k,l] = up[p,i] mid[i,j,k,l] down[j,r]
            w = torch.einsum("i j k l, j r, p i -> p r k l", self.mid.to(dtype), down.flatten(1), up.flatten(1))
            return self.scale * w
        if down.ndim == 2:
            return self.scale * (up @ down)
        if down.shape[2:] == (1, 1) and up.shape[2:] == (1, 1):
            return self.scale * (up.flatten(1) @ down.flatten(1)).reshape(up.shape[0], down.shape[1], 1, 1)
        # conv down [r, in, kh, kw], up [out, r, 1, 1]
        return self.scale * torch.einsum("o r, r i h w -> o i h w", up.flatten(1), down)


@dataclass
class DenseDelta:
    """A full-weight difference (`.diff` keys, or a fine-tuned model minus its base)."""

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    scale: float = 1.0

    def dense(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.scale * self.weight.to(dtype)


Delta = LowRankDelta | DenseDelta


@dataclass
class LoadReport:
    """What a loader recognised: shown to users (CLI, ComfyUI node, Forge panel)."""

    path: str
    format: str  # "kohya", "peft", "comfyui", "diff", "full_unet"
    family: str | None = None  # "sd1", "sdxl", or None when unknown
    matched: int = 0
    unmatched_keys: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        fam = self.family or "unknown family"
        s = f"{self.path}: {self.format} ({fam}), {self.matched} modules"
        if self.unmatched_keys:
            s += f", {len(self.unmatched_keys)} keys matched nothing"
        return s


@dataclass
class Offset:
    """A weight offset: deltas per component, per module path."""

    unet: dict[str, Delta] = field(default_factory=dict)
    text_encoders: dict[str, dict[str, Delta]] = field(default_factory=dict)  # "te1"/"te2" -> modules
    metadata: dict[str, str] = field(default_factory=dict)
    report: LoadReport | None = None
    # True: `unet` is keyed by the file's own LoRA key prefixes ("lora_unet_double_blocks_0_img_attn_qkv",
    # "transformer.transformer_blocks.0.attn.to_q"), not by module paths: a host resolves them against
    # the loaded model with that model's key map (ComfyUI: `comfy.lora.model_lora_keys_unet`), which
    # knows every family's conventions (read.py `load_offset_file_keys`).
    file_keys: bool = False

    def components(self) -> dict[str, dict[str, Delta]]:
        return {"unet": self.unet, **self.text_encoders}

    def is_low_rank(self) -> bool:
        return all(isinstance(d, LowRankDelta) for comp in self.components().values() for d in comp.values())


TE_IGNORED = "ignored (sampling offsets act on the UNet)"


def coverage_line(offset: Offset | None, n_applied: int, unmatched, role: str, te_note: str = TE_IGNORED) -> str:
    """One line for node reports and the WebUI panel: what a file was recognised as and how much of it
    applies to the model at hand. Sampling offsets act on the UNet; `te_note` says what happens to the
    text-encoder part (the WebUI ignores it; the ComfyUI nodes point to NPO Negative CLIP)."""
    if offset is None:
        return f"{role}: none"
    head = f"{offset.report.summary()}; " if offset.report is not None else ""
    s = f"{role}: {head}{n_applied}/{len(offset.unet)} UNet modules apply to this model"
    if unmatched:
        s += f", {len(unmatched)} do not (e.g. {list(unmatched)[0]})"
    n_te = sum(len(v) for v in offset.text_encoders.values())
    if n_te:
        s += f"; {n_te} text-encoder modules {te_note}"
    return s


def delta_shape(d: Delta) -> tuple:
    """Shape of the dense weight delta without computing it."""
    if isinstance(d, DenseDelta):
        return tuple(d.weight.shape)
    if d.down.ndim == 2:
        return (d.up.shape[0], d.down.shape[1])
    kernel = tuple(d.mid.shape[2:]) if d.mid is not None else tuple(d.down.shape[2:])
    return (d.up.shape[0], d.down.shape[1], *kernel)


def delta_numel(d: Delta) -> int:
    """Number of weight entries a delta changes (without materialising it)."""
    if isinstance(d, DenseDelta):
        return d.weight.numel()
    if d.mid is not None:  # LoCon Tucker: up [out, r], mid [r, r, kh, kw], down [r, in, 1, 1]
        return d.up.shape[0] * d.down.shape[1] * d.mid[0, 0].numel()
    return d.up.shape[0] * d.down[0].numel()


def delta_fits(d: Delta, weight_shape: tuple) -> bool:
    """True when the delta changes a weight of `weight_shape`: same size and output dim (a Linear
    delta fits a 1x1 conv weight and back)."""
    out_dim = d.weight.shape[0] if isinstance(d, DenseDelta) else d.up.shape[0]
    return delta_numel(d) == math.prod(weight_shape) and int(out_dim) == int(weight_shape[0])


def _shape_fits(got, want) -> bool:
    """Equal, or equal up to trailing 1x1 dims (Linear proj_in vs 1x1 Conv proj_in)."""
    strip = lambda s: tuple(s[:2]) if len(s) == 4 and tuple(s[2:]) == (1, 1) else tuple(s)  # noqa: E731
    return tuple(got) == tuple(want) or strip(got) == strip(want)
