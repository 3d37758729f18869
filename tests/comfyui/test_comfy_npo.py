"""NPO / SNPO nodes through ComfyUI's own execution on a random-weight SD1.5 checkpoint (64x64, 1 euler step).

Tolerance: the branch path (per-row hooks, one batched forward) and the merged-weights path
(ComfyUI weight patches, Dual-Model guider) differ only by float32 summation order; we require
max|a-b| <= 1e-4 * max|b| and call two results different when max|a-b| > 1e-2 * max|b|.
"""
from __future__ import annotations

import os

import pytest

if not os.environ.get("COMFYUI_PATH"):
    pytest.skip("COMFYUI_PATH is not set (real-ComfyUI tests are opt-in, see docs/comfyui.md)", allow_module_level=True)

import torch  # noqa: E402

from npo_suite.core.offset_types import LowRankDelta, Offset  # noqa: E402

CKPT = "npo_random_sd15_v1.safetensors"
RTOL_SAME, RTOL_DIFF = 1e-4, 1e-2

# SD1.5 attention blocks (diffusers paths) and their channel counts
BLOCKS = {**{f"down_blocks.{b}.attentions.{i}": c for b, c in ((0, 320), (1, 640), (2, 1280)) for i in (0, 1)},
          "mid_block.attentions.0": 1280,
          **{f"up_blocks.{b}.attentions.{i}": c for b, c in ((1, 1280), (2, 640), (3, 320)) for i in (0, 1, 2)}}


def random_lora(seed: int, rank: int = 4, std: float = 0.08) -> Offset:
    """A random kohya-style LoRA over every attention projection (and proj_in/out convs) of SD1.5."""
    g = torch.Generator().manual_seed(seed)
    unet = {}
    for blk, ch in BLOCKS.items():
        for attn, in_k in (("attn1", ch), ("attn2", 768)):
            for proj, fan_in in (("to_q", ch), ("to_k", in_k), ("to_v", in_k), ("to_out.0", ch)):
                unet[f"{blk}.transformer_blocks.0.{attn}.{proj}"] = LowRankDelta(
                    down=torch.randn(rank, fan_in, generator=g) * std, up=torch.randn(ch, rank, generator=g) * std,
                    scale=1.0)
        unet[f"{blk}.proj_in"] = LowRankDelta(down=torch.randn(rank, ch, 1, 1, generator=g) * std,
                                              up=torch.randn(ch, rank, 1, 1, generator=g) * std, scale=1.0)
    return Offset(unet=unet)


@pytest.fixture(scope="module")
def loras(comfy):
    from npo_suite.core.offsets import save_offset

    names = {}
    for role, seed, folder, std in (("delta", 1, "npo", 0.08), ("eta", 2, "npo", 0.08), ("style", 3, "loras", 0.03)):
        path = comfy.root / folder / f"rand_{role}.safetensors"
        if not path.exists():
            save_offset(random_lora(seed, std=std), path, format="kohya", family="sd1")
        names[role] = f"{folder}/{path.name}"
    return names


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


def base_graph(loras, batch=1, text="a photo of a cat", neg="blurry"):
    g = Graph()
    g.ckpt = g.add("CheckpointLoaderSimple", ckpt_name=CKPT)
    g.pos = g.add("CLIPTextEncode", clip=[g.ckpt, 1], text=text)
    g.neg = g.add("CLIPTextEncode", clip=[g.ckpt, 1], text=neg)
    g.empty = g.add("EmptyLatentImage", width=64, height=64, batch_size=batch)
    g.delta = g.add("NPOSuite_LoadWeightOffset", offset_name=loras["delta"], family="auto", allow_pickle=False)
    g.eta = g.add("NPOSuite_LoadWeightOffset", offset_name=loras["eta"], family="auto", allow_pickle=False)
    g.noise = g.add("RandomNoise", noise_seed=7)
    g.sampler = g.add("KSamplerSelect", sampler_name="euler")
    return g


