"""SD3 / Flux LoRAs between our two hosts (issue 22): a LoRA written by our diffusers trainer loads in real
ComfyUI, and one written by our ComfyUI training node loads in `generate` on the diffusers folder.

For each family: a tiny diffusers pipeline whose transformer ComfyUI's converter accepts (dit_build:
SD3 width 64·depth, 16 latent channels; Flux with the config ComfyUI is given), `npo_suite train`
(the command line, DPO, 2 steps) writes `transformer.<module>.lora_A/B.weight` (alpha/r folded into
lora_B, `trainer/validation.save_lora` -> `save_transformer_lora`). Then, in ComfyUI:
- the base: the diffusers transformer's state dict converted by ComfyUI (dit_build.comfy_from_diffusers_transformer);
- the LoRA: ComfyUI's own loader (`comfy.sd.load_lora_for_models`, what LoraLoaderModelOnly runs): every
  key of the file resolves through `comfy.lora.model_lora_keys_unet`, `comfy.lora.load_lora` consumes
  all of them (no "lora key not loaded"), one weight patch per LoRA module (Flux / SD3 q, k, v are
  row slices of the fused qkv: one patch each);
- ComfyUI's patched model (`apply_model`, denoised output converted to velocity v = (x_t − x0)/σ)
  equals diffusers' transformer with the same file through `load_lora_weights`, on identical inputs,
  and so does the LoRA's effect (patched − base); it differs from the base.

Tolerance: both fp32, but two implementations (ComfyUI's fused-qkv MMDiT / Flux with weight-merged
LoRA vs diffusers' separate q/k/v with PEFT's x·A·B branch, different attention kernels): the same
sums in a different order: rel. difference (max|a−b| / max|b|) measured 2e-7..1.2e-6 on the outputs and
8e-7..3e-6 on the LoRA's effect (patched − base, 0.4-0.5 of the output after 2 steps at lr 3e-2; printed
by the test). Bound 1e-4 on both: 30-100x the measured roundoff, far below any wrong mapping (a missing
or transposed slice changes the effect by O(1)). "Changes the output": rel. > 1e-3.

The other direction (`test_node_lora_loads_in_generate_and_matches_comfyui`): the ComfyUI model of the same
folder's transformer, 2 DPO steps of the Train Preference LoRA node on it (`attn_ff`: SD3's fused qkv, Flux's
double-block qkv and single-block `linear1` / `linear2`, the MLPs), its kohya file on ComfyUI's names read by
generate's `load_offsets` (converted from the original module names, nothing unmatched) and merged into the
diffusers transformer vs ComfyUI's own LoRA loader on the same file: base, LoRA and effect agree (same bounds;
measured 2e-7..1e-6, the LoRA's effect ~1x the output), Flux at the embedded guidance 1.0 and 3.5 on both
sides. A k/v swap in the SD3 context qkv or Flux `linear1` map gives 0.13-0.54 (checked by hand).
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

OUT_RTOL, EFFECT_RTOL = 1e-4, 1e-4


def rel(a, b):
    assert_informative(a, b, name="compared velocities")
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module", params=["sd3", "flux"])
def folder(request, comfy_runtime, tmp_path_factory):
    """(family, work folder with `model/`: a tiny diffusers pipeline whose transformer ComfyUI's converter accepts)."""
    from npo_suite.testing.tiny_models import build_flux, build_sd3

    fam = request.param
    root = tmp_path_factory.mktemp(f"dit_lora_{fam}")
    if fam == "sd3":
        build_sd3(root / "model", seed=0, transformer_config=dit_build.SD3_DIFFUSERS, latent_channels=16)
    else:
        build_flux(root / "model", seed=0, transformer_config=dit_build.FLUX_DIFFUSERS, latent_channels=16)
    return fam, root


@pytest.fixture(scope="module")
def trained(folder):
    """(family, diffusers pipeline folder, the LoRA file our trainer wrote)."""
    from npo_suite.cli import main

    from train_fixtures import make_pairs

    fam, root = folder
    pairs = make_pairs(root / "pairs", n=4)
    out = root / "run"
    rc = main(["train", "--model", str(root / "model"), "--data-path", str(pairs), "--method", "dpo", "--steps", "2",
               "--resolution", "16", "--lora-rank", "2", "--lora-alpha", "4", "--lr", "3e-2", "--checkpoint-every", "0",
               "--output-dir", str(out), "--cache-dir", str(root / "cache"), "--cpu"])
    assert rc == 0
    return fam, root / "model", out / "dpo_lora.safetensors"


@torch.no_grad()
def _encode(fam, pipe, prompts):
    """The pipeline's own prompt encoding (hidden, pooled), fp32, at the family's default text length."""
    from npo_suite.families import get_family

    n = get_family(fam).t5_max_length
    if fam == "sd3":
        hidden, _, pooled, _ = pipe.encode_prompt(prompts, prompts, prompts, do_classifier_free_guidance=False,
                                                  max_sequence_length=n)
    else:
        hidden, pooled, _ = pipe.encode_prompt(prompts, prompts, max_sequence_length=n)
    return hidden.float(), pooled.float()


def _inputs(fam, pipe, seed=3):
    """Latents x_t [2, 16, 8, 8], σ [2], the pipeline's own prompt encoding (hidden, pooled)."""
    hidden, pooled = _encode(fam, pipe, ["a photo of a cat", "a red house"])
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 16, 8, 8, generator=g), torch.tensor([0.35, 0.8]), hidden, pooled


