"""NPO / SNPO on flow-matching DiTs in real ComfyUI (issue 23): SD3, Flux, Wan 2.1, tiny random
models built offline from ComfyUI's own classes (dit_build.py), fp32 on CPU, 2 euler steps.

For each family: the offset's keys (kohya `lora_unet_*` and diffusers/PEFT names, incl. Flux's
slices of fused qkv / linear1) resolve through ComfyUI's own key map and cover every targeted
module; NPO per row in the one batched forward equals the merged-weights model on the
unconditional rows (the negative model = ComfyUI's own LoRA loader on the same file, run by the
Dual-Model guider); NPO differs from plain CFG; SNPO equals ComfyUI's LoRA loader with the null
conditioning; the stock KSampler and SamplerCustomAdvanced give the same latents.

Tolerance: the branch path adds up·(down·x) to each targeted Linear's output, the merged path
multiplies x by W + up·down; both fp32, so they differ by summation order only: relative
difference (max|a−b| / max|b|) <= 1e-5 (measured ~1e-7). "Differs" means > 1e-2.
"""
from __future__ import annotations

import logging
import os

import pytest

if not os.environ.get("COMFYUI_PATH"):
    pytest.skip("COMFYUI_PATH is not set (real-ComfyUI tests are opt-in, see docs/comfyui.md)", allow_module_level=True)

import torch  # noqa: E402

import dit_build  # noqa: E402
from informative import assert_informative  # noqa: E402

RTOL_SAME, RTOL_DIFF = 1e-5, 1e-2
STEPS, SEED = 2, 7
NEGATIVE = "blurry, low quality, watermark, jpeg artifacts, text, deformed"

FAMILIES = {
    # name: (builder, latent shape, block prefixes of the targeted Linears, diffusers key prefix or None)
    "sd3": (dit_build.tiny_sd3, (1, 16, 16, 16), ("joint_blocks.",), "transformer."),
    "flux": (dit_build.tiny_flux, (1, 16, 16, 16), ("double_blocks.", "single_blocks."), "transformer."),
    "wan": (dit_build.tiny_wan, (1, 16, 1, 8, 8), ("blocks.",), None),
}


def rel(a, b):
    """max|a - b| / max|b|, after asserting both are finite and not constant (no agreement of two broken outputs)."""
    assert_informative(a, b, name="compared latents")
    return float((a - b).abs().max() / b.abs().max())


