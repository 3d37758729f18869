"""NPO / SNPO nodes through ComfyUI's own execution on a random-weight SD1.5 checkpoint (64x64, 1 euler step).

Tolerance: the branch path (per-row hooks, one batched forward) and the merged-weights path
(ComfyUI weight patches, Dual-Model guider) differ only by float32 summation order; we require
max|a-b| <= 1e-4 * max|b| and call two results different when max|a-b| > 1e-2 * max|b|.
NPO Negative CLIP vs the stock LoraLoader on the CLIP: the same patches in the same order through
the same code, <= 1e-6 (measured: 0.0). Low-VRAM partial load vs normal load: <= 1e-5 (measured: 0.0).
"""
from __future__ import annotations

import os

import pytest

if not os.environ.get("COMFYUI_PATH"):
    pytest.skip("COMFYUI_PATH is not set (real-ComfyUI tests are opt-in, see docs/comfyui.md)", allow_module_level=True)

import torch  # noqa: E402
from informative import assert_informative  # noqa: E402

from npo_suite.core.offsets.types import LowRankDelta, Offset  # noqa: E402
import comfy_graph  # noqa: E402
from comfy_graph import ksampler  # noqa: E402

CKPT = "npo_random_sd15_v1.safetensors"
RTOL_SAME, RTOL_DIFF = 1e-4, 1e-2

# SD1.5 attention blocks (diffusers paths) and their channel counts
BLOCKS = {**{f"down_blocks.{b}.attentions.{i}": c for b, c in ((0, 320), (1, 640), (2, 1280)) for i in (0, 1)},
          "mid_block.attentions.0": 1280,
          **{f"up_blocks.{b}.attentions.{i}": c for b, c in ((1, 1280), (2, 640), (3, 320)) for i in (0, 1, 2)}}


# CLIP-L linears per encoder layer: (module, fan_in, fan_out)
CLIP_L_LINEARS = [*((f"self_attn.{p}", 768, 768) for p in ("q_proj", "k_proj", "v_proj", "out_proj")),
                  ("mlp.fc1", 768, 3072), ("mlp.fc2", 3072, 768)]


def random_lora(seed: int, rank: int = 4, std: float = 0.08, te: bool = False) -> Offset:
    """A random kohya-style LoRA over every attention projection (and proj_in/out convs) of SD1.5;
    with `te`, also over every attention / MLP linear of the CLIP-L text encoder (`lora_te_*` keys)."""
    g = torch.Generator().manual_seed(seed)
    tes = {}
    if te:
        tes["te1"] = {f"text_model.encoder.layers.{i}.{m}": LowRankDelta(
            down=torch.randn(rank, fan_in, generator=g) * std, up=torch.randn(fan_out, rank, generator=g) * std, scale=1.0)
            for i in range(12) for m, fan_in, fan_out in CLIP_L_LINEARS}
    unet = {}
    for blk, ch in BLOCKS.items():
        for attn, in_k in (("attn1", ch), ("attn2", 768)):
            for proj, fan_in in (("to_q", ch), ("to_k", in_k), ("to_v", in_k), ("to_out.0", ch)):
                unet[f"{blk}.transformer_blocks.0.{attn}.{proj}"] = LowRankDelta(
                    down=torch.randn(rank, fan_in, generator=g) * std, up=torch.randn(ch, rank, generator=g) * std,
                    scale=1.0)
        unet[f"{blk}.proj_in"] = LowRankDelta(down=torch.randn(rank, ch, 1, 1, generator=g) * std,
                                              up=torch.randn(ch, rank, 1, 1, generator=g) * std, scale=1.0)
    return Offset(unet=unet, text_encoders=tes)


@pytest.fixture(scope="module")
def loras(comfy):
    from npo_suite.core.offsets import save_offset

    names = {}
    for role, seed, folder, std, te in (("delta", 1, "npo", 0.08, False), ("eta", 2, "npo", 0.08, False),
                                        ("style", 3, "loras", 0.03, False), ("delta_te", 4, "loras", 0.08, True),
                                        ("eta_te", 5, "loras", 0.05, True)):
        path = comfy.root / folder / f"rand_{role}.safetensors"
        if not path.exists():
            save_offset(random_lora(seed, std=std, te=te), path, format="kohya", family="sd1")
        names[role] = f"{folder}/{path.name}"
    return names


def base_graph(loras, **kw):
    return comfy_graph.base_graph(CKPT, loras, **kw)


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


def run_raw(comfy, g):
    """Raw cached outputs of the sink nodes (any output type, e.g. CONDITIONING, CLIP, STRING)."""
    return comfy.run(g.p, g.sinks)


def rel(a, b):
    assert_informative(a, b, name="compared tensors")  # no agreement of two broken (NaN / constant) outputs
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


