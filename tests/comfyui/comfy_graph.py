"""API-format prompt builder shared by the real-ComfyUI tests (tests/comfyui is on sys.path via conftest.py)."""
from __future__ import annotations


class Graph:
    """Builds API-format prompts."""

    def __init__(self):
        self.p, self.n, self.sinks = {}, 0, []

    def add(self, cls, **inputs):
        self.n += 1
        nid = str(self.n)
        self.p[nid] = {"class_type": cls, "inputs": inputs}
        return nid

    def latent(self, node, index=0):
        """Mark a LATENT output to read back (a SaveLatent makes it an output of the prompt)."""
        self.add("SaveLatent", samples=[node, index], filename_prefix="npo_test/t")
        self.sinks.append(node)
        return node
