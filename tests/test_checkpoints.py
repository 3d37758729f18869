"""Checkpoints and tokenizers as users have them (issue 24): a tokenizer folder that says more tokens than
its encoder holds (ComfyUI's `comfy/sd1_tokenizer`: 8192), single-file checkpoints with nothing else
(the shipped CLIP tokenizer), fp16 files, files without a VAE (`--vae`), v-prediction files (ComfyUI's
`v_pred` key, `--prediction-type`), SDXL's second tokenizer padding with "!", the digits world's DDSPO
data command.

The single files are tiny SD1.x checkpoints in LDM names (`testing.tiny_models.build_sd15_single_file`,
text encoder with CLIP's real 49,408-token vocabulary); their architecture configs stand in for the
shipped full-size `configs/sd15` (the `config=` argument, or `CONFIG_DIR` patched for the CLI).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from npo_suite.core import conditioning
from npo_suite.families import SD1, SDXL
from npo_suite.families.loading import SHIPPED_TOKENIZER, load_model, single_file_tokenizers

ROOT = Path(__file__).resolve().parents[1]
LONG = " ".join(["a red car parked beside a tall green tree in the morning light"] * 8)  # 104 words


@pytest.fixture(autouse=True)
def _no_leftover_truncations():
    conditioning.TRUNCATED.take_note()
    yield
    conditioning.TRUNCATED.take_note()


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """Tiny SD1.x single files: plain (fp32, VAE), v-prediction in fp16, and one without VAE; their configs."""
    from npo_suite.testing.tiny_models import build_sd15_single_file

    d = tmp_path_factory.mktemp("single")
    cfg = d / "configs" / "sd15"
    unet, te, vae = build_sd15_single_file(d / "plain.safetensors", cfg, seed=0)
    build_sd15_single_file(d / "vpred16.safetensors", seed=0, v_pred=True, dtype=torch.float16)
    build_sd15_single_file(d / "novae.safetensors", seed=0, with_vae=False)
    vae.save_pretrained(d / "vae_folder")
    return {"dir": d, "cfg": cfg, "unet": unet, "te": te, "vae": vae}


def _comfy_like_tokenizer(src: Path, dst: Path) -> Path:
    """A copy of a CLIP tokenizer folder whose config says model_max_length 8192, as ComfyUI's sd1_tokenizer."""
    from transformers import CLIPTokenizer

    CLIPTokenizer.from_pretrained(str(src)).save_pretrained(str(dst))
    cfg = json.loads((dst / "tokenizer_config.json").read_text())
    (dst / "tokenizer_config.json").write_text(json.dumps({**cfg, "model_max_length": 8192}))
    return dst


# ------------------------------------------------------------------------------------------ prompt length
def test_prompt_length_comes_from_the_text_encoder_and_long_prompts_are_cut_and_counted(sd15, tmp_path, capsys):
    """model_max_length 8192 (ComfyUI's folder) crashed transformers ("Sequence length must be less than
    max_position_embeddings (8192 vs 77)"). The length is min(tokenizer, encoder) = 77; a longer prompt keeps
    its first 75 tokens between start and end (what the encoder is then given), counted once per prompt."""
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(_comfy_like_tokenizer(SHIPPED_TOKENIZER, tmp_path / "tok")))
    assert tok.model_max_length == 8192 and conditioning.prompt_length(tok, sd15.text_encoder) == 77
    from transformers import CLIPTextModel

    from npo_suite.testing.tiny_models import CLIP_VOCAB_SIZE, text_encoder_config

    torch.manual_seed(0)
    te = CLIPTextModel(text_encoder_config(CLIP_VOCAB_SIZE)).eval()
    with torch.no_grad():
        h, _ = SD1.encode_text([tok], [te], ["a photo of a cat", LONG], "cpu")
        assert h.shape == (2, 77, 32)
        ids = tok([LONG]).input_ids[0]
        assert len(ids) > 77
        cut = torch.tensor([ids[:76] + [ids[-1]]])  # start + 75 tokens + end
        assert torch.equal(h[1:], te(cut)[0])  # exactly what the encoder sees: the cut prompt
        SD1.encode_text([tok], [te], [LONG], "cpu")  # the same prompt again: counted once
    err = capsys.readouterr().err
    assert err.count("note: a prompt has") == 1 and "more than the text encoder's 77" in err
    note = conditioning.TRUNCATED.take_note()
    assert note.startswith("1 prompt(s) longer than the text encoder's 77 tokens were truncated") and "75-token" in note
    assert conditioning.TRUNCATED.take_note() is None  # reported once