def ksampler(g, model, cfg=6.0):
    return g.latent(g.add("KSampler", model=[model, 0], positive=[g.pos, 0], negative=[g.neg, 0],
                          latent_image=[g.empty, 0], seed=7, steps=1, cfg=cfg, sampler_name="euler",
                          scheduler="normal", denoise=1.0))


def custom(g, guider, model):
    sig = g.add("BasicScheduler", model=[model, 0], scheduler="normal", steps=1, denoise=1.0)
    return g.latent(g.add("SamplerCustomAdvanced", noise=[g.noise, 0], guider=[guider, 0], sampler=[g.sampler, 0],
                          sigmas=[sig, 0], latent_image=[g.empty, 0]))


def npo_kw(g, beta=1.0, alpha=0.5):
    return dict(negative_offset=[g.delta, 0], beta=beta, positive_offset=[g.eta, 0], alpha=alpha,
                sigma_min=0.0, sigma_max=0.0)


def run(comfy, g):
    out = comfy.run(g.p, g.sinks)
    return {nid: out[nid][0][0]["samples"] for nid in g.sinks}


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def npo_variants(g, model):
    """Apply NPO + KSampler, NPO Guider, Dual-Model guider with the merged negative model.

    The positive model for the merged path is θ+η: a NegativeModel node with (η, β=1) and no δ
    would need δ, so the positive side uses LoraLoader-equivalent weights via a second
    NegativeModel node whose "negative" offset is η at weight 1.
    """
    applied = g.add("NPOSuite_ApplyNPO", model=[model, 0], **npo_kw(g))
    guider = g.add("NPOSuite_NPOGuider", model=[model, 0], positive=[g.pos, 0], negative=[g.neg, 0], cfg=6.0,
                   **npo_kw(g))
    pos_model = g.add("NPOSuite_NegativeModel", model=[model, 0], negative_offset=[g.eta, 0], beta=1.0, alpha=0.0)
    neg_model = g.add("NPOSuite_NegativeModel", model=[model, 0], negative_offset=[g.delta, 0], beta=1.0,
                      positive_offset=[g.eta, 0], alpha=0.5)
    dual = g.add("NPOSuite_DualModelNPOGuider", model=[pos_model, 0], negative_model=[neg_model, 0],
                 positive=[g.pos, 0], negative=[g.neg, 0], cfg=6.0)
    return ksampler(g, applied), custom(g, guider, model), custom(g, dual, model)


def test_npo_paths_agree_and_differ_from_cfg(comfy, loras):
    g = base_graph(loras)
    plain_k = ksampler(g, g.ckpt)
    plain_c = custom(g, g.add("CFGGuider", model=[g.ckpt, 0], positive=[g.pos, 0], negative=[g.neg, 0], cfg=6.0), g.ckpt)
    beta0 = ksampler(g, g.add("NPOSuite_ApplyNPO", model=[g.ckpt, 0], **npo_kw(g, beta=0.0, alpha=0.0)))
    a, b, c = npo_variants(g, g.ckpt)
    out = run(comfy, g)
    assert torch.isfinite(out[a]).all()
    assert rel(out[plain_k], out[plain_c]) < 1e-6  # KSampler and SamplerCustomAdvanced agree
    assert rel(out[a], out[b]) < RTOL_SAME, "Apply NPO + KSampler vs NPO Guider"
    assert rel(out[c], out[b]) < RTOL_SAME, "merged-weights Dual-Model guider vs branch NPO Guider"
    assert rel(out[b], out[plain_c]) > RTOL_DIFF, "NPO must differ from plain CFG"
    # δ really acts: with α = β = 0 and η only on cond rows, the result differs from the β = 1 run
    assert rel(out[beta0], out[a]) > RTOL_DIFF


