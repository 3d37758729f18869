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


def base_graph(ckpt: str, loras: dict, batch: int = 1, text: str = "a photo of a cat", neg: str = "blurry") -> Graph:
    """Checkpoint, both prompts, a 64x64 empty latent, the δ and η offsets, noise and an euler sampler."""
    g = Graph()
    g.ckpt = g.add("CheckpointLoaderSimple", ckpt_name=ckpt)
    g.pos = g.add("CLIPTextEncode", clip=[g.ckpt, 1], text=text)
    g.neg = g.add("CLIPTextEncode", clip=[g.ckpt, 1], text=neg)
    g.empty = g.add("EmptyLatentImage", width=64, height=64, batch_size=batch)
    g.delta = g.add("NPOSuite_LoadWeightOffset", offset_name=loras["delta"], family="auto", allow_pickle=False)
    g.eta = g.add("NPOSuite_LoadWeightOffset", offset_name=loras["eta"], family="auto", allow_pickle=False)
    g.noise = g.add("RandomNoise", noise_seed=7)
    g.sampler = g.add("KSamplerSelect", sampler_name="euler")
    return g


def ksampler(g: Graph, model: str, cfg: float = 6.0, steps: int = 1) -> str:
    """A stock KSampler on `model` with the graph's prompts and latent (seed 7); its LATENT is read back."""
    return g.latent(g.add("KSampler", model=[model, 0], positive=[g.pos, 0], negative=[g.neg, 0],
                          latent_image=[g.empty, 0], seed=7, steps=steps, cfg=cfg, sampler_name="euler",
                          scheduler="normal", denoise=1.0))