class Fam:
    def __init__(self, name, root):
        """root: ComfyUI's base folder of the in-process runtime; the LoRA files go to its models/loras
        folder and are read by the Load Weight Offset node (never from outside ComfyUI's folders)."""
        tmp = root / "loras"
        builder, self.shape, prefixes, self.diffusers_prefix = FAMILIES[name]
        self.name = name
        self.model = builder()
        self.clip = dit_build.tiny_clip()
        self.pos = dit_build.encode(self.clip, "a photo of a red cube")
        # a realistic negative prompt: with a one-word one ("blurry") the tiny random CLIP's encoding is
        # too close to the positive's for "differs from plain CFG / from ∅" to be measured (Wan: ~4e-3)
        self.neg = dit_build.encode(self.clip, NEGATIVE)
        self.modules = dit_build.linear_modules(self.model, prefixes)
        from safetensors.torch import save_file

        self.files = {}
        for role, seed in (("delta", 1), ("eta", 2)):
            p = tmp / f"dit_{name}_{role}_kohya.safetensors"
            save_file(dit_build.kohya_lora(self.modules, seed), str(p))
            self.files[role] = p
        # PEFT suffixes: diffusers names where ComfyUI maps them for the family, else the generic names
        p = tmp / f"dit_{name}_delta_peft.safetensors"
        sd = (dit_build.peft_lora(self.model, self.diffusers_prefix, 3) if self.diffusers_prefix else
              dit_build.peft_lora(self.model, "diffusion_model.", 3))
        save_file(sd, str(p))
        self.files["delta_peft"] = p

    def offset(self, role):
        return self.load(role)[0]

    def load(self, role):
        """(offset, report) of the Load Weight Offset node on the role's file (family 'auto')."""
        from npo_suite.nodes.offsets import LoadWeightOffset

        return LoadWeightOffset.execute(f"loras/{self.files[role].name}").args

    def lora_model(self, role, strength=1.0):
        """ComfyUI's own LoRA loader (LoraLoaderModelOnly's code) on the same file."""
        import comfy.sd
        import comfy.utils

        lora = comfy.utils.load_torch_file(str(self.files[role]), safe_load=True)
        m, _ = comfy.sd.load_lora_for_models(self.model, None, lora, strength, 0)
        return m

    def latent(self):
        return torch.zeros(self.shape)

    def ksampler(self, model, cfg=3.0, negative=None):
        import nodes

        out = nodes.common_ksampler(model, SEED, STEPS, cfg, "euler", "simple", self.cond(self.pos),
                                    self.cond(self.neg if negative is None else negative), {"samples": self.latent()})
        return out[0]["samples"]

    def custom(self, guider, model):
        import comfy.samplers
        from comfy_extras.nodes_custom_sampler import Noise_RandomNoise, SamplerCustomAdvanced

        sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "simple", STEPS).cpu()
        out = SamplerCustomAdvanced().sample(Noise_RandomNoise(SEED), guider, comfy.samplers.sampler_object("euler"),
                                             sigmas, {"samples": self.latent()})
        return out[0]["samples"]

    def cfg_guider(self, model, cfg=3.0, negative=None):
        import comfy.samplers

        g = comfy.samplers.CFGGuider(model)
        g.set_conds(self.cond(self.pos), self.cond(self.neg if negative is None else negative))
        g.set_cfg(cfg)
        return g

    def cond(self, c):
        if self.name == "flux":  # FluxGuidance: a lowered embedded guidance for real CFG
            import node_helpers

            return node_helpers.conditioning_set_values(c, {"guidance": 1.0})
        return c


@pytest.fixture(scope="module", params=list(FAMILIES))
def fam(request, comfy_runtime):
    return Fam(request.param, comfy_runtime.root)


def test_keys_cover_every_targeted_module(fam):
    from npo_suite.nodes.comfy.branch import model_deltas

    assert type(fam.model.model).__name__ in {"SD3", "Flux", "WAN21"}
    kohya, report = fam.load("delta")
    assert kohya.file_keys and kohya.report.format == "kohya"
    assert f"diffusion-model keys (resolved against the model when applied): {len(fam.modules)}" in report, report
    m = model_deltas(kohya, fam.model)
    assert not m.unmatched and m.applied == len(kohya.unet)
    assert set(m.modules) == set(fam.modules), "kohya names: every targeted Linear"
    peft = fam.offset("delta_peft")
    assert peft.file_keys
    mp = model_deltas(peft, fam.model)
    assert not mp.unmatched and mp.applied == len(peft.unet) > 0
    if fam.name == "flux":  # diffusers to_q/to_k/to_v are slices of the fused qkv: joined into one delta per module
        assert "double_blocks.0.img_attn.qkv" in mp.modules
        assert "single_blocks.0.linear1" in mp.modules
        assert mp.applied > len(mp.modules)
        d = mp.modules["double_blocks.0.img_attn.qkv"]
        assert tuple(d.up.shape) == (3 * 64, 3 * 2) and tuple(d.down.shape) == (3 * 2, 64)