def test_dual_model_negative_patches_take_effect(comfy, loras):
    """ComfyUI's experimental DualModelGuider bug: a LoRA on the negative model had no effect."""
    g = base_graph(loras)
    neg_model = g.add("NPOSuite_NegativeModel", model=[g.ckpt, 0], negative_offset=[g.delta, 0], beta=1.0, alpha=0.0)
    dual = custom(g, g.add("NPOSuite_DualModelNPOGuider", model=[g.ckpt, 0], negative_model=[neg_model, 0],
                           positive=[g.pos, 0], negative=[g.neg, 0], cfg=6.0), g.ckpt)
    plain = custom(g, g.add("CFGGuider", model=[g.ckpt, 0], positive=[g.pos, 0], negative=[g.neg, 0], cfg=6.0), g.ckpt)
    branch = ksampler(g, g.add("NPOSuite_ApplyNPO", model=[g.ckpt, 0], negative_offset=[g.delta, 0], beta=1.0,
                               alpha=0.0, sigma_min=0.0, sigma_max=0.0))
    out = run(comfy, g)
    assert rel(out[dual], out[plain]) > RTOL_DIFF
    assert rel(out[dual], out[branch]) < RTOL_SAME


def test_composes_with_lora_freeu_batch2_and_post_cfg_hook(comfy, loras):
    g = base_graph(loras, batch=2)
    lora = g.add("LoraLoaderModelOnly", model=[g.ckpt, 0], lora_name=loras["style"].split("/", 1)[1], strength_model=1.0)
    # FreeU (v1): FreeU_V2 min-max-normalises the deepest feature map, which is 1x1 at 64x64 -> 0/0 = NaN
    freeu = g.add("FreeU", model=[lora, 0], b1=1.1, b2=1.2, s1=0.9, s2=0.2)
    hooked = g.add("CFGNorm", model=[freeu, 0], strength=0.5)  # a sampler_post_cfg_function
    a, b, c = npo_variants(g, hooked)
    no_hook = custom(g, g.add("NPOSuite_NPOGuider", model=[freeu, 0], positive=[g.pos, 0], negative=[g.neg, 0],
                              cfg=6.0, **npo_kw(g)), freeu)
    plain = ksampler(g, hooked)
    out = run(comfy, g)
    assert all(torch.isfinite(v).all() for v in out.values())
    assert out[a].shape[0] == 2
    assert rel(out[a], out[b]) < RTOL_SAME
    assert rel(out[c], out[b]) < RTOL_SAME
    assert rel(out[b], out[plain]) > RTOL_DIFF
    assert rel(out[b], out[no_hook]) > RTOL_DIFF, "the post-CFG hook must still run under NPO"


def test_cfg1_has_no_uncond_pass_so_delta_is_inert(comfy, loras):
    g = base_graph(loras)
    only_delta = g.add("NPOSuite_ApplyNPO", model=[g.ckpt, 0], negative_offset=[g.delta, 0], beta=1.0, alpha=0.0,
                       sigma_min=0.0, sigma_max=0.0)
    a = ksampler(g, only_delta, cfg=1.0)
    b = ksampler(g, g.ckpt, cfg=1.0)
    out = run(comfy, g)
    assert rel(out[a], out[b]) < 1e-6


def test_sigma_range_outside_is_plain_cfg_of_positive_model(comfy, loras):
    g = base_graph(loras)
    # sigma window above the schedule's max (~14.6): δ never acts -> CFG of θ+η
    off = g.add("NPOSuite_ApplyNPO", model=[g.ckpt, 0], negative_offset=[g.delta, 0], beta=1.0,
                positive_offset=[g.eta, 0], alpha=0.0, sigma_min=100.0, sigma_max=0.0)
    pos_model = g.add("NPOSuite_NegativeModel", model=[g.ckpt, 0], negative_offset=[g.eta, 0], beta=1.0, alpha=0.0)
    a, b = ksampler(g, off), ksampler(g, pos_model)
    out = run(comfy, g)
    assert rel(out[a], out[b]) < RTOL_SAME


