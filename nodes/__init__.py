"""ComfyUI V3 nodes: NPO, Self-NPO (NPO with a TDFT offset) and SNPO sampling.

Layout: `rows.py` (per-row offset bookkeeping and the branch wrapper; plain torch, tested without
ComfyUI), `comfy_branch.py` (the ComfyUI adapter: key mapping, patches, guiders), `sampling.py`
and `offsets.py` (thin V3 node shells), `extension.py` (the ComfyExtension). ComfyUI modules are
imported only when ComfyUI asks for the extension, so `npo_suite.nodes.rows` imports anywhere.
"""
from __future__ import annotations


def __getattr__(name: str):
    if name == "NPOSuiteExtension":
        from .extension import NPOSuiteExtension

        return NPOSuiteExtension
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