# ---------------------------------------------------------------------------------------------
# NPO Negative CLIP: the text-encoder part of θ+α·η+β·δ on the negative prompt
# ---------------------------------------------------------------------------------------------
RTOL_CLIP = 1e-6  # same patches through the same comfy.lora.calculate_weight: only float rounding may differ


def cond_of(out, nid):
    """(tokens [1, 77, 768], pooled [1, 768]) of a CLIPTextEncode node's cached output."""
    c = out[nid][0][0]
    return c[0][0], c[0][1].get("pooled_output")


def encode(g, clip, text="blurry, low quality"):
    nid = g.add("CLIPTextEncode", clip=clip, text=text)
    g.add("PreviewAny", source=[nid, 0])  # an output node, so that the encode runs
    g.sinks.append(nid)
    return nid


def test_negative_clip_equals_stock_lora_loader_on_the_clip(comfy, loras):
    g = base_graph(loras)
    d_te = g.add("NPOSuite_LoadWeightOffset", offset_name=loras["delta_te"], family="auto", allow_pickle=False)
    e_te = g.add("NPOSuite_LoadWeightOffset", offset_name=loras["eta_te"], family="auto", allow_pickle=False)
    ours = g.add("NPOSuite_NegativeCLIP", clip=[g.ckpt, 1], negative_offset=[d_te, 0], beta=0.7, alpha=0.0)
    both = g.add("NPOSuite_NegativeCLIP", clip=[g.ckpt, 1], negative_offset=[d_te, 0], beta=0.7,
                 positive_offset=[e_te, 0], alpha=-0.4)
    file = {k: loras[k].split("/", 1)[1] for k in ("delta_te", "eta_te")}
    stock = g.add("LoraLoader", model=[g.ckpt, 0], clip=[g.ckpt, 1], lora_name=file["delta_te"],
                  strength_model=0.0, strength_clip=0.7)
    stacked = g.add("LoraLoader", model=[stock, 0], clip=[stock, 1], lora_name=file["eta_te"],
                    strength_model=0.0, strength_clip=-0.4)
    g.add("PreviewAny", source=[ours, 1])
    g.sinks += [ours, g.ckpt]
    n_ours, n_both, n_stock, n_stacked, n_plain = (encode(g, [c, i]) for c, i in
                                                   ((ours, 0), (both, 0), (stock, 1), (stacked, 1), (g.ckpt, 1)))
    out = run_raw(comfy, g)
    for a, b in ((n_ours, n_stock), (n_both, n_stacked)):
        (ta, pa), (tb, pb) = cond_of(out, a), cond_of(out, b)
        assert rel(ta, tb) <= RTOL_CLIP and rel(pa, pb) <= RTOL_CLIP, (rel(ta, tb), rel(pa, pb))
    t_plain, _ = cond_of(out, n_plain)
    assert rel(cond_of(out, n_ours)[0], t_plain) > RTOL_DIFF, "the TE part must change the encoding"
    assert rel(cond_of(out, n_both)[0], cond_of(out, n_ours)[0]) > RTOL_DIFF, "α·η's TE part must act too"
    report = out[ours][1][0]
    assert "negative δ x 0.7: 72/72 text-encoder modules apply (te1 72/72)" in report, report

    # no TE part: the CLIP comes back unchanged; an SDXL offset on this SD1.x CLIP: a clear error, nothing patched
    clip = out[g.ckpt][1][0]
    NegativeCLIP = comfy.nodes.NODE_CLASS_MAPPINGS["NPOSuite_NegativeCLIP"]
    unet_only = Offset(unet={"x": LowRankDelta(torch.zeros(1, 4), torch.zeros(4, 1))})
    res = NegativeCLIP.execute(clip, unet_only, 1.0)
    same, msg = res.args if hasattr(res, "args") else res.result
    assert same is clip and "no text-encoder part" in msg and "CLIP unchanged" in msg
    te2 = {"text_model.encoder.layers.0.mlp.fc1": LowRankDelta(torch.zeros(2, 1280), torch.zeros(5120, 2))}
    n_patches = len(clip.patcher.patches)
    with pytest.raises(ValueError, match=r"te2.*SD1\.x CLIP \(clip_l only\)"):
        NegativeCLIP.execute(clip, Offset(text_encoders={"te2": te2}), 1.0)
    assert len(clip.patcher.patches) == n_patches


