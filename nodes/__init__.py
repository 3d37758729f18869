"""ComfyUI V3 nodes: NPO, Self-NPO (NPO with a TDFT offset) and SNPO sampling.

Layout: the V3 node shells `sampling.py`, `offsets.py`, `preferences.py`, `training.py` and
`extension.py` (the ComfyExtension) here; what they run on ComfyUI's objects in the host room
`comfy/` (see its `__init__`). ComfyUI modules are imported only when ComfyUI asks for the
extension, so `npo_suite.nodes.comfy.rows` and the training side of `comfy/` import anywhere.
"""
from __future__ import annotations


def __getattr__(name: str):
    if name == "NPOSuiteExtension":
        from .extension import NPOSuiteExtension

        return NPOSuiteExtension
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
