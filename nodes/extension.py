"""The V3 extension object ComfyUI gets from the root `comfy_entrypoint`."""
from __future__ import annotations

import logging

from comfy_api.latest import ComfyExtension, io

log = logging.getLogger("npo_suite")


def _training_nodes() -> list[type[io.ComfyNode]]:
    """The training nodes (nodes/training.py). They need the trainer's dependencies; if those are
    broken the sampling nodes still load and the reason is logged."""
    try:
        from . import training
    except Exception as e:  # noqa: BLE001 - report any import problem, keep the sampling nodes
        log.warning("NPO Suite: training nodes not loaded: %s: %s", type(e).__name__, e)
        return []
    training.register_folders()
    from . import preferences

    preferences.register_folder()
    return [*training.TRAINING_NODES, *preferences.NODES]


class NPOSuiteExtension(ComfyExtension):
    async def on_load(self) -> None:
        from .offsets import register_folder

        register_folder()

    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        from . import offsets, sampling

        offsets.register_folder()  # ComfyUI 0.3.6x does not call on_load: register here as well
        return [*sampling.NODES, *offsets.NODES, *_training_nodes()]