def test_npo_guider_with_negative_clip_changes_the_latent(comfy, loras):
    """Full NPO: the negative prompt encoded by θ+β·δ's text encoder, the UNet's negative rows by θ+α·η+β·δ."""
    g = base_graph(loras)
    d_te = g.add("NPOSuite_LoadWeightOffset", offset_name=loras["delta_te"], family="auto", allow_pickle=False)
    nclip = g.add("NPOSuite_NegativeCLIP", clip=[g.ckpt, 1], negative_offset=[d_te, 0], beta=1.0, alpha=0.0)
    stock = g.add("LoraLoader", model=[g.ckpt, 0], clip=[g.ckpt, 1], lora_name=loras["delta_te"].split("/", 1)[1],
                  strength_model=0.0, strength_clip=1.0)
    kw = dict(negative_offset=[d_te, 0], beta=1.0, positive_offset=[g.eta, 0], alpha=0.5, sigma_min=0.0, sigma_max=0.0)

    def guided(neg):
        node = g.add("NPOSuite_NPOGuider", model=[g.ckpt, 0], positive=[g.pos, 0], negative=[neg, 0], cfg=6.0, **kw)
        return node, custom(g, node, g.ckpt)

    guider, with_te = guided(g.add("CLIPTextEncode", clip=[nclip, 0], text="blurry"))
    _, via_stock = guided(g.add("CLIPTextEncode", clip=[stock, 1], text="blurry"))
    _, without = guided(g.neg)
    g.add("PreviewAny", source=[guider, 1])
    g.sinks.append(guider)
    out = run_raw(comfy, g)
    lat = {k: out[k][0][0]["samples"] for k in (with_te, via_stock, without)}
    assert rel(lat[with_te], lat[via_stock]) < RTOL_SAME
    assert rel(lat[with_te], lat[without]) > RTOL_DIFF
    report = out[guider][1][0]  # the UNet node points to NPO Negative CLIP for the TE part
    assert "negative δ: " in report and "72 text-encoder modules apply to the negative prompt through NPO Negative CLIP" \
        in report, report


# ---------------------------------------------------------------------------------------------
# low-VRAM offloading: ComfyUI's partial load, exercised on CPU
# ---------------------------------------------------------------------------------------------
LOWVRAM_FRACTION = 0.25  # share of the UNet's weight memory loaded regularly; the rest is cast per forward
RTOL_LOWVRAM = 1e-5  # lazy (cast-time) vs merged LoRA: the same fp32 calculate_weight, only summation order may differ


class LowVram:
    """Force ComfyUI's low-VRAM partial load for the diffusion model, in-process on CPU.

    On a CPU load device `load_models_gpu` always loads fully (VRAMState.DISABLED), so `--lowvram`
    alone does nothing here. `enable()` wraps `LoadedModel.model_load` so that a diffusion model gets
    a weight budget of LOWVRAM_FRACTION of its size: `ModelPatcher.load` then loads the largest
    modules that fit regularly and gives the others `comfy_cast_weights = True` with their weight
    patches (the user's LoRA) as `LowVramPatch` weight functions applied at cast time (comfy/ops.py
    `cast_bias_weight`): the `--lowvram` code path of a GPU. `stats` gets one entry per load.
    """

    def __init__(self, comfy):
        import comfy.model_management as mm

        self.comfy, self.mm, self.orig, self.stats = comfy, mm, mm.LoadedModel.model_load, []

    def reset(self):
        self.mm.unload_all_models()  # unpatch_model wipes the lowvram state of every loaded model
        self.comfy.executor.reset()  # cached MODEL/LATENT outputs would skip the sampling

    def enable(self):
        import comfy.model_base

        orig, stats = self.orig, self.stats

        def model_load(loaded, lowvram_model_memory=0, force_patch_weights=False):
            if not isinstance(loaded.model.model, comfy.model_base.BaseModel):
                return orig(loaded, lowvram_model_memory, force_patch_weights)
            extra = LOWVRAM_FRACTION * loaded.model.model_size() - loaded.model.loaded_size()
            out = orig(loaded, max(1.0, extra), force_patch_weights)  # the budget stays at the fraction
            stats.append(lowvram_stats(loaded.model))
            return out

        self.reset()
        self.mm.LoadedModel.model_load = model_load

    def restore(self):
        self.mm.LoadedModel.model_load = self.orig
        self.reset()


@pytest.fixture
def lowvram(comfy):
    lv = LowVram(comfy)
    lv.reset()
    try:
        yield lv
    finally:
        lv.restore()


def lowvram_stats(patcher) -> dict:
    """How the diffusion model is loaded: modules cast per forward, those with a lazy weight patch."""
    mods = [m for m in patcher.model.diffusion_model.modules() if hasattr(m, "comfy_cast_weights")
            and getattr(m, "weight", None) is not None]
    cast = [m for m in mods if m.comfy_cast_weights]
    lazy = [m for m in cast if any(type(f).__name__ == "LowVramPatch" for f in m.weight_function)]
    return {"model_lowvram": bool(patcher.model.model_lowvram), "modules": len(mods), "cast": len(cast),
            "lazy_patched": len(lazy), "patch_keys": len(patcher.patches)}