@torch.no_grad()
def diffusers_v(fam, transformer, x, sigma, hidden, pooled, guidance=1.0):
    """The diffusers transformer's velocity as the pipeline calls it (`Family.velocity`; Flux: packed, its
    embedded guidance `guidance`)."""
    from npo_suite.families import get_family

    spec = get_family(fam)
    out = spec.velocity(transformer, spec.pack(x), sigma * 1000, hidden, {"pooled_projections": pooled},
                        h=8, w=8, guidance=guidance)
    return spec.unpack(out, 8, 8).float()


@torch.no_grad()
def comfy_v(fam, patcher, x, sigma, hidden, pooled, guidance=1.0):
    """ComfyUI's model call (`BaseModel.apply_model`, the sampler's call) -> v = (x_t − denoised)/σ; Flux with
    the embedded guidance `guidance` (what ComfyUI's FluxGuidance node puts in the conditioning)."""
    import comfy.model_management as mm

    mm.load_models_gpu([patcher], force_full_load=True)  # applies (or removes) this patcher's weight patches
    extra = {"guidance": torch.full((x.shape[0],), float(guidance))} if fam == "flux" else {}
    denoised = patcher.model.apply_model(x, sigma, c_crossattn=hidden, y=pooled, **extra)
    return ((x - denoised) / sigma.reshape(-1, 1, 1, 1)).float()


