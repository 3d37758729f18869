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


def test_kohya_named_flux_lora_is_refused_naming_its_keys(flow_dirs, tmp_path):
    """Kohya/ComfyUI names of a Flux LoRA (fused qkv of `double_blocks`) are not mapped by this reader:
    the file is refused with the keys and the model, nothing applied half-way."""
    from safetensors.torch import save_file

    f = tmp_path / "kohya_flux.safetensors"
    save_file({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.ones(2, 32),
               "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.ones(96, 2)}, str(f))
    with pytest.raises(ValueError, match=r"2 key\(s\) match no module of the given model \(FluxTransformer2DModel\)"
                                         r": lora_unet_double_blocks_0_img_attn_qkv"):
        load_offsets(_bundle(flow_dirs, "flux"), neg=f)


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