def test_lowvram_partial_load_gives_the_same_npo_latents(comfy, loras, lowvram):
    """Apply NPO + KSampler and NPO Guider on a LoRA'd model: partial load (LoRA applied at cast time,
    our branch hooks on cast layers) equals the normal full load, and NPO still differs from CFG."""
    g = base_graph(loras)
    lora = g.add("LoraLoaderModelOnly", model=[g.ckpt, 0], lora_name=loras["style"].split("/", 1)[1], strength_model=1.0)
    applied = ksampler(g, g.add("NPOSuite_ApplyNPO", model=[lora, 0], **npo_kw(g)))
    guider = custom(g, g.add("NPOSuite_NPOGuider", model=[lora, 0], positive=[g.pos, 0], negative=[g.neg, 0], cfg=6.0,
                             **npo_kw(g)), lora)
    plain = ksampler(g, lora)
    normal = run(comfy, g)
    assert not lowvram.stats
    lowvram.enable()
    low = run(comfy, g)
    assert len(lowvram.stats) >= 3, lowvram.stats  # one load per sampler node at least
    for st in lowvram.stats:
        assert st["model_lowvram"], st
        assert st["cast"] > st["modules"] // 2, f"most UNet modules must run with comfy_cast_weights: {st}"
        assert st["cast"] < st["modules"], f"a partial load keeps some modules loaded regularly: {st}"
        assert st["lazy_patched"] > 0, f"the LoRA must be applied lazily by LowVramPatch on cast layers: {st}"
    for nid in (applied, guider, plain):
        assert torch.isfinite(low[nid]).all()
        assert rel(low[nid], normal[nid]) < RTOL_LOWVRAM, (nid, rel(low[nid], normal[nid]))
    assert rel(low[applied], low[guider]) < RTOL_SAME
    assert rel(low[guider], low[plain]) > RTOL_DIFF


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_te_key_map_matches_comfyui_lora_loader(comfy, tmp_path, family):
    """Our text-encoder key map (core.offsets.keys.comfy_clip_deltas) patches exactly the CLIP weights that
    ComfyUI's own LoRA loader patches for the same kohya file, on ComfyUI's real SD1 / SDXL CLIP classes
    (built on the meta device: names and shapes only, no memory)."""
    import comfy.lora
    import comfy.sd1_clip
    import comfy.sdxl_clip
    import comfy.utils

    from npo_suite.core.offsets.keys import comfy_clip_deltas
    from npo_suite.core.offsets import load_offset, save_offset

    cm = comfy.sdxl_clip.SDXLClipModel(device="meta") if family == "sdxl" else comfy.sd1_clip.SD1ClipModel(device="meta")
    shapes = {k[: -len(".weight")]: tuple(v.shape) for k, v in cm.state_dict().items() if k.endswith(".weight")}
    g = torch.Generator().manual_seed(0)

    def linears(n_layers, width):
        mlp = 4 * width
        per = [*((f"self_attn.{p}", width, width) for p in ("q_proj", "k_proj", "v_proj", "out_proj")),
               ("mlp.fc1", width, mlp), ("mlp.fc2", mlp, width)]
        return {f"text_model.encoder.layers.{i}.{m}": LowRankDelta(torch.randn(1, fi, generator=g),
                                                                    torch.randn(fo, 1, generator=g))
                for i in range(n_layers) for m, fi, fo in per}

    tes = {"te1": linears(12, 768), **({"te2": linears(32, 1280)} if family == "sdxl" else {})}
    path = save_offset(Offset(text_encoders=tes), tmp_path / f"{family}_te.safetensors", format="kohya", family=family)
    ours = comfy_clip_deltas(load_offset(path).text_encoders, shapes)
    theirs = comfy.lora.load_lora(comfy.utils.load_torch_file(str(path)), comfy.lora.model_lora_keys_clip(cm, {}),
                                  log_missing=False)
    assert not ours.unmatched
    assert {f"{k}.weight" for k in ours.modules} == set(theirs)
    assert len(theirs) == 72 + (192 if family == "sdxl" else 0)


def test_node_alpha_and_beta_defaults_are_core_npo(comfy):
    """The nodes' α default was 0 while generate used 1 (issue 13): one default, core.npo's."""
    from npo_suite.core.npo import ALPHA_DEFAULT, BETA_DEFAULT
    from npo_suite.nodes.sampling import ApplyNPO, NPOGuider, NPONegativeCLIP, NPONegativeModel

    for node in (ApplyNPO, NPOGuider, NPONegativeCLIP, NPONegativeModel):
        inputs = {i.id: i for i in node.define_schema().inputs}
        assert inputs["alpha"].default == ALPHA_DEFAULT and inputs["beta"].default == BETA_DEFAULT, node.__name__
