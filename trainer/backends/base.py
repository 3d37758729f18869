"""The small protocol every training backend exposes (diffusers now, ComfyUI later).

Methods (`trainer/methods.py`) talk to the network only through this protocol, so the same
method code runs on a diffusers SD1.x/SDXL model, on the embedded digits world and on a model
that ComfyUI loaded. Adapters are named LoRA adapters on ONE network (never a second copy):
  "policy"  the trainable LoRA
  None      the base network, every adapter off (the frozen reference of plain DPO)
  "ref"     a reference LoRA (reference-update of "Rethinking DPO"), frozen between updates
  "ema"     an EMA teacher LoRA (Self-NPO / TDFT)
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from ...core.cond import Cond


@runtime_checkable
class Backend(Protocol):
    family: str  # a registered model family ("sd1", "sdxl", a plug-in's): families.get_family(family)
    # of the underlying network: "epsilon" or "v_prediction", or "flow" (core.flow.FLOW: rectified flow,
    # the network predicts v = ε − x0 at continuous t ∈ [0, 1]). A flow backend has abar None and, instead
    # of predict_eps, `predict_v(x_t [B, C, h, w], t [B] float in [0, 1], cond, adapter) -> v [B, C, h, w]`
    # (same adapter and gradient rules); the methods read the parameterisation through
    # trainer/methods.py's `Noising`, never through a method's name.
    prediction_type: str
    abar: torch.Tensor | None  # [T] float64, alphas_cumprod of the model's own schedule (None: flow)
    device: torch.device

    @property
    def num_train_timesteps(self) -> int: ...

    def encode_prompts(self, prompts: list[str], *, negative: bool = False) -> Cond:
        """Text conditioning for each prompt (SDXL: with default size conditioning). negative=True: the prompts
        are negative / unconditional ones, which a family may encode differently (SANA: without the pipeline's
        instruction prefix); the others encode them as any prompt."""

    def null_cond(self, batch_size: int) -> Cond:
        """The encoded empty prompt, exactly what the model saw under CFG dropout, repeated."""

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [B, 3, H, W] in [-1, 1] -> scaled latents [B, C, h, w] (identity in pixel space)."""

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """scaled latents -> pixels in [-1, 1]."""

    def predict_eps(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond, adapter: str | None = "policy") -> torch.Tensor:
        """eps prediction [B, C, h, w] of the network with only `adapter` active (None: base).

        v-prediction networks are converted to eps here. Gradients flow only when
        adapter == "policy" and grad is enabled; other adapters are frozen.
        """

    def add_adapter(self, name: str, init_from: str | None = "policy") -> None:
        """Create a frozen adapter `name` (a copy of `init_from`'s weights, or zero-init if None)."""

    def copy_adapter(self, src: str, dst: str) -> None:
        """dst <- src, weights only."""

    def ema_update(self, dst: str, src: str, decay: float) -> None:
        """dst <- decay * dst + (1 - decay) * src."""

    def reset_adapter(self, name: str) -> None:
        """Zero the adapter's effect (up-projections to zero): it then equals the base network."""

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """The policy LoRA parameters, the only ones the optimizer sees."""
