"""SANA (SanaPipeline: Gemma2, SanaTransformer2DModel, DC-AE) in `generate`, `pairs`, `evaluate sweep` and the
trainer, on a tiny folder of the full-size classes built offline (testing.tiny_models.build_sana: random
weights, a GemmaTokenizer built locally).

Tolerances. Text encodings and the backend's velocity: torch.equal / atol 0 (the same modules called with
the same tensors). Sampled latents against diffusers' SanaPipeline: atol 1e-5 on values of size ~5: our
loop batches [cond, uncond] where the pipeline batches [uncond, cond], and a matmul over rows in another
order may round differently (float32, ~1e-7 per op; measured 0.0 here). The reference pipeline samples
with the scheduler we sample with (flow Euler at the folder's flow_shift, `SanaFamily.flow_scheduler`),
not the folder's DPM-Solver: that substitution is ours, stated in the docs and in the load line. NPO's
per-row path against one merged model per group: relative difference <= 1e-5 (the fp32 bound of the
SD3/Flux tests). The trained LoRA loaded by diffusers against our adapter: <= 1e-5 of the output scale
(two float32 evaluations of W x + B A x, see tests/test_flow_training.py).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from flow_fixtures import (assert_lora_equals_diffusers, check_npo_per_row, check_pairs_and_sweep, random_offset,  # noqa: E402
                           velocities_with_and_without_lora)
from train_fixtures import data_for, make_pairs, tiny_cfg, train_two_steps  # noqa: E402

from npo_suite.diffusers_host.generate import NPOSpec, encode_prompts, load_offsets, sample  # noqa: E402
from npo_suite.families import FAMILIES, detect_folder, detect_single_file, get_family  # noqa: E402
from npo_suite.families.loading import load_model  # noqa: E402
from npo_suite.trainer.methods import METHODS  # noqa: E402

TEXT_LEN = 16  # Gemma2 tokens kept (the pipeline's max_sequence_length is 300; the tiny model needs fewer)
PROMPTS = ["A photo of a Cat ", "red house with a tree"]  # case and spaces: the pipeline lower-cases and strips
NEGS = ["blurry", "ugly low quality"]
SEEDS = [3, 4]
SIZE = 32  # SanaPipeline takes multiples of 32 px; latents 16x16 on the tiny 2x DC-AE


@pytest.fixture(scope="module")
def sana_dir(tmp_path_factory):
    from npo_suite.testing.tiny_models import build_sana

    path = tmp_path_factory.mktemp("sana") / "sana"
    build_sana(path, seed=0)
    return path


def _pipe(path):
    from diffusers import SanaPipeline

    return SanaPipeline.from_pretrained(str(path), local_files_only=True)


def _bundle(path, text_len=TEXT_LEN):
    b = load_model(path, log=False)
    if text_len:
        b.extra["max_sequence_length"] = text_len
    return b


def _pipe_latents(pipe, scheduler, *, negative, cfg, steps=3):
    pipe.scheduler = scheduler  # flow Euler at the folder's flow_shift: what we sample with
    with torch.no_grad():
        return pipe(PROMPTS, negative_prompt=negative, guidance_scale=cfg, num_inference_steps=steps, height=SIZE,
                    width=SIZE, generator=[torch.Generator().manual_seed(s) for s in SEEDS],
                    max_sequence_length=TEXT_LEN, output_type="latent", use_resolution_binning=False).images


# ---------------------------------------------------------------------------------------------- family
def test_sana_family_detection_and_refusals(sana_dir, tmp_path):
    from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler
    from safetensors.torch import save_file

    fam = FAMILIES["sana"]
    assert fam.is_flow_transformer and detect_folder(sana_dir) is fam and fam.base_model_version == "sana"
    assert fam.lora_target_modules("attn_ff") == ["to_q", "to_k", "to_v", "to_out.0", "ff.conv_inverted", "ff.conv_point"]
    lines = []
    b = load_model(sana_dir, log=lines.append)
    assert b.family == "sana" and b.prediction_type == "flow" and b.latent_scale == 2 and lines == [b.detected]
    assert "SANA diffusers folder" in b.detected and "flow Euler, not SANA's DPM-Solver" in b.detected
    assert type(b.scheduler) is FlowMatchEulerDiscreteScheduler and b.scheduler.config.shift == 3.0  # the flow_shift
    # schedules we cannot honour are refused, not replaced
    with pytest.raises(ValueError, match="not a flow schedule we can honour"):
        fam.flow_scheduler(DPMSolverMultistepScheduler())  # epsilon DPM-Solver
    with pytest.raises(ValueError, match="use_dynamic_shifting"):
        fam.flow_scheduler(FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True))
    own = FlowMatchEulerDiscreteScheduler(shift=7.0)
    assert fam.flow_scheduler(own)[0] is own
    with pytest.raises(ValueError, match="AutoencoderDC"):
        load_model(sana_dir, vae=sana_dir / "vae", log=False)
    sprint = tmp_path / "sprint"
    sprint.mkdir()
    (sprint / "model_index.json").write_text(json.dumps({"_class_name": "SanaSprintPipeline"}))
    with pytest.raises(ValueError, match="SanaSprintPipeline folder is not supported.*consistency"):
        load_model(sprint, log=False)
    # an original SANA checkpoint: detected by its tensor names; it needs its diffusers folder
    f = tmp_path / "sana.safetensors"
    save_file({"blocks.0.mlp.inverted_conv.conv.weight": torch.zeros(2, 2, 1, 1)}, str(f))
    assert detect_single_file(["attention_y_norm.weight"]).name == "sana"
    with pytest.raises(ValueError, match="SANA single file holds the transformer.*pass --model-config DIR"):
        load_model(f, log=False)


def test_sana_single_file_takes_its_transformer_and_the_folders_encoder(sana_dir, tmp_path):
    """An NVlabs-named SANA checkpoint (`blocks.N.attn.qkv`, `cross_attn.kv_linear`, ...; seed 1) with
    --model-config = a SANA diffusers folder (seed 0): diffusers' own converter gives the file's transformer bit
    for bit; the Gemma2 encoder, DC-AE and scheduler are the folder's; `generate` samples with it."""
    from npo_suite.diffusers_host.generate import GenerateJob, run_generate
    from safetensors.torch import save_file

    from npo_suite.testing.tiny_models import build_sana, sana_original_state_dict

    other = build_sana(tmp_path / "seed1", seed=1)
    f = tmp_path / "sana_1.safetensors"
    save_file(sana_original_state_dict(other.transformer), str(f))
    b = load_model(f, config=str(sana_dir), log=False)
    got, want = b.unet.state_dict(), other.transformer.state_dict()
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    folder = load_model(sana_dir, log=False)
    assert all(torch.equal(x, y) for x, y in zip(b.text_encoders[0].state_dict().values(),
                                                 folder.text_encoders[0].state_dict().values()))
    assert not torch.equal(got["proj_out.weight"], folder.unet.state_dict()["proj_out.weight"])
    assert "single file sana_1.safetensors" in b.detected and "VAE: vae/" in b.detected
    man = run_generate(GenerateJob(model=str(f), model_config=str(sana_dir), out=str(tmp_path / "out"),
                                   prompt=("a cat",), modes=("cfg", "npo"), steps=2, cfg=4.0, height=SIZE, width=SIZE,
                                   seeds=(0,)), log=lambda *_: None, progress=False)
    assert man["family"] == "sana" and len(man["images"]) == 2
    # the same weights as a pickle (.pth, as NVlabs ships them): only with allow_pickle and the family named
    pth = tmp_path / "sana_1.pth"
    torch.save(sana_original_state_dict(other.transformer), str(pth))
    with pytest.raises(ValueError, match="pickle"):
        load_model(pth, config=str(sana_dir), log=False)
    bp = load_model(pth, family="sana", allow_pickle=True, config=str(sana_dir), log=False)
    assert all(torch.equal(bp.unet.state_dict()[k], want[k]) for k in want) and "unknown (pickle)" in bp.detected


