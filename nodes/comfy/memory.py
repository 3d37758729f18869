"""The training working set, estimated before the first step (a host with a model manager, such as
ComfyUI, reserves it)."""
from __future__ import annotations

from dataclasses import dataclass

import torch



# ---------------------------------------------------------------------------------------------
# memory: the training working set, asked of ComfyUI's model management before the first step
# ---------------------------------------------------------------------------------------------
# Stored activations per latent pixel per UNet row with grad, at 2-byte activations (fp16/bf16
# autocast). Analytic count of the tensors autograd keeps for backward (per transformer block
# ~30 channel-widths: norms, q/k/v, attention out, GEGLU 8C + 4C + 4C; per ResNet ~7; x1.5 for
# float32 norm statistics and residual copies), summed over the UNet levels at their resolution
# (SD1.x: 320/640/1280 ch, attention on levels 0-2; SDXL: 320/640/1280 ch, 0/2/10 transformer
# blocks). Not calibrated on a GPU: a planning figure, with ACTIVATION_SLACK for the allocator. The figure is
# the family's (`Family.activation_bytes_per_latent_pixel`: SD1.x 350e3, SDXL 650e3).
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


def _activation_bytes(family: str) -> float:
    from ...families import FAMILIES, get_family

    try:
        per_pixel = get_family(family).activation_bytes_per_latent_pixel
    except ValueError:
        per_pixel = None
    if per_pixel is None:
        known = sorted(n for n, f in FAMILIES.items() if f.activation_bytes_per_latent_pixel is not None)
        raise ValueError(f"memory estimate: unknown family {family!r} (expected {known})")
    return per_pixel


def estimate_training_memory(*, family: str, resolution: int, batch_size: int, data_kind: str, policy_params: int,
                             adapter_params: int, optimizer: str, gradient_checkpointing: bool, precision: str,
                             float32_base_params: int = 0) -> MemoryEstimate:
    """The working set of one optimizer step (METHODS forwards, autograd, optimizer) from the run's settings.

    policy_params / adapter_params: trainable LoRA parameters / those of the frozen extra adapters (ref, ema).
    float32_base_params: base weights held in float32 (autocast caches a 2-byte copy of each under fp16/bf16)."""
    per_pixel = _activation_bytes(family)
    if data_kind not in POLICY_ROWS:
        raise ValueError(f"memory estimate: unknown data kind {data_kind!r} (expected {sorted(POLICY_ROWS)})")
    low = precision in ("fp16", "bf16")
    rows = POLICY_ROWS[data_kind] * batch_size
    act = per_pixel * (resolution // 8) ** 2 * rows * (1 if low else 2) * ACTIVATION_SLACK
    if gradient_checkpointing:
        act *= CHECKPOINTED_FRACTION
    return MemoryEstimate(lora=4 * (policy_params + adapter_params), grads=4 * policy_params,
                          optimizer=OPTIMIZER_BYTES_PER_PARAM.get(optimizer, 8) * policy_params,
                          activations=int(act), autocast_weights=2 * float32_base_params if low else 0)


def memory_estimate_for(backend, cfg) -> MemoryEstimate:
    """`estimate_training_memory` for a built backend (its LoRA sizes, base dtype) and a TrainConfig."""
    from ...trainer.methods import METHODS

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