@pytest.mark.parametrize("role", ["delta", "delta_peft"])
def test_npo_per_row_equals_merged_negative_model(fam, role):
    """Through the nodes: Load Weight Offset -> Apply NPO (+ stock KSampler and SamplerCustomAdvanced),
    NPO Guider, and the Dual-Model NPO Guider with ComfyUI's own LoRA loader as the negative model."""
    from npo_suite.nodes.sampling import ApplyNPO, DualModelNPOGuider, NPOGuider

    off = fam.offset(role)
    applied, report = ApplyNPO.execute(fam.model, negative_offset=off, beta=1.0, alpha=0.0).args
    n = len(off.unet)
    assert f"{n}/{n}" in report and "do not" not in report, report
    npo_k = fam.ksampler(applied)
    npo_c = fam.custom(fam.cfg_guider(applied), applied)
    g, g_report = NPOGuider.execute(fam.model, fam.cond(fam.pos), fam.cond(fam.neg), 3.0, negative_offset=off,
                                    beta=1.0, alpha=0.0).args
    assert "cfg = 1" not in g_report
    npo_g = fam.custom(g, fam.model)
    dual = DualModelNPOGuider.execute(fam.model, fam.lora_model(role), fam.cond(fam.pos), fam.cond(fam.neg), 3.0).args[0]
    merged = fam.custom(dual, fam.model)
    plain = fam.ksampler(fam.model)
    assert rel(npo_k, npo_c) < 1e-6, "stock KSampler vs SamplerCustomAdvanced"
    assert rel(npo_g, npo_c) < 1e-6, "NPO Guider vs Apply NPO"
    assert rel(npo_k, merged) < RTOL_SAME, "per-row NPO vs the merged-weights negative model (ComfyUI LoRA loader)"
    assert rel(npo_k, plain) > RTOL_DIFF, "NPO must differ from plain CFG"


def test_eta_and_delta_rows_with_negative_model_node(fam):
    """η on both branches (α = 0.5 on the negative): Apply NPO per row == the Dual-Model guider on two
    NPO Negative Model outputs (positive θ+η, negative θ+0.5η+δ, ComfyUI weight patches)."""
    from npo_suite.nodes.sampling import ApplyNPO, DualModelNPOGuider, NPONegativeModel

    eta, delta = fam.offset("eta"), fam.offset("delta")
    applied, _ = ApplyNPO.execute(fam.model, negative_offset=delta, beta=1.0, positive_offset=eta, alpha=0.5).args
    pos_model, _ = NPONegativeModel.execute(fam.model, eta, 1.0).args
    neg_model, report = NPONegativeModel.execute(fam.model, delta, 1.0, positive_offset=eta, alpha=0.5).args
    n = len(fam.modules)
    assert report.count(f"{n}/{n}") == 2, report
    dual = DualModelNPOGuider.execute(pos_model, neg_model, fam.cond(fam.pos), fam.cond(fam.neg), 3.0).args[0]
    assert rel(fam.ksampler(applied), fam.custom(dual, fam.model)) < RTOL_SAME


def test_snpo_equals_lora_loader_with_null_conditioning(fam):
    from npo_suite.nodes.sampling import SNPOGuider

    model = fam.lora_model("eta")
    guider = SNPOGuider.execute(model, fam.clip, fam.cond(fam.pos), 3.0).args[0]
    snpo = fam.custom(guider, model)
    ref = fam.custom(fam.cfg_guider(model, negative=dit_build.encode(fam.clip, "")), model)
    assert rel(snpo, ref) < 1e-6
    assert rel(snpo, fam.custom(fam.cfg_guider(model), model)) > RTOL_DIFF


def test_partial_offset_refused_unless_allowed(fam, tmp_path):
    from safetensors.torch import load_file, save_file

    from npo_suite.core.npo import NPOSpec
    from npo_suite.nodes.comfy.branch import apply_npo
    from npo_suite.nodes.offsets import read_offset

    sd = load_file(str(fam.files["delta"]))
    sd["lora_unet_no_such_block_proj.lora_down.weight"] = torch.zeros(2, 8)
    sd["lora_unet_no_such_block_proj.lora_up.weight"] = torch.zeros(8, 2)
    p = tmp_path / "partial.safetensors"
    save_file(sd, str(p))
    off = read_offset(str(p))
    with pytest.raises(ValueError, match="lora_unet_no_such_block_proj.*allow_partial"):
        apply_npo(fam.model, NPOSpec(delta=off, beta=1.0))
    _, report = apply_npo(fam.model, NPOSpec(delta=off, beta=1.0), allow_partial=True)
    assert f"{len(fam.modules)}/{len(fam.modules) + 1}" in report and "lora_unet_no_such_block_proj" in report


