"""The training working set a host that already holds the model (ComfyUI) must find free before the
first step: the traced estimate of `trainer.memory_estimate` (one real step on fake tensors of the
model family's config, the same estimator as `train --dry-run`), less the base weights the host
accounts itself."""
from __future__ import annotations

from dataclasses import dataclass

GIB = 2 ** 30


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes of the training working set beyond the loaded base weights, and the trace behind it."""

    total: int  # the training step's peak less the base weights: LoRA, adapters, optimizer state, grads, activations
    peak_gib: float  # the run's traced peak with the base weights (cache fill included)
    model: str  # the config traced: the backend's family's shipped config, or the one given

    def report(self) -> str:
        return (f"training memory estimate {self.total / GIB:.2f} GiB beyond the base weights "
                f"(traced on {self.model}; the run's peak with the weights {self.peak_gib:.2f} GiB)")


def memory_estimate_for(backend, cfg, model: str | None = None) -> MemoryEstimate:
    """The traced estimate for a built backend and a TrainConfig. model: the config to trace (a shipped
    name or a diffusers folder); default the shipped config of the backend's family (ValueError when
    there is none, and for a flow DiT backend, whose working set is not estimated: the caller reserves
    nothing and says so)."""
    from ...trainer.memory_estimate import SHIPPED, training_estimate

    if getattr(backend, "prediction_type", None) == "flow":  # ComfyUI's SD3 / Flux (nodes/comfy/flow.py)
        raise ValueError(f"memory estimate: the training working set of a ComfyUI {backend.family} run (a flow "
                         "DiT) is not estimated (the traced estimate covers the SD1.x / SDXL UNet only)")
    if model is None:
        if backend.family not in SHIPPED:
            raise ValueError(f"memory estimate: no shipped config for family {backend.family!r} "
                             f"(known: {sorted(SHIPPED)})")
        model = backend.family
    device = "cuda" if getattr(getattr(backend, "device", None), "type", "cpu") == "cuda" else "cpu"
    e = training_estimate(cfg, model, device)
    return MemoryEstimate(int(e.training_beyond_base_gib() * GIB), e.peak_gib, str(model))