def test_the_cache_key_follows_the_instruction_prefix(monkeypatch):
    """Cached SANA text encodings depend on the pipeline's instruction prefix (a diffusers default): another
    prefix gives another cache key; families without such a setting keep theirs ("")."""
    import npo_suite.families.sana as sana

    tag = FAMILIES["sana"].cache_tag()
    assert tag.startswith(":chi=") and tag.endswith(":len=300") and FAMILIES["sd3"].cache_tag() == ""
    monkeypatch.setattr(sana, "complex_human_instruction", lambda: ["another instruction"])
    assert FAMILIES["sana"].cache_tag() != tag


@pytest.mark.parametrize("text_len", [TEXT_LEN, None])  # None: the pipeline's 300
def test_encode_text_is_the_pipelines(sana_dir, text_len):
    """Positive prompts with the complex human instruction and the token selection, the negative / null ""
    without either: equal to SanaPipeline.encode_prompt, embeds and attention masks."""
    from npo_suite.families.sana import complex_human_instruction

    bundle, pipe = _bundle(sana_dir, text_len), _pipe(sana_dir)
    n = text_len or 300
    with torch.no_grad():
        c, neg = encode_prompts(bundle, PROMPTS), encode_prompts(bundle, [""] * 2, negative=True)
        c_negs = encode_prompts(bundle, NEGS, negative=True)
        pe, pm, npe, npm = pipe.encode_prompt(PROMPTS, negative_prompt="", max_sequence_length=n,
                                              complex_human_instruction=complex_human_instruction())
        _, _, npe2, npm2 = pipe.encode_prompt(PROMPTS, negative_prompt=NEGS, max_sequence_length=n,
                                              complex_human_instruction=complex_human_instruction())
    key = "encoder_attention_mask"
    assert c.hidden.shape == (2, n, 16) and torch.equal(c.hidden, pe) and torch.equal(c.added[key], pm.float())
    assert torch.equal(neg.hidden, npe) and torch.equal(neg.added[key], npm.float())
    assert torch.equal(c_negs.hidden, npe2) and torch.equal(c_negs.added[key], npm2.float())
    assert neg.added[key].sum() == 2 and neg.hidden.abs().sum() > 0  # "" is <bos> only, encoded (not zeros)
    # the instruction prefix is why a positive prompt's encoding differs from the same text as a negative one
    assert not torch.equal(encode_prompts(bundle, NEGS).hidden, c_negs.hidden)


