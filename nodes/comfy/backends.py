"""Which training backend trains a ComfyUI MODEL: `ComfyFlowBackend` (nodes/comfy/flow.py) for ComfyUI's
SD3 / Flux DiTs, `ComfyBackend` (nodes/comfy/backend.py) otherwise, which refuses a family it does not train
with its name. One place that knows both, so neither module imports the other's subclass."""
from __future__ import annotations

from ...trainer.backends.diffusers import BackendOptions
from .backend import FLOW_CLASSES, ComfyBackend
from .flow import ComfyFlowBackend


def backend_for(model, clip, vae=None, *, options: BackendOptions | None = None) -> ComfyBackend:
    """The backend of ComfyUI's MODEL (ModelPatcher), CLIP and VAE, built with the class's `from_comfy`."""
    if type(model.model).__name__ in FLOW_CLASSES:
        return ComfyFlowBackend.from_comfy(model, clip, vae, options=options)
    return ComfyBackend.from_comfy(model, clip, vae, options=options)