def test_snpo_guider_uses_empty_prompt_and_blend(comfy, loras):
    g = base_graph(loras)
    empty = g.add("CLIPTextEncode", clip=[g.ckpt, 1], text="")
    snpo0 = custom(g, g.add("NPOSuite_SNPOGuider", model=[g.ckpt, 0], clip=[g.ckpt, 1], positive=[g.pos, 0], cfg=6.0,
                            negative=[g.neg, 0], negative_weight=0.0), g.ckpt)
    snpo1 = custom(g, g.add("NPOSuite_SNPOGuider", model=[g.ckpt, 0], clip=[g.ckpt, 1], positive=[g.pos, 0], cfg=6.0,
                            negative=[g.neg, 0], negative_weight=1.0), g.ckpt)
    cfg_empty = custom(g, g.add("CFGGuider", model=[g.ckpt, 0], positive=[g.pos, 0], negative=[empty, 0], cfg=6.0), g.ckpt)
    cfg_neg = custom(g, g.add("CFGGuider", model=[g.ckpt, 0], positive=[g.pos, 0], negative=[g.neg, 0], cfg=6.0), g.ckpt)
    out = run(comfy, g)
    assert rel(out[snpo0], out[cfg_empty]) < 1e-6
    assert rel(out[snpo1], out[cfg_neg]) < 1e-5
    assert rel(out[snpo0], out[cfg_neg]) > RTOL_DIFF


def test_load_offset_report_and_path_checks(comfy, loras):
    import sys

    LoadWeightOffset = comfy.nodes.NODE_CLASS_MAPPINGS["NPOSuite_LoadWeightOffset"]  # the module ComfyUI loaded
    resolve_offset_file = sys.modules[LoadWeightOffset.__module__].resolve_offset_file
    with torch.inference_mode():
        out = LoadWeightOffset.execute(loras["delta"], "auto", False)
    offset, report = out.args if hasattr(out, "args") else out.result
    assert len(offset.unet) == len(BLOCKS) * 9
    assert "kohya" in report and "sd1" in report.lower()
    for bad in ("../x.safetensors", "/etc/passwd", "npo/../../x.safetensors", "checkpoints/" + CKPT):
        with pytest.raises(ValueError):
            resolve_offset_file(bad)
    with pytest.raises(FileNotFoundError, match="no such file"):
        resolve_offset_file("npo/missing.safetensors")


def test_extract_offset_recovers_lora(comfy, loras):
    g = base_graph(loras)
    lora = g.add("LoraLoaderModelOnly", model=[g.ckpt, 0], lora_name=loras["style"].split("/", 1)[1], strength_model=1.0)
    ext = g.add("NPOSuite_ExtractOffset", tuned_model=[lora, 0], base_model=[g.ckpt, 0], rank=4, save_as="extracted")
    g.add("PreviewAny", source=[ext, 1])
    g.sinks.append(ext)
    out = comfy.run(g.p, [ext])
    offset, report = out[ext][0][0], out[ext][1][0]
    assert len(offset.unet) == len(BLOCKS) * 9
    err = float(report.split("relative Frobenius error ")[1].split()[0])
    assert err < 1e-3, report
    assert (comfy.root / "npo" / "extracted.safetensors").exists()


def test_example_workflows_reference_existing_nodes_and_inputs(comfy):
    import json

    files = sorted((comfy.root / "custom_nodes" / "npo_suite" / "example_workflows").glob("*.json"))
    assert len(files) >= 5
    for f in files:
        prompt = json.loads(f.read_text())
        for nid, node in prompt.items():
            cls = comfy.nodes.NODE_CLASS_MAPPINGS.get(node["class_type"])
            assert cls is not None, f"{f.name}: node {nid} uses unknown {node['class_type']}"
            spec = cls.INPUT_TYPES()
            known = {**spec.get("required", {}), **spec.get("optional", {})}
            for name, value in node["inputs"].items():
                assert name in known, f"{f.name}: {node['class_type']} has no input {name!r}"
                if isinstance(value, list):
                    assert value[0] in prompt, f"{f.name}: node {nid} links to missing node {value[0]}"