# ---------------------------------------------------------------------------------------------- sampling
def test_cfg_equals_the_diffusers_pipeline(sana_dir):
    bundle, pipe = _bundle(sana_dir), _pipe(sana_dir)
    ours = sample(bundle, PROMPTS, SEEDS, "cfg", negative_prompts=NEGS, cfg_scale=4.5, steps=3, height=SIZE,
                  width=SIZE, decode=False).latents
    ref = _pipe_latents(pipe, bundle.scheduler, negative=NEGS, cfg=4.5)
    assert ours.shape == ref.shape == (2, 4, SIZE // 2, SIZE // 2)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    kw = dict(negative_prompts=NEGS, cfg_scale=4.5, steps=2, height=SIZE, width=SIZE, decode=False)
    with pytest.raises(ValueError, match="flow-euler"):
        sample(bundle, PROMPTS, SEEDS, "cfg", scheduler="dpmpp", **kw)  # SANA's DPM-Solver is not ours
    with pytest.raises(ValueError, match="no guidance embedding"):
        sample(bundle, PROMPTS, SEEDS, "cfg", flux_guidance=1.0, **kw)
    with pytest.raises(ValueError, match="multiples of 2"):
        sample(bundle, PROMPTS, SEEDS, "cfg", **{**kw, "height": 33})


@pytest.mark.parametrize("coverage", ["attn_ff", "every_layer"])
def test_npo_per_row_equals_the_merged_two_model_path(sana_dir, coverage):
    """One batched forward with δ on the unconditional rows only (the text mask concatenated with the rows)
    equals one merged model per group. every_layer: every Linear and ungrouped Conv2d of the transformer
    (patch embedding, timestep / caption embedders, attention, GLUMBConv 1x1 convs, proj_out)."""
    check_npo_per_row(_bundle(sana_dir), coverage, prompts=PROMPTS, negatives=NEGS, seeds=SEEDS, size=SIZE,
                      cfg_scale=4.5)


def test_snpo_equals_the_lora_model_with_the_null_conditioning(sana_dir):
    from npo_suite.core.offsets import materialize

    bundle, pipe = _bundle(sana_dir), _pipe(sana_dir)
    s = random_offset(bundle.unet, bundle.family_spec.lora_target_modules("attn_ff"), 5, scale=0.2)
    ours = sample(bundle, PROMPTS, SEEDS, "snpo", negative_prompts=NEGS, offsets=NPOSpec(snpo=s, beta=1.0),
                  cfg_scale=4.5, steps=3, height=SIZE, width=SIZE, decode=False).latents
    pipe.transformer = materialize(pipe.transformer, [(s, 1.0)])  # θ + s merged, diffusers' own loop
    ref = _pipe_latents(pipe, bundle.scheduler, negative=[""] * 2, cfg=4.5)  # the null conditioning: ""
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def _peft_lora_file(path, out, seed=0):
    """A LoRA on the attn_ff preset (attention Linears and GLUMBConv 1x1 convs) as diffusers'
    `SanaPipeline.save_lora_weights` writes it (random nonzero weights)."""
    from diffusers import SanaPipeline
    from peft import LoraConfig, get_peft_model_state_dict

    torch.manual_seed(seed)
    pipe = _pipe(path)
    pipe.transformer.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=get_family("sana").lora_target_modules("attn_ff"),
                                            init_lora_weights=False))
    SanaPipeline.save_lora_weights(out, transformer_lora_layers=get_peft_model_state_dict(pipe.transformer),
                                   transformer_lora_adapter_metadata=pipe.transformer.peft_config["default"].to_dict())
    return out / "pytorch_lora_weights.safetensors"