def test_generate_with_a_comfyui_tokenizer_folder_warns_once_with_the_count(sd15_dir, tmp_path, capsys):
    """The command level: `generate --tokenizer <8192 folder>` runs, and one warning at the end counts the cut
    prompts (here 1 of 2, sampled in two modes: still 1)."""
    from npo_suite.cli import main

    tok = _comfy_like_tokenizer(sd15_dir / "tokenizer", tmp_path / "tok")
    rc = main(["generate", str(sd15_dir), "--tokenizer", str(tok), "--prompt", "a cat", "--prompt", LONG,
               "--modes", "cfg", "npo", "--steps", "1", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert [ln for ln in err.splitlines() if ln.startswith("warning: ")] == [
        ln for ln in err.splitlines() if ln.startswith("warning: 1 prompt(s) longer than the text encoder's 77 tokens")]
    assert err.count("warning: 1 prompt(s)") == 1


# ------------------------------------------------------------------------------------------ the shipped tokenizer
def test_shipped_clip_tokenizer_is_clip_and_ships_in_the_wheel():
    import fnmatch
    import tomllib

    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(SHIPPED_TOKENIZER))
    # open_clip's SimpleTokenizer (OpenAI CLIP's BPE) gives these ids for this prompt
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert len(tok) == 49408 and tok.pad_token_id == 49407 and tok.model_max_length == 77
    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["npo_suite"]
    for f in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        rel = f"configs/clip_tokenizer/{f}"
        assert (ROOT / rel).is_file() and any(fnmatch.fnmatch(rel, g) for g in globs), rel
    assert "clip_tokenizer" in (ROOT / "configs" / "README.md").read_text()  # where it comes from, its licence


def test_sdxl_second_tokenizer_pads_with_bang_as_openclip():
    """SDXL's tokenizer_2 (diffusers) and ComfyUI's clip_g pad with "!" (id 0); the first with <|endoftext|>.
    The same tokenizer twice (the old single-file path) padded the second encoder with 49407: its hidden
    states after the end token (part of the UNet's context) differed from a real SDXL folder's."""
    from transformers import CLIPTextModelWithProjection

    from npo_suite.testing.tiny_models import CLIP_VOCAB_SIZE, text_encoder_config

    toks, where = single_file_tokenizers(SDXL, None)
    assert "configs/clip_tokenizer" in where
    assert [t.pad_token_id for t in toks] == [49407, 0] and toks[1].pad_token == "!"
    ids = [t(["a cat"], padding="max_length", max_length=77).input_ids[0] for t in toks]
    assert ids[0][:4] == ids[1][:4] == [49406, 320, 2368, 49407] and set(ids[0][4:]) == {49407} and set(ids[1][4:]) == {0}
    cfg = text_encoder_config(CLIP_VOCAB_SIZE)
    cfg.bos_token_id, cfg.eos_token_id = 49406, 49407
    torch.manual_seed(0)
    te = CLIPTextModelWithProjection(cfg).eval()
    with torch.no_grad():
        bang, eos = (te(torch.tensor([i]), output_hidden_states=True) for i in (ids[1], ids[0]))
    assert torch.equal(bang.hidden_states[-2][:, :4], eos.hidden_states[-2][:, :4])  # causal: up to the end token
    assert not torch.allclose(bang.hidden_states[-2][:, 4:], eos.hidden_states[-2][:, 4:])  # the padding differs
    assert torch.equal(bang.text_embeds, eos.text_embeds)  # pooled at the end token: the same


def test_sdxl_folder_without_tokenizer_2_pads_its_second_encoder_with_bang(sdxl_dir, tmp_path):
    d = tmp_path / "xl"
    shutil.copytree(sdxl_dir, d)
    shutil.rmtree(d / "tokenizer_2")
    b = load_model(d, log=False)
    assert [t.pad_token for t in b.tokenizers] == ["<|endoftext|>", "!"]
    assert "tokenizer/ (pad !) for encoder 2" in b.detected


# ------------------------------------------------------------------------------------------ single files
def test_single_file_loads_with_no_tokenizer_and_says_what_it_found(single, capsys):
    d = single["dir"]
    b = load_model(d / "plain.safetensors", config=str(single["cfg"]))
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line == b.detected == (
        "model: SD1.x single file plain.safetensors (float32 weights, loaded as float32); prediction: epsilon "
        "(the SD1.x default; the file has no `v_pred` key); VAE: in the file; tokenizer: the shipped CLIP "
        "tokenizer (configs/clip_tokenizer)")
    assert b.tokenizers[0]("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    for ours, theirs in ((b.unet, single["unet"]), (b.text_encoders[0], single["te"]), (b.vae, single["vae"])):
        a, r = ours.state_dict(), theirs.state_dict()
        assert set(a) == set(r) and all(torch.equal(a[k].reshape(r[k].shape), r[k]) for k in r)  # the LDM round trip


def test_v_pred_key_and_fp16_file_and_the_flag(single):
    d = single["dir"]
    b = load_model(d / "vpred16.safetensors", config=str(single["cfg"]), log=False)
    assert b.prediction_type == "v_prediction" == b.scheduler.config.prediction_type
    assert "(float16 weights, loaded as float32); prediction: v_prediction (the file's `v_pred` key" in b.detected
    assert b.dtype == torch.float32
    b = load_model(d / "vpred16.safetensors", config=str(single["cfg"]), prediction_type="epsilon", log=False)
    assert b.prediction_type == "epsilon" and "prediction: epsilon (--prediction-type)" in b.detected
    b = load_model(d / "plain.safetensors", config=str(single["cfg"]), prediction_type="v_prediction", log=False)
    assert b.prediction_type == "v_prediction"
    with pytest.raises(ValueError, match="prediction type 'v'"):
        load_model(d / "plain.safetensors", prediction_type="v")


def test_file_without_vae_is_refused_and_takes_vae(single, tmp_path):
    from safetensors.torch import save_file

    from npo_suite.testing.tiny_models import ldm_state_dict

    d, cfg = single["dir"], str(single["cfg"])
    with pytest.raises(ValueError, match=r"holds no VAE .*pass --vae PATH"):
        load_model(d / "novae.safetensors", config=cfg)
    b = load_model(d / "novae.safetensors", config=cfg, vae=d / "vae_folder", log=False)
    assert "VAE: " + str(d / "vae_folder") in b.detected
    ldm = {k[len("first_stage_model."):]: v for k, v in ldm_state_dict(single["unet"], single["te"], single["vae"]).items()
           if k.startswith("first_stage_model.")}  # a stand-alone VAE file in LDM names (as vae-ft-mse-*.safetensors)
    save_file(ldm, str(tmp_path / "vae.safetensors"))
    b = load_model(d / "novae.safetensors", config=cfg, vae=tmp_path / "vae.safetensors", log=False)
    ref = single["vae"].state_dict()
    assert all(torch.equal(b.vae.state_dict()[k], v) for k, v in ref.items())
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(d / "novae.safetensors", config=cfg, vae=tmp_path / "nope")


def test_tokenizer_flag_overrides_and_a_tokenizer_the_encoder_cannot_read_is_refused(single, sd15_dir, tmp_path):
    """--tokenizer wins over the shipped one. A tokenizer with more tokens than the encoder's vocabulary is
    refused at load time (its ids would index past the embedding table later)."""
    from npo_suite.testing.tiny_models import build_sd15_single_file

    d = single["dir"]
    b = load_model(d / "plain.safetensors", config=str(single["cfg"]), tokenizer=sd15_dir / "tokenizer", log=False)
    assert f"tokenizer: {sd15_dir / 'tokenizer'}" in b.detected and len(b.tokenizers[0]) < 1000
    build_sd15_single_file(tmp_path / "small.safetensors", tmp_path / "cfg", vocab_size=1000)
    with pytest.raises(ValueError, match=r"has 49408 tokens but the text encoder knows 1000; pass --tokenizer"):
        load_model(tmp_path / "small.safetensors", config=str(tmp_path / "cfg"))


@pytest.mark.slow
def test_train_and_generate_from_a_single_file_and_nothing_else(single, tmp_path, monkeypatch, capsys):
    """The README's commands on a single .safetensors, no tokenizer flag: both run and print the detection line."""
    from npo_suite.cli import main
    from npo_suite.families import loading

    from .train_fixtures import make_pairs

    configs = tmp_path / "configs"
    shutil.copytree(single["cfg"], configs / "sd15")  # the tiny stand-in of the shipped configs/sd15
    monkeypatch.setattr(loading, "CONFIG_DIR", configs)
    model = str(single["dir"] / "plain.safetensors")
    pairs = make_pairs(tmp_path / "pairs", n=4)
    rc = main(["train", "--model", model, "--data-path", str(pairs), "--method", "dpo", "--steps", "2",
               "--resolution", "16", "--lora-rank", "2", "--lora-alpha", "2", "--lr", "1e-3", "--checkpoint-every", "0",
               "--output-dir", str(tmp_path / "run"), "--cpu"])
    err = capsys.readouterr()
    assert rc == 0, err.err
    assert "model: SD1.x single file plain.safetensors" in err.err and "finished step 2/2" in err.out
    rc = main(["generate", model, "--prompt", "a photo of a cat", "--steps", "2", "--modes", "cfg", "npo",
               "--neg-offset", str(tmp_path / "run" / "dpo_lora.safetensors"), "--out", str(tmp_path / "gen")])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "tokenizer: the shipped CLIP tokenizer" in err
    manifest = json.loads((tmp_path / "gen" / "manifest.json").read_text())
    assert manifest["detected"].startswith("model: SD1.x single file") and len(manifest["images"]) == 2


# ------------------------------------------------------------------------------------------ the world's DDSPO data
def test_ddspo_prepare_on_the_shipped_world(tmp_path, capsys):
    """`ddspo-prepare --model world/assets/digits_world --rewriter world_digits` died with "module diffusers has
    no attribute NPOSuiteDigitsWorld": the reference model now loads through families.loading (the world's
    plug-in family)."""
    from safetensors import safe_open

    from npo_suite.cli import main
    from npo_suite.core.ddspo_format import read_manifest

    prompts = tmp_path / "p.txt"
    prompts.write_text("a handwritten seven\na thin handwritten two\na bold handwritten five\n", encoding="utf-8")
    out = tmp_path / "ddspo"
    rc = main(["ddspo-prepare", "--model", str(ROOT / "world" / "assets" / "digits_world"), "--prompts", str(prompts),
               "--out", str(out), "--losers", "generate", "--rewriter", "world_digits", "--limit", "2", "--steps", "2",
               "--device", "cpu"])
    err = capsys.readouterr()
    assert rc == 0, err.err
    assert "model: digits world diffusers folder digits_world" in err.err
    rows = read_manifest(out)  # a --limit run leaves its chunks as parts (resumable); the reader reads both
    assert len(rows) == 2 and all(r["neg_prompt"] != r["prompt"] for r in rows)
    with safe_open(str(out / rows[0]["files"]["latents"]), "pt") as f:
        w, l = f.get_tensor("latents_w"), f.get_tensor("latents_l")
    assert w.shape == l.shape == (1, 8, 8) and torch.isfinite(w).all() and not torch.equal(w, l)


def test_offsets_inspect_takes_an_ldm_single_file_base(single, tmp_path, capsys):
    """`offsets inspect --base file.safetensors` with a checkpoint in LDM names (model.diffusion_model.*)."""
    from npo_suite.cli import main
    from npo_suite.core.offsets import save_offset
    from npo_suite.core.offsets.types import LowRankDelta, Offset

    unet = single["unet"]
    g = torch.Generator().manual_seed(0)
    deltas = {n: LowRankDelta(torch.randn(2, m.in_features, generator=g), torch.randn(m.out_features, 2, generator=g),
                              scale=1.0)
              for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear) and n.endswith(("to_q", "to_v"))}
    lora = tmp_path / "lora.safetensors"
    save_offset(Offset(unet=deltas), lora, base=unet)
    assert main(["offsets", "inspect", str(lora), "--base", str(single["dir"] / "plain.safetensors")]) == 0, \
        capsys.readouterr().err
    out = capsys.readouterr().out
    assert "not found" not in out and "not checked" not in out, out
