"""SD3 and Flux in `generate`: tiny pipelines of the full-size classes built offline (random weights,
tokenizers built locally), checked against diffusers' own pipelines.

Tolerances: the text encodings are compared with torch.equal (same modules, same calls). The sampled
latents are compared with the diffusers pipeline at atol 1e-5 on values of size ~4: our sampler runs
the conditional and unconditional rows in one batch [cond, uncond] where SD3's pipeline batches
[uncond, cond] and Flux's runs two forwards, and a matmul over another batch size may block its
sums differently (float32 round-off, ~1e-7 per op; measured 0.0 on this CPU). NPO's per-row path
against the two-model reference: relative difference <= 1e-5 (the METHODS/issue bound for fp32).
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from flow_fixtures import check_npo_per_row, check_pairs_and_sweep, random_offset  # noqa: E402

from npo_suite.diffusers_host.generate import NPOSpec, encode_prompts, load_offsets, sample  # noqa: E402
from npo_suite.families import FAMILIES, detect_folder, detect_single_file, family_with_text_encoders, get_family  # noqa: E402
from npo_suite.families.loading import bundle_from_flow_pipeline, load_model  # noqa: E402

T5_LEN = 16  # T5 tokens (the pipelines default to 256 / 512; a tiny model does not need them)
PROMPTS = ["a photo of a cat", "red house with a tree"]
NEGS = ["blurry", "ugly low quality"]
SEEDS = [3, 4]
SIZE = 16  # pixels; latents 8x8


@pytest.fixture(scope="module")
def flow_dirs(tmp_path_factory):
    from npo_suite.testing.tiny_models import build_flux, build_sd3

    root = tmp_path_factory.mktemp("flow")
    build_sd3(root / "sd3")
    build_flux(root / "flux")
    return {"sd3": root / "sd3", "flux": root / "flux"}


def _pipe(flow_dirs, name):
    import diffusers

    cls = {"sd3": diffusers.StableDiffusion3Pipeline, "flux": diffusers.FluxPipeline}[name]
    return cls.from_pretrained(str(flow_dirs[name]), local_files_only=True)


def _bundle(flow_dirs, name):
    b = load_model(flow_dirs[name])
    b.extra["max_sequence_length"] = T5_LEN
    return b


def _gens():
    return [torch.Generator().manual_seed(s) for s in SEEDS]


def _pipe_latents(pipe, name, *, negative, cfg, steps=3, flux_guidance=None):
    kw = dict(num_inference_steps=steps, height=SIZE, width=SIZE, generator=_gens(), max_sequence_length=T5_LEN,
              output_type="latent")
    with torch.no_grad():
        if name == "sd3":
            out = pipe(PROMPTS, negative_prompt=negative, guidance_scale=cfg, **kw).images
        else:
            out = pipe(PROMPTS, negative_prompt=negative, true_cfg_scale=cfg,
                       guidance_scale=3.5 if flux_guidance is None else flux_guidance, **kw).images
            out = get_family("flux").unpack(out, SIZE // 2, SIZE // 2)
    return out


# ---------------------------------------------------------------------------------------------- family
def test_flow_families_registered_and_detected(flow_dirs, tmp_path):
    assert FAMILIES["sd3"].is_flow_transformer and FAMILIES["flux"].is_flow_transformer
    assert not FAMILIES["sdxl"].is_flow_transformer
    from npo_suite.world.family import WORLD_FLOW

    assert not WORLD_FLOW.is_flow_transformer  # a flow-prediction UNet keeps the UNet paths
    assert detect_folder(flow_dirs["sd3"]).name == "sd3" and detect_folder(flow_dirs["flux"]).name == "flux"
    assert family_with_text_encoders(2).name == "sdxl"  # Flux's two encoders are not SDXL's
    assert not FAMILIES["sd3"].matches_unet_config({"addition_embed_type": None})
    assert detect_single_file(["model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight"]).name == "sd3"
    assert detect_single_file(["double_blocks.0.img_attn.qkv.weight"]).name == "flux"
    # a single file of a flow family needs its diffusers folder (text encoders, tokenizers, scheduler)
    from safetensors.torch import save_file

    f = tmp_path / "flux1.safetensors"
    save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(2, 2)}, str(f))
    with pytest.raises(ValueError, match="single file holds the transformer.*pass --model-config DIR"):
        load_model(f)
    with pytest.raises(ValueError, match="is not a Flux.1 diffusers folder"):
        load_model(f, config=str(flow_dirs["sd3"]))
    with pytest.raises(ValueError, match="released width 3072 only.*32 wide"):  # diffusers' converter fixes it
        load_model(f, config=str(flow_dirs["flux"]))
    assert get_family("sd3").lora_target_modules("attn_ff")[-1] == "ff_context.net.2"
    assert "proj_mlp" in get_family("flux").lora_target_modules("attn_ff")


def test_flow_folder_loading_says_what_it_found_and_takes_a_vae(flow_dirs, tmp_path):
    from diffusers import AutoencoderKL

    from npo_suite.testing.tiny_models import flow_vae_config

    lines = []
    flux = load_model(flow_dirs["flux"], log=lines.append)
    assert lines == [flux.detected] and flux.prediction_type == "flow"
    assert "Flux.1 diffusers folder" in flux.detected and "dynamic shift (base 0.5, max 1.15)" in flux.detected
    sd3 = load_model(flow_dirs["sd3"], log=False)
    assert "SD3/SD3.5 diffusers folder" in sd3.detected and "shift 3.0" in sd3.detected and "VAE: vae/" in sd3.detected
    torch.manual_seed(11)
    AutoencoderKL(**flow_vae_config(4, 0.0609, 1.5035)).save_pretrained(tmp_path / "vae")
    own = load_model(flow_dirs["sd3"], vae=tmp_path / "vae", log=False)
    want = AutoencoderKL.from_pretrained(tmp_path / "vae").state_dict()
    assert f"VAE: {tmp_path / 'vae'}" in own.detected
    assert all(torch.equal(v, want[k]) for k, v in own.vae.state_dict().items())
    assert not torch.equal(own.vae.decoder.conv_out.weight, sd3.vae.decoder.conv_out.weight)
    with pytest.raises(ValueError, match="predicts a flow velocity"):
        load_model(flow_dirs["sd3"], prediction_type="epsilon", log=False)
    with pytest.raises(ValueError, match="uses its own tokenizers"):
        load_model(flow_dirs["flux"], tokenizer=flow_dirs["flux"] / "tokenizer", log=False)


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_encode_text_is_the_pipelines(flow_dirs, name):
    bundle, pipe = _bundle(flow_dirs, name), _pipe(flow_dirs, name)
    with torch.no_grad():
        c, n = encode_prompts(bundle, PROMPTS), encode_prompts(bundle, [""] * 2)
        if name == "sd3":
            pe, npe, pp, npp = pipe.encode_prompt(PROMPTS, PROMPTS, PROMPTS, negative_prompt="",
                                                  max_sequence_length=T5_LEN, do_classifier_free_guidance=True)
        else:
            pe, pp, _ = pipe.encode_prompt(PROMPTS, PROMPTS, max_sequence_length=T5_LEN)
            npe, npp, _ = pipe.encode_prompt([""] * 2, [""] * 2, max_sequence_length=T5_LEN)
    assert torch.equal(c.hidden, pe) and torch.equal(c.added["pooled_projections"], pp)
    assert torch.equal(n.hidden, npe) and torch.equal(n.added["pooled_projections"], npp)  # null = encoded ""
    assert n.hidden.abs().sum() > 0  # not zeros


# ---------------------------------------------------------------------------------------------- sampling
@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_cfg_equals_the_diffusers_pipeline(flow_dirs, name):
    bundle, pipe = _bundle(flow_dirs, name), _pipe(flow_dirs, name)
    ours = sample(bundle, PROMPTS, SEEDS, "cfg", negative_prompts=NEGS, cfg_scale=4.0, steps=3, height=SIZE,
                  width=SIZE, decode=False, flux_guidance=2.0 if name == "flux" else None).latents
    ref = _pipe_latents(pipe, name, negative=NEGS, cfg=4.0, flux_guidance=2.0)
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def test_flux_guidance_embedding_is_an_option(flow_dirs):
    bundle = _bundle(flow_dirs, "flux")
    kw = dict(negative_prompts=NEGS, cfg_scale=3.0, steps=2, height=SIZE, width=SIZE, decode=False)
    a = sample(bundle, PROMPTS, SEEDS, "cfg", flux_guidance=1.0, **kw).latents
    b = sample(bundle, PROMPTS, SEEDS, "cfg", **kw).latents  # the pipeline's 3.5
    assert (a - b).abs().max() > 1e-4
    with pytest.raises(ValueError, match="no guidance embedding"):
        sample(_bundle(flow_dirs, "sd3"), PROMPTS, SEEDS, "cfg", flux_guidance=1.0, **kw)
    with pytest.raises(ValueError, match="flow-euler"):
        sample(bundle, PROMPTS, SEEDS, "cfg", scheduler="ddim", **kw)
    with pytest.raises(ValueError, match="rescale"):
        sample(bundle, PROMPTS, SEEDS, "cfg", rescale=0.7, **kw)


@pytest.mark.parametrize("coverage", ["attn_ff", "every_layer"])
@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_npo_per_row_equals_the_merged_two_model_path(flow_dirs, name, coverage):
    """The one batched forward with δ on the unconditional rows only equals one merged model per group.
    "every_layer" puts offsets on every Linear (and the patch-embedding conv) of the transformer (timestep /
    text / guidance embedders, AdaLN modulation `norm*.linear`, joint attention add_*_proj / to_add_out, Flux's single blocks
    proj_mlp / proj_out, the final norm_out.linear / proj_out): each sees the batch as its leading
    dimension, so each row gets its own group's weights."""
    check_npo_per_row(_bundle(flow_dirs, name), coverage, prompts=PROMPTS, negatives=NEGS, seeds=SEEDS, size=SIZE,
                      cfg_scale=4.0)


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_snpo_equals_the_lora_model_with_the_null_conditioning(flow_dirs, name):
    from npo_suite.core.offsets import materialize

    bundle, pipe = _bundle(flow_dirs, name), _pipe(flow_dirs, name)
    s = random_offset(bundle.unet, bundle.family_spec.lora_target_modules("attn_ff"), 5, scale=0.2)
    ours = sample(bundle, PROMPTS, SEEDS, "snpo", negative_prompts=NEGS, offsets=NPOSpec(snpo=s, beta=1.0),
                  cfg_scale=4.0, steps=3, height=SIZE, width=SIZE, decode=False).latents
    pipe.transformer = materialize(pipe.transformer, [(s, 1.0)])  # θ + s merged, diffusers' own loop
    ref = _pipe_latents(pipe, name, negative=[""] * 2, cfg=4.0)  # the null conditioning: ""
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_peft_lora_in_diffusers_naming_covers_every_target(flow_dirs, name, tmp_path):
    """A LoRA as diffusers' `save_lora_weights` writes it (PEFT keys with the "transformer." prefix, the LoraConfig
    in the `lora_adapter_metadata` header: lora_alpha 4 != r 2 and a per-module alpha_pattern) maps onto every
    module PEFT targeted, at PEFT's scale, and sampling with it equals diffusers loading the same file."""
    from peft import LoraConfig, get_peft_model_state_dict

    bundle, pipe = _bundle(flow_dirs, name), _pipe(flow_dirs, name)
    targets = bundle.family_spec.lora_target_modules("attn_ff")
    cfg = LoraConfig(r=2, lora_alpha=4, alpha_pattern={"ff.net.2": 1}, target_modules=targets, init_lora_weights=False)
    pipe.transformer.add_adapter(cfg)
    layers = get_peft_model_state_dict(pipe.transformer)
    type(pipe).save_lora_weights(tmp_path, transformer_lora_layers=layers,
                                 transformer_lora_adapter_metadata=pipe.transformer.peft_config["default"].to_dict())
    path = tmp_path / "pytorch_lora_weights.safetensors"
    peft_modules = {k.rsplit(".lora_", 1)[0] for k in layers}
    spec, info = load_offsets(bundle, pos=path)
    assert set(spec.eta.unet) == peft_modules and not spec.eta.report.unmatched_keys
    assert spec.eta.report.family == name and f"({name})" in info["pos"]["report"]  # not an SD label
    assert all(any(m.endswith(t) for m in peft_modules) for t in targets)  # every preset suffix exists
    scales = {m: d.scale for m, d in spec.eta.unet.items()}
    assert {s for m, s in scales.items() if m.endswith("ff.net.2")} == {0.5}  # alpha_pattern: 1 / r
    assert {s for m, s in scales.items() if not m.endswith("ff.net.2")} == {2.0}  # lora_alpha / r
    ours = sample(bundle, PROMPTS, SEEDS, "cfg", negative_prompts=NEGS, offsets=spec, cfg_scale=4.0, steps=2,
                  height=SIZE, width=SIZE, decode=False).latents
    plain = sample(bundle, PROMPTS, SEEDS, "cfg", negative_prompts=NEGS, cfg_scale=4.0, steps=2,
                   height=SIZE, width=SIZE, decode=False).latents
    ref_pipe = _pipe(flow_dirs, name)
    ref_pipe.load_lora_weights(str(path))  # diffusers reads the file itself (metadata included)
    ref = _pipe_latents(ref_pipe, name, negative=NEGS, cfg=4.0, steps=2)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    assert (ours - plain).abs().max() > 1e-2  # the LoRA does act