def test_generate_pairs_and_sweep_commands_on_sana(sana_dir, tmp_path, capsys):
    """generate (cfg / npo / snpo with a diffusers-written LoRA: images, grid, manifest), pairs (npo, a tiny
    local CLIP scorer) and evaluate sweep (two beta settings), through the CLI."""
    from npo_suite.cli import main
    from npo_suite.testing.tiny_models import build_tiny_clip

    build_tiny_clip(tmp_path / "clip", tmp_path / "clip_tok")
    lora = _peft_lora_file(sana_dir, tmp_path / "lora")
    spec, _ = load_offsets(_bundle(sana_dir), neg=lora)
    assert not spec.delta.report.unmatched_keys and any(k.endswith("ff.conv_point") for k in spec.delta.unet)
    size = ["--height", str(SIZE), "--width", str(SIZE)]
    gen = tmp_path / "gen"
    assert main(["generate", str(sana_dir), "--prompt", "a cat", "--negative-prompt", "blurry", "--modes", "cfg", "npo",
                 "snpo", "--neg-offset", str(lora), "--snpo-offset", str(lora), "--cfg", "4.5", "--steps", "2",
                 "--seeds", "0", "--out", str(gen), *size]) == 0
    man = json.loads((gen / "manifest.json").read_text())
    assert man["family"] == "sana" and man["scheduler"] == "flow-euler" and man["prediction_type"] == "flow"
    assert [r["mode"] for r in man["images"]] == ["cfg", "npo", "snpo"] and (gen / "grid.png").exists()
    from PIL import Image

    imgs = [torch.tensor(list(Image.open(gen / r["file"]).getdata())).float() for r in man["images"]]
    assert all(im.numel() == SIZE * SIZE * 3 for im in imgs) and (imgs[0] - imgs[1]).abs().max() > 0
    check_pairs_and_sweep(sana_dir, lora, tmp_path, capsys, cfg="4.5", size=size)


