"""Preference LoRAs for flow-matching transformers (issue 22): the trainer on tiny SD3 and Flux folders.

What is checked, on diffusers' own classes with random weights (testing.tiny_models.build_sd3 / build_flux):
- the backend's velocity is the family pipeline's transformer call (the same tokens, timestep t·1000, Flux's
  2x2 packing and embedded guidance), so every method's loss sees what the pipeline samples with;
- `train` runs DPO / SNPO (∅ = the encoded empty prompt) / NPO from a diffusers folder, releases the text
  encoders after caching and writes `transformer.<module>.lora_A/B.weight`;
- that file, loaded by diffusers' own `load_lora_weights`, gives the transformer the trainer trained: its
  output equals our adapter's (float32; see the tolerance below) and differs from the base.
"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from .flow_fixtures import assert_lora_equals_diffusers, build_flow_dirs, velocities_with_and_without_lora
from .train_fixtures import make_pairs

FAMILIES = ("sd3", "flux")


@pytest.fixture(scope="module")
def flow_dirs(tmp_path_factory):
    return build_flow_dirs(tmp_path_factory.mktemp("flow_models"))


def _pipeline(path):
    import diffusers

    index = json.loads((path / "model_index.json").read_text())
    return getattr(diffusers, index["_class_name"]).from_pretrained(str(path), local_files_only=True)


def _backend(path, **kw):
    from npo_suite.trainer.backends.diffusers import BackendOptions, DiffusersBackend, LoraOptions

    return DiffusersBackend.from_pretrained(str(path), options=BackendOptions(lora=LoraOptions(rank=2, alpha=2), **kw))


@pytest.mark.parametrize("fam", FAMILIES)
def test_backend_velocity_is_the_pipeline_transformer_call(flow_dirs, fam):
    """predict_v(x_t, t) with every adapter off = the diffusers transformer called as the pipeline calls it."""
    from npo_suite.families import get_family

    b = _backend(flow_dirs[fam])
    assert b.is_transformer and b.prediction_type == "flow"
    pipe = _pipeline(flow_dirs[fam])
    prompts = ["a photo of a cat", "a red house"]
    cond = b.encode_prompts(prompts)
    with torch.no_grad():  # as the backend encodes (autograd on picks other T5 kernels: ~1e-5 apart)
        if fam == "sd3":
            pe, _, pooled, _ = pipe.encode_prompt(prompts, prompts, prompts, do_classifier_free_guidance=False,
                                                  max_sequence_length=get_family("sd3").t5_max_length)
        else:
            pe, pooled, _ = pipe.encode_prompt(prompts, prompts, max_sequence_length=get_family("flux").t5_max_length)
    assert torch.equal(cond.hidden, pe.float()) and torch.equal(cond.added["pooled_projections"], pooled.float())
    g = torch.Generator().manual_seed(0)
    c = b.spec.latent_channels(b.unet)
    x = torch.randn(2, c, 8, 8, generator=g)
    t = torch.tensor([0.3, 0.8])
    with b.use_adapter(None):
        v = b.predict_v(x, t, cond)
    tr = pipe.transformer
    with torch.no_grad():
        if fam == "sd3":
            ref = tr(hidden_states=x, timestep=t * 1000, encoder_hidden_states=pe, pooled_projections=pooled,
                     return_dict=False)[0]
        else:  # FluxPipeline: packed latents, timestep / 1000, guidance embedded (trainer: 1.0), ids
            packed = pipe._pack_latents(x, 2, c, 8, 8)
            ids = pipe._prepare_latent_image_ids(2, 4, 4, x.device, x.dtype)
            txt = torch.zeros(pe.shape[1], 3)
            out = tr(hidden_states=packed, timestep=t, guidance=torch.ones(2), pooled_projections=pooled,
                     encoder_hidden_states=pe, txt_ids=txt, img_ids=ids, return_dict=False)[0]
            ref = pipe._unpack_latents(out, 16, 16, 2)  # pixel size: vae_scale_factor 2 on the tiny VAE
    assert v.shape == x.shape and torch.isfinite(v).all() and v.std() > 0
    # the same float32 ops in the same order (only the packing differs by a view): equal to the last bit
    torch.testing.assert_close(v, ref.float(), rtol=0, atol=0)


@pytest.mark.parametrize("fam,method", [("sd3", "dpo"), ("sd3", "snpo"), ("flux", "npo")])
def test_train_writes_a_lora_that_diffusers_loads_as_trained(flow_dirs, fam, method, tmp_path, capsys):
    from npo_suite.cli import main

    pairs = make_pairs(tmp_path / "pairs", n=4)
    out = tmp_path / "run"
    rc = main(["train", "--model", str(flow_dirs[fam]), "--data-path", str(pairs), "--method", method, "--steps", "3",
               "--resolution", "16", "--lora-rank", "2", "--lora-alpha", "4", "--lr", "1e-2", "--checkpoint-every", "0",
               "--output-dir", str(out), "--cache-dir", str(tmp_path / "cache"), "--cpu"])
    err = capsys.readouterr()
    assert rc == 0, err.err
    assert "finished step 3/3" in err.out
    assert "text encoders: released after caching" in err.err
    lora = out / f"{method}_lora.safetensors"
    with safe_open(str(lora), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
        state = {k: f.get_tensor(k) for k in keys}
    assert keys and all(k.startswith("transformer.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)
    assert meta["ss_base_model_version"] == {"sd3": "sd3", "flux": "flux1"}[fam] and meta["npo_method"] == method
    assert meta["npo_family"] == fam
    assert any(v.abs().max() > 0 for k, v in state.items() if k.endswith("lora_B.weight"))  # it trained

    # ours: the backend with the file loaded as its policy adapter (the continue-training reader)
    b = _backend(flow_dirs[fam])
    b.load_lora_file(str(lora))
    x, t, cond, ours, base = velocities_with_and_without_lora(b)
    # theirs: diffusers' own loader on a fresh pipeline, the same call through the backend's family
    pipe = _pipeline(flow_dirs[fam])
    pipe.load_lora_weights(str(lora))
    b2 = _backend(flow_dirs[fam])
    b2.unet = pipe.transformer  # the LoRA-patched transformer, called exactly as ours
    with torch.no_grad(), b.use_adapter(None):
        theirs = b2.spec.unpack(b2.spec.velocity(pipe.transformer, b2.spec.pack(x), t * 1000, cond.hidden,
                                                 cond.added, h=8, w=8, guidance=1.0), 8, 8)
    assert_lora_equals_diffusers(ours, theirs, base)  # tolerance explained there


def test_text_encoders_are_kept_when_something_still_encodes(flow_dirs, capsys):
    """Released only when the cache holds every prompt and nothing encodes later; otherwise kept, and said why."""
    from npo_suite.trainer.config import TrainConfig
    from npo_suite.trainer.loop import release_text_encoders
    from npo_suite.trainer.methods import METHODS

    b = _backend(flow_dirs["sd3"])
    for cfg, method, why in ((TrainConfig(cache_dir=""), "dpo", "no cache_dir"),
                             (TrainConfig(cache_dir="c", method="ddspo"), "ddspo", "encodes prompts at every step"),
                             (TrainConfig(cache_dir="c", validate_every=5), "dpo", "validation grids")):
        assert release_text_encoders(cfg, b, METHODS[method]) == 0
        assert why in capsys.readouterr().err and len(b.text_encoders) == 3
    n = release_text_encoders(TrainConfig(cache_dir="c"), b, METHODS["dpo"])
    assert n > 0 and b.text_encoders == [] and "released after caching" in capsys.readouterr().err
    assert b.null_cond(2).hidden.shape[0] == 2  # ∅ was cached before the release
    with pytest.raises(RuntimeError, match="released after caching"):
        b.encode_prompts(["a cat"])


def test_validation_grid_on_a_flow_transformer(flow_dirs, tmp_path, capsys):
    """validate_every on SD3: the grid is sampled with the flow Euler solver (predict_eps would refuse a flow
    model mid-run), and the text encoders stay for it (said)."""
    import numpy as np
    from PIL import Image

    from npo_suite.cli import main

    pairs = make_pairs(tmp_path / "pairs", n=2)
    out = tmp_path / "run"
    rc = main(["train", "--model", str(flow_dirs["sd3"]), "--data-path", str(pairs), "--method", "dpo", "--steps", "2",
               "--resolution", "16", "--lora-rank", "2", "--lora-alpha", "2", "--checkpoint-every", "0",
               "--output-dir", str(out), "--cache-dir", str(tmp_path / "cache"), "--cpu",
               "--set", "validate_every=2", "--set", "validation_sample_steps=2", "--set", "validation_seeds=[0]"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "text encoders: kept in memory (validation grids encode their prompts)" in err
    grid = np.asarray(Image.open(out / "validation" / "step_000002.png"))
    assert grid.shape[0] == 16 and grid.shape[1] == 32 and grid.std() > 0  # one prompt x (base, LoRA)
