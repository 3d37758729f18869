"""A LoRA written by our diffusers trainer for SD3 / Flux loads in real ComfyUI (issue 22).

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
def trained(request, comfy_runtime, tmp_path_factory):
    """(family, diffusers pipeline folder, the LoRA file our trainer wrote)."""
    from npo_suite.cli import main
    from npo_suite.testing.tiny_models import build_flux, build_sd3

    from train_fixtures import make_pairs

    fam = request.param
    root = tmp_path_factory.mktemp(f"dit_lora_{fam}")
    if fam == "sd3":
        build_sd3(root / "model", seed=0, transformer_config=dit_build.SD3_DIFFUSERS, latent_channels=16)
    else:
        build_flux(root / "model", seed=0, transformer_config=dit_build.FLUX_DIFFUSERS, latent_channels=16)
    pairs = make_pairs(root / "pairs", n=4)
    out = root / "run"
    rc = main(["train", "--model", str(root / "model"), "--data-path", str(pairs), "--method", "dpo", "--steps", "2",
               "--resolution", "16", "--lora-rank", "2", "--lora-alpha", "4", "--lr", "3e-2", "--checkpoint-every", "0",
               "--output-dir", str(out), "--cache-dir", str(root / "cache"), "--cpu"])
    assert rc == 0
    return fam, root / "model", out / "dpo_lora.safetensors"


def _inputs(fam, pipe, seed=3):
    """Latents x_t [2, 16, 8, 8], σ [2], the pipeline's own prompt encoding (hidden, pooled)."""
    from npo_suite.families import get_family

    prompts = ["a photo of a cat", "a red house"]
    with torch.no_grad():
        if fam == "sd3":
            hidden, _, pooled, _ = pipe.encode_prompt(prompts, prompts, prompts, do_classifier_free_guidance=False,
                                                      max_sequence_length=get_family("sd3").t5_max_length)
        else:
            hidden, pooled, _ = pipe.encode_prompt(prompts, prompts, max_sequence_length=get_family("flux").t5_max_length)
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 16, 8, 8, generator=g), torch.tensor([0.35, 0.8]), hidden.float(), pooled.float()


@torch.no_grad()
def diffusers_v(fam, pipe, x, sigma, hidden, pooled):
    """The diffusers transformer's velocity as the pipeline calls it (Flux: packed, guidance 1.0)."""
    from npo_suite.families import get_family

    spec = get_family(fam)
    out = spec.velocity(pipe.transformer, spec.pack(x), sigma * 1000, hidden, {"pooled_projections": pooled},
                        h=8, w=8, guidance=1.0)
    return spec.unpack(out, 8, 8).float()


@torch.no_grad()
def comfy_v(fam, patcher, x, sigma, hidden, pooled):
    """ComfyUI's model call (`BaseModel.apply_model`, the sampler's call) -> v = (x_t − denoised)/σ."""
    import comfy.model_management as mm

    mm.load_models_gpu([patcher], force_full_load=True)  # applies (or removes) this patcher's weight patches
    extra = {"guidance": torch.ones(x.shape[0])} if fam == "flux" else {}
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
    d_base = diffusers_v(fam, pipe, x, sigma, hidden, pooled)
    c_base = comfy_v(fam, base, x, sigma, hidden, pooled)
    c_lora = comfy_v(fam, patched, x, sigma, hidden, pooled)
    pipe.load_lora_weights(str(lora_path))  # diffusers' own loader on the same file
    d_lora = diffusers_v(fam, pipe, x, sigma, hidden, pooled)
    r_base, r_lora = rel(c_base, d_base), rel(c_lora, d_lora)
    r_effect = rel(c_lora - c_base, d_lora - d_base)
    size = rel(d_lora, d_base)
    print(f"{fam}: base rel {r_base:.2e}, LoRA rel {r_lora:.2e}, effect rel {r_effect:.2e}, LoRA vs base {size:.2e}")
    assert r_base < OUT_RTOL, "ComfyUI's conversion of the diffusers transformer computes the same velocity"
    assert r_lora < OUT_RTOL, "ComfyUI's LoRA loader vs diffusers' load_lora_weights on the trainer's file"
    assert r_effect < EFFECT_RTOL
    assert size > 1e-3 and rel(c_lora, c_base) > 1e-3, "the trained LoRA must change the output"