# ---------------------------------------------------------------------------------------------- trainer
def _backend(path, **kw):
    from npo_suite.trainer.backends.diffusers import BackendOptions, DiffusersBackend, LoraOptions

    lora = kw.pop("lora", LoraOptions(rank=2, alpha=2))
    return DiffusersBackend.from_pretrained(str(path), options=BackendOptions(lora=lora, **kw))


def test_backend_velocity_and_latents_are_the_pipelines(sana_dir):
    """predict_v with every adapter off = the transformer called as SanaPipeline calls it (timestep t·1000·
    timestep_scale, the mask as encoder_attention_mask); ∅ = the pipeline's negative ""; latents = DC-AE's
    (deterministic) encoding scaled by its scaling_factor."""
    from npo_suite.families.sana import complex_human_instruction

    b = _backend(sana_dir)
    assert b.is_transformer and b.prediction_type == "flow" and b.num_train_timesteps == 1000
    pipe = _pipe(sana_dir)
    prompts = ["a photo of a cat", "a red house"]
    cond, null = b.encode_prompts(prompts), b.null_cond(2)
    with torch.no_grad():
        pe, pm, npe, npm = pipe.encode_prompt(prompts, complex_human_instruction=complex_human_instruction())
    mask = "encoder_attention_mask"
    assert torch.equal(cond.hidden, pe) and torch.equal(cond.added[mask], pm.float())
    assert torch.equal(null.hidden, npe) and torch.equal(null.added[mask], npm.float())
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([0.3, 0.8])
    with b.use_adapter(None):
        v = b.predict_v(x, t, cond)
    with torch.no_grad():
        ref = pipe.transformer(x, encoder_hidden_states=pe, encoder_attention_mask=pm,
                               timestep=t * 1000 * pipe.transformer.config.timestep_scale, return_dict=False)[0]
    assert v.shape == x.shape and v.std() > 0
    torch.testing.assert_close(v, ref, rtol=0, atol=0)
    px = torch.rand(1, 3, 16, 16, generator=g) * 2 - 1
    with torch.no_grad():
        want = pipe.vae.encode(px).latent * pipe.vae.config.scaling_factor
    assert torch.equal(b.encode_images(px), want)
    # a transformer whose config scales the timestep (`timestep_scale`, 1.0 in the hub's 1600M folders)
    for m in (b.unet, pipe.transformer):
        m.register_to_config(timestep_scale=0.25)
    with b.use_adapter(None):
        v_scaled = b.predict_v(x, t, cond)
    with torch.no_grad():
        ref = pipe.transformer(x, encoder_hidden_states=pe, encoder_attention_mask=pm, timestep=t * 1000 * 0.25,
                               return_dict=False)[0]
    torch.testing.assert_close(v_scaled, ref, rtol=0, atol=0)
    assert (v_scaled - v).abs().max() > 1e-4


def test_learned_sigma_output_keeps_its_first_half():
    """A transformer with out_channels = 2 in_channels (learned sigma): the velocity is the first half of its
    output, as SanaPipeline takes it."""
    from diffusers import SanaTransformer2DModel

    from npo_suite.testing.tiny_models import sana_transformer_config

    torch.manual_seed(0)
    model = SanaTransformer2DModel(**{**sana_transformer_config(), "out_channels": 8}).eval()
    g = torch.Generator().manual_seed(0)
    x, hidden = torch.randn(2, 4, 4, 4, generator=g), torch.randn(2, 5, 16, generator=g)
    mask, t = torch.ones(2, 5), torch.tensor([500.0])
    with torch.no_grad():
        v = get_family("sana").velocity(model, x, t, hidden, {"encoder_attention_mask": mask}, h=4, w=4)
        full = model(x, encoder_hidden_states=hidden, encoder_attention_mask=mask, timestep=t.expand(2),
                     return_dict=False)[0]
    assert full.shape[1] == 8 and torch.equal(v, full[:, :4])