def test_sd3_lora_on_original_names_maps_exactly(flow_dirs, tmp_path):
    """An SD3 LoRA named by the original (SAI) modules, as kohya (`lora_unet_joint_blocks_0_x_block_attn_qkv`) and
    ComfyUI (`diffusion_model.joint_blocks.0.…`) write it, on every Linear of the original layout (fused qkv,
    the AdaLN modulations whose rows diffusers reorders, embedders, final layer): the offset read against the
    diffusers transformer gives exactly the weights diffusers' own single-file converter makes of
    `W_original + alpha/r * up @ down` (the reference: `convert_sd3_transformer_checkpoint_to_diffusers`). fp32:
    both sides add the same products (a fused delta's row blocks are the parts' deltas), so only rounding of
    the sum can differ: bound 1e-6 relative to the weights' scale."""
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers
    from safetensors.torch import save_file

    from npo_suite.core.offsets import materialize
    from npo_suite.testing.tiny_models import sd3_original_state_dict

    bundle = _bundle(flow_dirs, "sd3")
    tr = bundle.unet
    table = bundle.family_spec.original_modules(tr.config)
    orig = {k[len("model.diffusion_model."):]: v for k, v in sd3_original_state_dict(tr).items()}
    g = torch.Generator().manual_seed(3)
    kohya, comfy, ref = {}, {}, dict(orig)
    for k, w in orig.items():
        mod = k[: -len(".weight")]
        if not (k.endswith(".weight") and w.ndim == 2 and mod in table):
            continue
        down, up = torch.randn(2, w.shape[1], generator=g) * 0.2, torch.randn(w.shape[0], 2, generator=g) * 0.2
        ref[k] = w + 1.5 * up @ down  # alpha 3, rank 2
        for sd, stem in ((kohya, "lora_unet_" + mod.replace(".", "_")), (comfy, "diffusion_model." + mod)):
            sd.update({f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up, f"{stem}.alpha": torch.tensor(3.0)})
    expected = convert_sd3_transformer_checkpoint_to_diffusers(dict(ref))
    n_mod = len(kohya) // 3
    assert n_mod == len(table) - 1  # every module of the map but the patch-embedding conv
    for label, sd in (("kohya", kohya), ("comfy", comfy)):
        f = tmp_path / f"{label}.safetensors"
        save_file(sd, str(f))
        spec, info = load_offsets(bundle, neg=f)
        assert "original module names, converted to peft (sd3), 36 modules" in info["neg"]["report"]  # qkv: 3 each
        assert any(f"converted from the original module names: {n_mod} modules" in n for n in spec.delta.report.notes)
        got = materialize(tr, [(spec.delta, 1.0)]).state_dict()
        assert set(got) == set(expected)
        scale = max(v.abs().max() for v in expected.values())
        assert max(float((got[k] - expected[k]).abs().max()) for k in expected) <= 1e-6 * float(scale)
        assert any(not torch.equal(got[k], tr.state_dict()[k]) for k in expected)  # it does act
    f = tmp_path / "with_te.safetensors"  # a text-encoder key has no transformer module: refused, named
    save_file({**kohya, "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.ones(2, 4)}, str(f))
    with pytest.raises(ValueError, match="1 key\\(s\\) name no module of this model in its original names: lora_te1_"):
        load_offsets(bundle, neg=f)


def _flux_convert(orig: dict, inner: int) -> dict:
    """diffusers' `convert_flux_transformer_checkpoint_to_diffusers` of a tiny Flux's original state dict. The
    converter splits each single block's `linear1` at the released width (q, k, v 3072 rows each, then the MLP's
    12288), so the tiny q, k, v and MLP rows are laid out at those offsets with NaN between, converted, and the
    parts cut back to the tiny widths (the rows cut off checked to be all the padding): which rows go to which
    diffusers module is still the converter's."""
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    released, tiny = (3072, 3072, 3072, 4 * 3072), (inner, inner, inner, 4 * inner)
    sd = dict(orig)
    for k, v in orig.items():
        if ".linear1." in k:
            wide = torch.full((sum(released), *v.shape[1:]), float("nan"))
            for part, start, n in zip(v.split(tiny), (0, 3072, 6144, 9216), tiny):
                wide[start:start + n] = part
            sd[k] = wide
    out = convert_flux_transformer_checkpoint_to_diffusers(sd)
    for k, v in out.items():
        part = k.split(".", 2)[-1].rsplit(".", 1)[0] if k.startswith("single_transformer_blocks.") else None
        if part in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"):
            n = 4 * inner if part == "proj_mlp" else inner
            assert not v[:n].isnan().any() and v[n:].isnan().all(), k
            out[k] = v[:n].contiguous()
    return out


def _flux_original_lora(tr, table, modules=None, alpha=3.0, seed=3) -> tuple[dict, dict, dict]:
    """(kohya, dotted `diffusion_model.` form, the original state dict with W + alpha/r * up @ down) of a rank-2
    LoRA on the original Linear `modules` (default: every module of `table`); `alpha` None: no `.alpha` key."""
    from npo_suite.testing.tiny_models import flux_original_state_dict

    orig = flux_original_state_dict(tr)
    g = torch.Generator().manual_seed(seed)
    kohya, comfy, ref = {}, {}, dict(orig)
    for mod in (table if modules is None else modules):
        w = orig[mod + ".weight"]
        down, up = torch.randn(2, w.shape[1], generator=g) * 0.2, torch.randn(w.shape[0], 2, generator=g) * 0.2
        ref[mod + ".weight"] = w + (1.0 if alpha is None else alpha / 2) * up @ down
        a = {} if alpha is None else {".alpha": torch.tensor(alpha)}
        for sd, stem in ((kohya, "lora_unet_" + mod.replace(".", "_")), (comfy, "diffusion_model." + mod)):
            sd.update({f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up,
                       **{stem + k: v for k, v in a.items()}})
    return kohya, comfy, ref


def test_flux_lora_on_original_names_maps_exactly(flow_dirs, tmp_path):
    """A Flux LoRA named by the original (BFL) modules, as kohya (`lora_unet_double_blocks_0_img_attn_qkv`) and
    ComfyUI (`diffusion_model.single_blocks.0.linear1`) write it, on every Linear of the original layout (the
    double blocks' fused qkv, the single blocks' `linear1` = q, k, v and the MLP input in UNEQUAL row blocks,
    the modulations, the embedders incl. guidance, the final layer whose rows diffusers reorders): the offset
    read against the diffusers transformer gives exactly the weights diffusers' own single-file converter makes
    of `W_original + alpha/r * up @ down` (`convert_flux_transformer_checkpoint_to_diffusers`, through
    `_flux_convert` for the tiny width; `flux_original_state_dict` is first checked to be its exact inverse).
    fp32: both sides add the same products (a fused delta's row blocks are the parts' deltas), so only rounding
    of the sum can differ: bound 1e-6 relative to the weights' scale."""
    from safetensors.torch import save_file

    from npo_suite.core.offsets import materialize
    from npo_suite.testing.tiny_models import flux_original_state_dict

    bundle = _bundle(flow_dirs, "flux")
    tr = bundle.unet
    inner = tr.config.num_attention_heads * tr.config.attention_head_dim
    own = tr.state_dict()
    back = _flux_convert(flux_original_state_dict(tr), inner)
    assert set(back) == set(own) and all(torch.equal(back[k], own[k]) for k in own)  # the exact inverse
    table = bundle.family_spec.original_modules(tr.config)
    assert {t for e in table.values() for t in e.targets} == \
        {n for n, m in tr.named_modules() if isinstance(m, torch.nn.Linear)}  # every Linear, each once
    kohya, comfy, ref = _flux_original_lora(tr, table)
    expected = _flux_convert(ref, inner)
    n_mod = len(kohya) // 3
    assert n_mod == len(table) == 26  # 10 embedder/final, 10 per double block, 3 per single block (1 + 2)
    for label, sd in (("kohya", kohya), ("comfy", comfy)):
        f = tmp_path / f"{label}.safetensors"
        save_file(sd, str(f))
        spec, info = load_offsets(bundle, neg=f)
        assert "original module names, converted to peft (flux), 36 modules" in info["neg"]["report"]
        assert f"converted from the original module names: {n_mod} modules (4 fused projections split into their " \
               f"diffusers parts, 1 with (shift, scale) rows reordered)" in info["neg"]["notes"]
        got = materialize(tr, [(spec.delta, 1.0)]).state_dict()
        assert set(got) == set(expected)
        scale = max(v.abs().max() for v in expected.values())
        assert max(float((got[k] - expected[k]).abs().max()) for k in expected) <= 1e-6 * float(scale)
        assert all(not torch.equal(got[k + ".weight"], own[k + ".weight"]) for e in table.values() for k in e.targets)


def test_kohya_flux_lora_samples_as_diffusers_loads_it(flow_dirs, tmp_path):
    """The second reference: a kohya-named Flux LoRA (alpha 3, rank 2) sampled through our offset equals
    diffusers' `FluxPipeline.load_lora_weights` of the same file (its own kohya converter). Restricted to what
    that converter reads on a tiny model: the double blocks and the single blocks' `linear2` / `modulation.lin`.
    It splits `linear1` at the released width (3072 x 3 + 12288: an assertion fails at the tiny width), and it
    names the embedders and the final layer without the `transformer.` prefix, so `load_lora_weights` drops
    them silently (checked below: the modules diffusers adapted are exactly ours); those are covered by the
    single-file reference above."""
    from peft.tuners.lora import LoraLayer
    from safetensors.torch import save_file

    bundle = _bundle(flow_dirs, "flux")
    table = bundle.family_spec.original_modules(bundle.unet.config)
    mods = [m for m in table if m.startswith("double_blocks.") or m.endswith((".linear2", ".modulation.lin"))]
    kohya = _flux_original_lora(bundle.unet, table, mods)[0]
    f = tmp_path / "kohya_flux.safetensors"
    save_file(kohya, str(f))
    spec, _ = load_offsets(bundle, pos=f)
    kw = dict(negative_prompts=NEGS, cfg_scale=4.0, steps=2, height=SIZE, width=SIZE, decode=False)
    ours = sample(bundle, PROMPTS, SEEDS, "cfg", offsets=spec, **kw).latents
    plain = sample(bundle, PROMPTS, SEEDS, "cfg", **kw).latents
    ref_pipe = _pipe(flow_dirs, "flux")
    ref_pipe.load_lora_weights(str(f))
    adapted = {n for n, m in ref_pipe.transformer.named_modules() if isinstance(m, LoraLayer)}
    assert adapted == set(spec.eta.unet) and len(adapted) == 18
    ref = _pipe_latents(ref_pipe, "flux", negative=NEGS, cfg=4.0, steps=2)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    assert (ours - plain).abs().max() > 1e-2  # the LoRA does act


def test_original_named_flux_lora_refuses_what_it_cannot_place(flow_dirs, tmp_path):
    """A key that names no module of this model (a text-encoder key, a double block beyond its depth) or a
    `linear1` whose rows do not fit the q, k, v, MLP blocks refuses the whole file with the key or module named;
    nothing is applied (the model's weights are untouched)."""
    from safetensors.torch import save_file

    bundle = _bundle(flow_dirs, "flux")
    before = {k: v.clone() for k, v in bundle.unet.state_dict().items()}
    kohya = _flux_original_lora(bundle.unet, bundle.family_spec.original_modules(bundle.unet.config))[0]
    for extra, match in (
            ({"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.ones(2, 4)},
             "1 key\\(s\\) name no module of this model in its original names: lora_te1_text_model_"),
            ({"lora_unet_double_blocks_99_img_attn_qkv.lora_down.weight": torch.ones(2, 32),
              "lora_unet_double_blocks_99_img_attn_qkv.lora_up.weight": torch.ones(96, 2)},
             "2 key\\(s\\) name no module of this model in its original names: lora_unet_double_blocks_99_"),
            ({"lora_unet_single_blocks_0_linear1.lora_up.weight": torch.ones(96, 2)},
             "module 'single_blocks.0.linear1': 96 output rows do not split into the blocks \\[32, 32, 32, 128\\]")):
        f = tmp_path / "bad.safetensors"
        save_file({**kohya, **extra}, str(f))
        with pytest.raises(ValueError, match=match):
            load_offsets(bundle, neg=f)
    assert all(torch.equal(v, before[k]) for k, v in bundle.unet.state_dict().items())


def test_bundle_from_flow_pipeline_refuses_a_missing_encoder(flow_dirs):
    pipe = _pipe(flow_dirs, "sd3")
    pipe.text_encoder_3 = None
    with pytest.raises(ValueError, match="3 text encoders"):
        bundle_from_flow_pipeline(pipe, "sd3")


# ---------------------------------------------------------------------------------------------- commands
def test_generate_runs_a_flow_model(flow_dirs, tmp_path):
    import json

    from npo_suite.diffusers_host.generate import GenerateJob, run_generate

    man = run_generate(GenerateJob(model=str(flow_dirs["sd3"]), out=str(tmp_path / "out"), prompt=("a cat",),
                                   negative_prompt="blurry", modes=("cfg", "npo", "snpo"), steps=2, cfg=4.0,
                                   height=SIZE, width=SIZE, seeds=(0,)), log=lambda *_: None, progress=False)
    assert man["family"] == "sd3" and man["prediction_type"] == "flow" and man["scheduler"] == "flow-euler"
    assert len(man["images"]) == 3 and (tmp_path / "out" / "grid.png").exists()
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["modes"] == ["cfg", "npo", "snpo"]


def test_generate_takes_a_kohya_named_flux_lora(flow_dirs, tmp_path):
    """`generate` on Flux with a kohya-named --neg-offset on every module of the original layout: it runs cfg /
    npo with the LoRA converted, and the manifest records the conversion (the report's format, the note)."""
    import json

    from safetensors.torch import save_file

    from npo_suite.diffusers_host.generate import GenerateJob, run_generate

    tr = _bundle(flow_dirs, "flux").unet
    f = tmp_path / "kohya_flux.safetensors"
    save_file(_flux_original_lora(tr, get_family("flux").original_modules(tr.config))[0], str(f))
    job = GenerateJob(model=str(flow_dirs["flux"]), out=str(tmp_path / "out"), prompt=("a cat",), negative_prompt="blurry",
                      modes=("cfg", "npo"), neg_offset=str(f), steps=2, cfg=3.0, flux_guidance=1.5, height=SIZE,
                      width=SIZE, seeds=(0,))
    run_generate(job, log=lambda *_: None, progress=False)
    man = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert man["family"] == "flux" and len(man["images"]) == 2
    neg = man["offsets"]["neg"]
    assert neg["report"] == f"{f}: original module names, converted to peft (flux), 36 modules"
    assert neg["notes"] == ["converted from the original module names: 26 modules (4 fused projections split into "
                            "their diffusers parts, 1 with (shift, scale) rows reordered)"]


def _peft_lora_file(flow_dirs, name, path, seed=0):
    """A LoRA on the attn_ff preset as diffusers' `save_lora_weights` writes it (random nonzero weights)."""
    from peft import LoraConfig, get_peft_model_state_dict

    torch.manual_seed(seed)
    pipe = _pipe(flow_dirs, name)
    targets = get_family(name).lora_target_modules("attn_ff")
    pipe.transformer.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=targets, init_lora_weights=False))
    type(pipe).save_lora_weights(path, transformer_lora_layers=get_peft_model_state_dict(pipe.transformer),
                                 transformer_lora_adapter_metadata=pipe.transformer.peft_config["default"].to_dict())
    return path / "pytorch_lora_weights.safetensors"


def test_generate_pairs_and_sweep_commands_on_flow_models(flow_dirs, tmp_path, capsys):
    """The three commands of issue 23 item 5 through the CLI: generate (Flux, cfg/npo with a negative LoRA,
    --flux-guidance), pairs (SD3, npo, a tiny local CLIP scorer) and evaluate sweep (SD3, two beta settings)."""
    import json

    from npo_suite.cli import main
    from npo_suite.testing.tiny_models import build_tiny_clip

    build_tiny_clip(tmp_path / "clip", tmp_path / "clip_tok")
    flux_lora = _peft_lora_file(flow_dirs, "flux", tmp_path / "flux_lora")
    sd3_lora = _peft_lora_file(flow_dirs, "sd3", tmp_path / "sd3_lora")
    size = ["--height", str(SIZE), "--width", str(SIZE)]
    gen = tmp_path / "gen"
    assert main(["generate", str(flow_dirs["flux"]), "--prompt", "a cat", "--negative-prompt", "blurry", "--modes",
                 "cfg", "npo", "--neg-offset", str(flux_lora), "--cfg", "3", "--flux-guidance", "1.5", "--steps", "2",
                 "--seeds", "0", "1", "--out", str(gen), *size]) == 0
    man = json.loads((gen / "manifest.json").read_text())
    assert man["family"] == "flux" and man["scheduler"] == "flow-euler" and man["flux_guidance"] == 1.5
    assert len(man["images"]) == 4 and (gen / "grid.png").exists()
    check_pairs_and_sweep(flow_dirs["sd3"], sd3_lora, tmp_path, capsys, cfg="4", size=size)


def test_sd3_single_file_takes_its_transformer_and_vae_and_the_folders_encoders(flow_dirs, tmp_path):
    """An SD3.5-style single file (SAI names: `model.diffusion_model.joint_blocks.*` with fused qkv, the VAE as
    `first_stage_model.*`) loads through diffusers' own converter with --model-config = a diffusers folder: the
    transformer and VAE are the FILE's (seed 1, bit for bit), the text encoders the FOLDER's (seed 0), and
    `generate` runs cfg / npo on it."""
    from npo_suite.diffusers_host.generate import GenerateJob, run_generate
    from npo_suite.testing.tiny_models import build_sd3_single_file

    f = build_sd3_single_file(tmp_path / "sd35.safetensors", tmp_path / "seed1", seed=1)
    ref = load_model(tmp_path / "seed1", log=False)
    other = flow_dirs["sd3"]  # the session's SD3 folder: other random weights
    b = load_model(f, config=str(other), log=False)
    for got, want in ((b.unet, ref.unet), (b.vae, ref.vae)):
        g, w = got.state_dict(), want.state_dict()
        assert set(g) == set(w) and all(torch.equal(g[k], w[k]) for k in w)
    folder = load_model(other, log=False)
    assert all(torch.equal(a, c) for a, c in zip(b.text_encoders[2].state_dict().values(),
                                                   folder.text_encoders[2].state_dict().values()))
    assert not torch.equal(b.text_encoders[0].state_dict()["text_projection.weight"],
                           ref.text_encoders[0].state_dict()["text_projection.weight"])
    assert not torch.equal(b.unet.state_dict()["proj_out.weight"], folder.unet.state_dict()["proj_out.weight"])
    assert "single file sd35.safetensors" in b.detected and "VAE: in the file" in b.detected
    # without its VAE the file takes the folder's, and says so
    f2 = tmp_path / "novae.safetensors"
    from safetensors.torch import load_file, save_file

    save_file({k: v for k, v in load_file(str(f)).items() if not k.startswith("first_stage_model.")}, str(f2))
    b2 = load_model(f2, config=str(other), log=False)
    assert "VAE: vae/" in b2.detected and torch.equal(b2.vae.state_dict()["decoder.conv_out.weight"],
                                                     folder.vae.state_dict()["decoder.conv_out.weight"])
    man = run_generate(GenerateJob(model=str(f), model_config=str(other), out=str(tmp_path / "out"), prompt=("a cat",),
                                   modes=("cfg", "npo"), steps=2, cfg=4.0, height=SIZE, width=SIZE, seeds=(0,)),
                       log=lambda *_: None, progress=False)
    assert man["family"] == "sd3" and len(man["images"]) == 2