def test_trainer_lora_loads_in_comfyui_and_matches_diffusers(trained, caplog):
    import comfy.lora
    import comfy.lora_convert
    import comfy.sd
    import comfy.utils
    import diffusers
    from safetensors import safe_open

    fam, model_dir, lora_path = trained
    with safe_open(str(lora_path), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert keys and all(k.startswith("transformer.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)
    assert meta["npo_family"] == fam and meta["npo_method"] == "dpo"
    modules = {k.rsplit(".lora_", 1)[0] for k in keys}

    pipe = getattr(diffusers, {"sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}[fam]).from_pretrained(
        str(model_dir), local_files_only=True)
    base = dit_build.comfy_from_diffusers_transformer(pipe.transformer.state_dict(), fam)
    assert type(base.model).__name__ == {"sd3": "SD3", "flux": "Flux"}[fam]

    # ComfyUI's loader: every key maps, every key is consumed, one patch per module
    lora = comfy.utils.load_torch_file(str(lora_path), safe_load=True)
    key_map = comfy.lora.model_lora_keys_unet(base.model, {})
    assert not sorted(m for m in modules if m not in key_map), "LoRA modules ComfyUI's key map does not know"
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        patches = comfy.lora.load_lora(comfy.lora_convert.convert_lora(dict(lora)), key_map)
        patched, _ = comfy.sd.load_lora_for_models(base, None, lora, 1.0, 0)
    bad = [r.getMessage() for r in caplog.records if "lora key not loaded" in r.getMessage() or "NOT LOADED" in r.getMessage()]
    assert not bad, bad[:5]
    assert len(patches) == len(modules)
    assert all(k in patched.patches for k in (p if isinstance(p, str) else p[0] for p in patches))

    x, sigma, hidden, pooled = _inputs(fam, pipe)
    d_base = diffusers_v(fam, pipe.transformer, x, sigma, hidden, pooled)
    c_base = comfy_v(fam, base, x, sigma, hidden, pooled)
    c_lora = comfy_v(fam, patched, x, sigma, hidden, pooled)
    pipe.load_lora_weights(str(lora_path))  # diffusers' own loader on the same file
    d_lora = diffusers_v(fam, pipe.transformer, x, sigma, hidden, pooled)
    r_base, r_lora = rel(c_base, d_base), rel(c_lora, d_lora)
    r_effect = rel(c_lora - c_base, d_lora - d_base)
    size = rel(d_lora, d_base)
    print(f"{fam}: base rel {r_base:.2e}, LoRA rel {r_lora:.2e}, effect rel {r_effect:.2e}, LoRA vs base {size:.2e}")
    assert r_base < OUT_RTOL, "ComfyUI's conversion of the diffusers transformer computes the same velocity"
    assert r_lora < OUT_RTOL, "ComfyUI's LoRA loader vs diffusers' load_lora_weights on the trainer's file"
    assert r_effect < EFFECT_RTOL
    assert size > 1e-3 and rel(c_lora, c_base) > 1e-3, "the trained LoRA must change the output"


class PipelineText:
    """The diffusers pipeline's own prompt encoding behind the part of ComfyUI's CLIP object the training backend
    calls (`tokenize`, `encode_from_tokens(..., return_pooled=True)`: nodes/comfy/backend.py `comfy_io`). ComfyUI's
    tiny CLIP (dit_build, 32 wide) cannot condition the transformer converted from this pipeline (T5 width 64,
    pooled 64 for SD3 / 32 for Flux); this way the node trains on the conditioning the diffusers side gets."""

    def __init__(self, fam, pipe):
        self.fam, self.pipe = fam, pipe

    def tokenize(self, text):
        return text

    def encode_from_tokens(self, tokens, return_pooled=False):
        hidden, pooled = _encode(self.fam, self.pipe, [tokens])
        return (hidden, pooled) if return_pooled else hidden


NODE_PROMPTS = ["a photo of a red cube", "a blue house by a lake"]


def _node_lora(fam, pipe, model, root):
    """The file of the Train Preference LoRA node on ComfyUI's `model`: DPO, 2 steps at 64 px (latents 8x8), lr
    3e-2, rank 2, alpha 4 (alpha/r = 2 is folded by the converter), targets `attn_ff`: every fused projection
    (SD3 `attn.qkv`; Flux `img_attn.qkv`, `txt_attn.qkv` and the single blocks' `linear1` / `linear2`, which
    `attn` already takes) plus the MLPs; a 16-channel TAESD VAE encodes the random pair images."""
    from npo_suite.nodes.training import PreferenceDataset, TrainPreferenceLoRA

    g = torch.Generator().manual_seed(1)
    chosen, rejected = torch.rand(2, 64, 64, 3, generator=g), torch.rand(2, 64, 64, 3, generator=g)
    data = PreferenceDataset.execute("(from images)", chosen, rejected, "\n".join(NODE_PROMPTS)).args[0]
    name = f"to_generate_{fam}"
    inputs = dict(method="dpo", beta=5000.0, lam=0.9, snpo_p=0.5, steps=2, lr=3e-2, lora_rank=2, lora_targets="attn_ff",
                  batch_size=1, grad_accum=1, resolution=64, mixed_precision="no", optimizer="adamw",
                  gradient_checkpointing=False, seed=0, ref_update_every=0, ref_bound=0.005, ref_on_exceed="freeze",
                  timestep_sampler="uniform", timestep_weight="none", output_name=name, resume=False,
                  checkpoint_every=0, init_lora="none", extra="lora_alpha: 4")
    with torch.inference_mode():  # as ComfyUI runs a node
        out = TrainPreferenceLoRA.execute(model, PipelineText(fam, pipe), dit_build.tiny_vae16(), data, **inputs).args
    lora_name, report = out[2], out[4]
    assert "finished at step 2/2" in report and "non-finite" not in report, report
    return root / "loras" / lora_name


def test_node_lora_loads_in_generate_and_matches_comfyui(folder, comfy_runtime, caplog):
    """The round trip a user does: train a LoRA with the ComfyUI node on SD3 / Flux, then use it with
    `python -m npo_suite generate` on the diffusers folder of the same model.

    The folder's transformer, converted by ComfyUI (dit_build.comfy_from_diffusers_transformer), is what the node
    trains on (2 DPO steps, `attn_ff`, `_node_lora`); its kohya file on ComfyUI's names (`lora_unet_joint_blocks_…`,
    `lora_unet_double_blocks_…`, `lora_unet_single_blocks_…_linear1`) is read by generate's loader
    (`load_offsets` on the bundle `load_model` gives, as `run_generate` does): converted from the original module
    names (report `original module names, converted to peft`, nothing unmatched, exactly the diffusers modules the
    family's map assigns to the file's modules: q/k/v of each fused qkv, q/k/v/proj_mlp of each `linear1`). Then,
    on identical inputs (the pipeline's own prompt encoding), ComfyUI's `apply_model` of the model patched by its
    own LoRA loader (`load_lora_for_models`, every key consumed) vs the diffusers transformer with our offset
    merged (`materialize`, what generate samples with): base velocities, LoRA velocities and the LoRA's effect
    (patched − base) agree, and the LoRA changes the output. Flux (dev-like, guidance embedding): at the embedded
    guidance the node trained with (1.0, `npo_flux_guidance`) and at 3.5 (ComfyUI's FluxGuidance and generate's
    default), the same value on both sides; the guidance is checked to change the velocity on both.

    Tolerance: both fp32, two implementations of the same sums in a different order (ComfyUI's fused-qkv
    MMDiT / Flux with W + s·up@down merged into the fused weight, diffusers' separate q/k/v/proj_mlp with each
    part's rows of the same product merged by `materialize`; different attention code): relative max difference
    (max|a−b| / max|b|, printed) measured 2.4e-7..3.9e-7 (base), 3.2e-7..7.9e-7 (LoRA), 3.4e-7..9.8e-7 (effect,
    which is 1.1-1.2x the output here). Bound 1e-4 on all three, as the test above: 100x the roundoff, far below
    a wrong mapping (k and v swapped in SD3's context qkv or Flux's `linear1` map: 0.13-0.54; a mis-split block
    or a missing alpha/r changes the effect by O(1)). "Changes the output": rel. > 1e-3, as is the change of
    Flux's velocity from guidance 1.0 to 3.5."""
    import comfy.lora
    import comfy.lora_convert
    import comfy.sd
    import comfy.utils
    import diffusers
    from safetensors import safe_open

    from npo_suite.core.offsets import materialize
    from npo_suite.diffusers_host.generate import load_offsets
    from npo_suite.families.loading import load_model

    fam, root = folder
    model_dir = root / "model"
    pipe = getattr(diffusers, {"sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}[fam]).from_pretrained(
        str(model_dir), local_files_only=True)
    bundle = load_model(model_dir, dtype=torch.float32, device="cpu")
    base = dit_build.comfy_from_diffusers_transformer(bundle.unet.state_dict(), fam)
    assert type(base.model).__name__ == {"sd3": "SD3", "flux": "Flux"}[fam]
    assert bool(base.model.model_config.unet_config.get("guidance_embed")) == (fam == "flux")

    path = _node_lora(fam, pipe, base, comfy_runtime.root)
    with safe_open(str(path), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    modules = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in keys}
    assert all(m.startswith("lora_unet_") for m in modules) and len(keys) == 3 * len(modules)
    fused = {"sd3": ("x_block_attn_qkv", "context_block_attn_qkv"),
             "flux": ("img_attn_qkv", "txt_attn_qkv", "linear1", "linear2")}[fam]
    assert all(any(m.endswith("_" + s) for m in modules) for s in fused), sorted(modules)
    assert (meta["npo_family"], meta["npo_trained_in"]) == (fam, "comfyui")
    if fam == "flux":
        assert meta["npo_flux_guidance"] == "1"

    # generate's loader on the diffusers folder's bundle
    spec, info = load_offsets(bundle, neg=path)
    report = info["neg"]["report"]
    assert "original module names, converted to peft" in report and "matched nothing" not in report, report
    assert spec.delta.report.unmatched_keys == [] and spec.delta.report.matched == len(spec.delta.unet)
    table = bundle.family_spec.original_modules(bundle.unet.config)
    flat = {o.replace(".", "_"): o for o in table}
    assert set(spec.delta.unet) == {t for m in modules for t in table[flat[m[len("lora_unet_"):]]].targets}
    n_split = sum(len(table[flat[m[len("lora_unet_"):]]].targets) > 1 for m in modules)
    note = f"converted from the original module names: {len(modules)} modules ({n_split} fused projections split"
    assert any(n.startswith(note) for n in info["neg"]["notes"]), info["neg"]["notes"]
    ours = materialize(bundle.unet, [(spec.delta, 1.0)])  # what generate's sampler runs with the offset at 1

    # ComfyUI's loader on the same file: every key consumed
    lora = comfy.utils.load_torch_file(str(path), safe_load=True)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        patches = comfy.lora.load_lora(comfy.lora_convert.convert_lora(dict(lora)),
                                       comfy.lora.model_lora_keys_unet(base.model, {}))
        patched, _ = comfy.sd.load_lora_for_models(base, None, lora, 1.0, 0)
    bad = [r.getMessage() for r in caplog.records if "lora key not loaded" in r.getMessage() or "NOT LOADED" in r.getMessage()]
    assert not bad and len(patches) == len(modules), bad[:5]

    x, sigma, hidden, pooled = _inputs(fam, pipe)
    bases = {}
    for g in ((1.0, 3.5) if fam == "flux" else (1.0,)):
        d_base = diffusers_v(fam, bundle.unet, x, sigma, hidden, pooled, guidance=g)
        d_lora = diffusers_v(fam, ours, x, sigma, hidden, pooled, guidance=g)
        c_base = comfy_v(fam, base, x, sigma, hidden, pooled, guidance=g)
        c_lora = comfy_v(fam, patched, x, sigma, hidden, pooled, guidance=g)
        r_base, r_lora = rel(c_base, d_base), rel(c_lora, d_lora)
        r_effect = rel(c_lora - c_base, d_lora - d_base)
        size = rel(d_lora, d_base)
        print(f"{fam} (guidance {g}): base rel {r_base:.2e}, LoRA rel {r_lora:.2e}, effect rel {r_effect:.2e}, "
              f"LoRA vs base {size:.2e}")
        assert r_base < OUT_RTOL, "ComfyUI's conversion of the diffusers transformer computes the same velocity"
        assert r_lora < OUT_RTOL, "ComfyUI's LoRA loader vs generate's converted offset on the node's file"
        assert r_effect < EFFECT_RTOL
        assert size > 1e-3 and rel(c_lora, c_base) > 1e-3, "the node's LoRA must change the output"
        bases[g] = (d_base, c_base)
    if fam == "flux":  # the embedded guidance reaches both models: it changes the velocity
        for i in (0, 1):
            assert rel(bases[3.5][i], bases[1.0][i]) > 1e-3