@pytest.mark.parametrize("method", ["dpo", "npo"])
def test_train_writes_a_lora_that_diffusers_loads_as_trained(sana_dir, method, tmp_path, capsys):
    from safetensors import safe_open

    from npo_suite.cli import main

    pairs = make_pairs(tmp_path / "pairs", n=4)
    out = tmp_path / "run"
    rc = main(["train", "--model", str(sana_dir), "--data-path", str(pairs), "--method", method, "--steps", "3",
               "--resolution", "16", "--lora-rank", "2", "--lora-alpha", "4", "--lora-targets", "attn_ff", "--lr", "1e-2",
               "--checkpoint-every", "0", "--output-dir", str(out), "--cache-dir", str(tmp_path / "cache"), "--cpu"])
    err = capsys.readouterr()
    assert rc == 0, err.err
    assert "finished step 3/3" in err.out and "text encoders: released after caching" in err.err
    lora = out / f"{method}_lora.safetensors"
    with safe_open(str(lora), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
        state = {k: f.get_tensor(k) for k in keys}
    assert keys and all(k.startswith("transformer.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)
    assert any(".ff.conv_point." in k for k in keys) and state[next(k for k in keys if "conv_point.lora_A" in k)].ndim == 4
    assert meta["ss_base_model_version"] == "sana" and meta["npo_family"] == "sana" and meta["npo_method"] == method
    assert any(v.abs().max() > 0 for k, v in state.items() if k.endswith("lora_B.weight"))  # it trained

    from npo_suite.trainer.backends.diffusers import LoraOptions

    b = _backend(sana_dir, lora=LoraOptions(rank=2, alpha=4, targets="attn_ff"))
    b.load_lora_file(str(lora))  # ours: the file as the policy adapter
    x, t, cond, ours, base = velocities_with_and_without_lora(b)
    pipe = _pipe(sana_dir)
    pipe.load_lora_weights(str(lora))  # theirs: diffusers' SanaLoraLoaderMixin on a fresh pipeline
    with torch.no_grad():
        theirs = b.spec.velocity(pipe.transformer, x, t * 1000, cond.hidden, cond.added, h=8, w=8)
    assert_lora_equals_diffusers(ours, theirs, base)


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_trains_on_sana(sana_dir, method, tmp_path):
    """Each method of the registry: 2 steps from the tiny SANA folder, finite loss, the policy moved."""
    from npo_suite.trainer.backends.diffusers import BackendOptions, DiffusersBackend, LoraOptions

    cfg = tiny_cfg(sana_dir, data_for(method, tmp_path / "data"), tmp_path / "out", method=method, steps=2,
                   tdft_solver_steps=3, tdft_k=2)
    backend = DiffusersBackend.from_bundle(load_model(sana_dir, log=False), options=BackendOptions(
        lora=LoraOptions(cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, None, cfg.seed), resolution=cfg.resolution))
    train_two_steps(cfg, backend)


def test_dry_run_estimates_a_sana_folder_as_the_allocator_measures_it(sana_dir, tmp_path, capsys):
    """`train --dry-run --json` traces a SANA folder (Gemma-2 released after the cache fill, as the loop does), and
    the fake trace of a tiny DPO run equals the tracker on real tensors (1e-3) and the CPU allocator within 15%,
    the bound of the UNet and SD3 checks (kernels' own buffers the tracker does not see)."""
    import json

    from npo_suite.cli import main
    from npo_suite.trainer.memory_estimate import measure_run, trace_run

    assert main(["train", "--dry-run", "--json", "--model", str(sana_dir), "--method", "dpo", "--resolution", "32",
                 "--cache-dir", "unused", "--output-dir", str(tmp_path / "run"), "--cpu"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["settings"]["family"] == "sana" and d["peak_gib"] > 0 and d["settings"]["text_encoders_released"] is True
    cfg = tiny_cfg(sana_dir, make_pairs(tmp_path / "pairs", n=2), tmp_path / "out", method="dpo", batch_size=2,
                   cache_dir="unused")
    est = trace_run(cfg, str(sana_dir), device="cpu", fake=True)
    meas = measure_run(cfg, str(sana_dir), device="cpu")
    assert est.peak_gib == pytest.approx(meas["tracker_peak_gib"], rel=1e-3)
    assert est.peak_gib == pytest.approx(meas["allocator_peak_gib"], rel=0.15)
