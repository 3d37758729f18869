"""Forge: NPO as the UNet's `model_function_wrapper`, which receives each batched forward with its
`cond_or_uncond` chunk kinds (installed per sampling pass by `scripts/npo_webui.py`)."""
from __future__ import annotations

import torch

from .row_layouts import forge_uncond_flags
from .runtime import NPORuntime
from .verify import VerifyLog


class ForgeNPOWrapper:
    """Forge `model_function_wrapper` (UnetPatcher.set_model_unet_function_wrapper).

    Reads `cond_or_uncond`, gives the rows their offsets for this forward, and chains a wrapper
    set before it (which then runs inside our hooks). The sigma is Forge's k-diffusion sigma.
    """

    def __init__(self, runtime: NPORuntime, previous=None, verify: VerifyLog | None = None):
        self.runtime, self.previous, self.verify = runtime, previous, verify

    def __deepcopy__(self, memo):  # UnetPatcher.clone deep-copies model_options: share, don't copy tensors
        return self

    def __call__(self, apply_model, args: dict) -> torch.Tensor:
        x = args["input"]  # [n_chunks * B, C, H, W]
        uncond = forge_uncond_flags(list(args["cond_or_uncond"]), x.shape[0])
        sigma = float(args["timestep"].flatten()[0])

        def forward():
            if self.previous is not None:
                return self.previous(apply_model, args)
            return apply_model(x, args["timestep"], **args["c"])

        out = self.runtime.run(uncond, sigma, forward)
        if self.verify is not None:
            self.verify.check(self.runtime.unet, self.runtime.plan, uncond, sigma, forward, out)
        return out