def test_cfg1_is_reported_and_warned(fam, caplog):
    from npo_suite.nodes.sampling import ApplyNPO, NPOGuider

    off = fam.offset("delta")
    out = NPOGuider.execute(fam.model, fam.cond(fam.pos), fam.cond(fam.neg), 1.0, negative_offset=off, beta=1.0).args
    assert "cfg = 1" in out[1] and "nothing to act on" in out[1]
    model, report = ApplyNPO.execute(fam.model, negative_offset=off, beta=1.0).args
    assert "cfg != 1" in report
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        a = fam.ksampler(model, cfg=1.0)
    assert any("cfg 1" in r.getMessage() and "δ" in r.getMessage() for r in caplog.records)
    assert rel(a, fam.ksampler(fam.model, cfg=1.0)) < 1e-6  # inert, as reported


def test_unknown_family_and_sd_offset_on_dit_are_errors(fam):
    import types as _t

    from npo_suite.core.npo import NPOSpec
    from npo_suite.core.offsets.types import LowRankDelta, Offset
    from npo_suite.nodes.comfy.branch import apply_npo

    off = fam.offset("delta")
    import comfy.model_base

    # a real ComfyUI model class that is not in keymap.FAMILIES (only its type is read before the error)
    unknown = comfy.model_base.Hunyuan3Dv2.__new__(comfy.model_base.Hunyuan3Dv2)
    with pytest.raises(ValueError, match="Hunyuan3Dv2.*family these nodes do not know"):
        apply_npo(_t.SimpleNamespace(model=unknown), NPOSpec(delta=off, beta=1.0))
    sd_off = Offset(unet={"down_blocks.0.attentions.0.proj_in": LowRankDelta(torch.zeros(1, 4), torch.zeros(4, 1))})
    with pytest.raises(ValueError, match="UNet module names"):
        apply_npo(fam.model, NPOSpec(delta=sd_off, beta=1.0))


def test_extract_offset_of_a_dit_round_trips(fam):
    """Extract Offset on a DiT: tuned = ComfyUI's LoRA loader on the δ file (rank 2), extracted at
    rank 2 -> ComfyUI's generic keys, covering exactly the LoRA's modules, ΔW equal to the file's;
    saved to models/npo with `npo_family` metadata and read back by Load Weight Offset."""
    from npo_suite.nodes.comfy.branch import model_deltas
    from npo_suite.nodes.offsets import ExtractOffset

    off, report = ExtractOffset.execute(fam.lora_model("delta"), fam.model, 2, f"dit_{fam.name}_extracted").args
    assert off.file_keys and all(k.startswith("diffusion_model.") for k in off.unet)
    assert f"saved npo/dit_{fam.name}_extracted.safetensors" in report, report
    # the written file names its family in the metadata, and Load Weight Offset reads it back from models/npo
    from safetensors import safe_open

    from npo_suite.nodes.offsets import LoadWeightOffset, resolve_offset_file

    family = type(fam.model.model).__name__.lower()  # sd3 / flux / wan21
    with safe_open(resolve_offset_file(f"npo/dit_{fam.name}_extracted.safetensors"), "pt") as f:
        assert f.metadata().get("npo_family") == family, f.metadata()
    back, _ = LoadWeightOffset.execute(f"npo/dit_{fam.name}_extracted.safetensors").args
    assert back.file_keys and back.report.family == family and set(back.unet) == set(off.unet)
    m = model_deltas(off, fam.model)
    assert not m.unmatched and set(m.modules) == set(fam.modules)
    ref = model_deltas(fam.offset("delta"), fam.model).modules
    for path, d in m.modules.items():
        a, b = d.dense(), ref[path].dense()
        assert float((a - b).abs().max() / b.abs().max()) < 1e-4, path
