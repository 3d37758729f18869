"""generate: CLI smoke (3 modes, manifest, grid), reproducibility, fast path == two-model path
through the sampling loop, pixel-space models, model loading and bad input."""
from __future__ import annotations

import argparse
import json
import shutil

import pytest
import torch

from npo_suite.diffusers_host import generate
from npo_suite.families.base import CONFIG_DIR
from npo_suite.families.loading import load_model
from npo_suite.core.offsets.types import LowRankDelta, Offset
from npo_suite.core.offsets import save_offset


def _lora(unet, rank: int, seed: int, std: float = 0.1) -> Offset:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for n, m in unet.named_modules():
        if isinstance(m, torch.nn.Linear) and n.endswith(("to_q", "to_k", "to_v", "to_out.0", "ff.net.2")):
            out[n] = LowRankDelta(torch.randn(rank, m.in_features, generator=g) * std,
                                  torch.randn(m.out_features, rank, generator=g) * std, scale=1.0)
        elif isinstance(m, torch.nn.Conv2d) and n.endswith("conv2"):
            out[n] = LowRankDelta(torch.randn(rank, m.in_channels, 3, 3, generator=g) * std,
                                  torch.randn(m.out_channels, rank, 1, 1, generator=g) * std, scale=1.0)
    return Offset(unet=out)


def _parse(argv):
    from npo_suite.cli import generate as cli

    p = argparse.ArgumentParser()
    cli.add_arguments(p)
    return p.parse_args(argv)


def _read_prompts(args):
    return generate.read_prompts(args.prompt, args.prompts, args.negative_prompt, args.seeds)


@pytest.fixture(scope="module")
def loras(sd15_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("loras")
    b = load_model(sd15_dir)
    eta = save_offset(_lora(b.unet, 2, 1), d / "eta.safetensors", base={"unet": b.unet})
    delta = save_offset(_lora(b.unet, 2, 2, std=0.3), d / "delta.safetensors", base={"unet": b.unet})
    return eta, delta


def test_cli_smoke(sd15_dir, loras, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a photo of a dog", "negative_prompt": "ugly", "seed": 7}\n\n', encoding="utf-8")
    out = tmp_path / "out"
    args = _parse([str(sd15_dir), "--prompt", "a photo of a cat", "--prompts", str(prompts), "--seeds", "0", "1",
                   "--modes", "cfg", "npo", "snpo", "--pos-offset", str(loras[0]), "--neg-offset", str(loras[1]),
                   "--alpha", "0.5", "--beta", "1", "--steps", "2", "--scheduler", "ddim", "--cfg", "5",
                   "--negative-prompt", "blurry", "--out", str(out), "--device", "cpu", "--batch-size", "3"])
    from npo_suite.cli import generate as cli

    assert cli.main(args) == 0
    man = json.loads((out / "manifest.json").read_text())
    assert len(man["images"]) == 3 * 3  # (cat x 2 seeds + dog x 1 seed) x 3 modes
    assert man["alpha"] == 0.5 and man["scheduler"] == "ddim" and man["modes"] == ["cfg", "npo", "snpo"]
    assert len(man["model_hash"]) == 64 and "kohya" in man["offsets"]["neg"]["report"]
    assert {r["seed"] for r in man["images"] if r["prompt"] == "a photo of a dog"} == {7}
    assert all((out / r["file"]).exists() for r in man["images"])
    from PIL import Image

    grid = Image.open(out / "grid.png")
    w, h = Image.open(out / man["images"][0]["file"]).size
    assert grid.size == (3 * (w + 2) + 2, 3 * (h + 2) + 2)  # rows: prompt x seed, columns: modes
    im = {(r["prompt"], r["seed"], r["mode"]): torch.tensor(list(Image.open(out / r["file"]).getdata())).float()
          for r in man["images"]}
    key = ("a photo of a cat", 0)
    assert not torch.equal(im[key + ("npo",)], im[key + ("cfg",)])


def test_sample_reproducible_and_modes_share_noise(sd15_dir):
    b = load_model(sd15_dir)
    off = generate.Offsets(pos=None, neg=_lora(b.unet, 2, 3, std=0.3), beta=1.0)
    kw = dict(offsets=off, steps=2, scheduler="euler", decode=False, cfg_scale=4.0)
    a = generate.sample(b, ["a cat", "a dog"], [0, 1], "npo", **kw).latents
    again = generate.sample(b, ["a cat", "a dog"], [0, 1], "npo", **kw).latents
    assert torch.equal(a, again)
    c = generate.sample(b, ["a cat", "a dog"], [0, 1], "cfg", **kw).latents
    assert (a - c).abs().max() > 1e-3
    # beta = 0 and no eta: NPO is plain CFG exactly
    zero = generate.Offsets(neg=off.delta, beta=0.0)
    assert torch.allclose(generate.sample(b, ["a cat", "a dog"], [0, 1], "npo", **{**kw, "offsets": zero}).latents, c)
    # the sigma interval [sigma_min, inf) above every sigma: NPO == CFG
    assert torch.equal(generate.sample(b, ["a cat", "a dog"], [0, 1], "npo", sigma_min=1e6, **kw).latents, c)


@pytest.mark.parametrize("family", ["sd15_dir", "sdxl_dir"])
def test_fast_path_equals_two_model_in_the_loop(family, request):
    b = load_model(request.getfixturevalue(family))
    off = generate.Offsets(pos=_lora(b.unet, 2, 4), neg=_lora(b.unet, 3, 5, std=0.3), alpha=0.4, beta=0.9)
    kw = dict(offsets=off, steps=2, scheduler="dpmpp", decode=False, cfg_scale=5.0, sigma_max=3.0,
              negative_prompts=["blurry", ""], rescale=0.5)
    fast = generate.sample(b, ["a red car", "a tree"], [3, 4], "npo", **kw).latents
    slow = generate.sample(b, ["a red car", "a tree"], [3, 4], "npo", npo_path="two-model", **kw).latents
    assert float((fast - slow).abs().max() / slow.abs().max()) < 1e-4


def test_pixel_space_world(sd15_dir, tmp_path):
    from diffusers import UNet2DConditionModel

    from npo_suite.testing.tiny_models import unet_config_sd15
    from npo_suite.world.plugin import register

    register()  # the pixel-space family is the world's plug-in
    d = tmp_path / "world"
    for sub in ("text_encoder", "tokenizer", "scheduler"):
        shutil.copytree(sd15_dir / sub, d / sub)
    UNet2DConditionModel(**unet_config_sd15(in_channels=1)).save_pretrained(d / "unet")
    b = load_model(d)
    assert b.family == "world" and b.vae is None and b.latent_scale == 1
    res = generate.sample(b, ["a handwritten seven"], [0], "snpo", steps=2)
    assert res.images.shape == (1, 1, 8, 8) and 0 <= res.images.min() and res.images.max() <= 1
    assert generate.to_pil(res.images[0]).mode == "L"
    with pytest.raises(ValueError, match="looks like a 'world' model"):
        load_model(d, family="sd1")


def test_loading_errors(sd15_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "nope")
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"not really")
    with pytest.raises(ValueError, match="pickle"):
        load_model(ckpt)
    fake = tmp_path / "model.safetensors"
    from safetensors.torch import save_file

    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)}, str(fake))
    with pytest.raises(ValueError, match="without text-encoder weights"):
        load_model(fake)  # no tokenizer needed any more (the shipped one): the file is what is wrong
    with pytest.raises(ValueError, match="without text-encoder weights"):
        load_model(fake, tokenizer=sd15_dir / "tokenizer")
    with pytest.raises(FileNotFoundError, match="vocab.json"):
        load_model(fake, family="sd1", tokenizer=tmp_path)
    with pytest.raises(ValueError, match="holds no VAE"):
        load_model(fake, family="sd1")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="missing unet/"):
        load_model(tmp_path / "empty")
    with pytest.raises(ValueError, match="unknown family"):
        load_model(sd15_dir, family="auraflow")
    with pytest.raises(ValueError, match="looks like a 'sd1' model but family='sd3' was requested"):
        load_model(sd15_dir, family="sd3")


def test_prompts_jsonl_negative_prompt_and_its_alias(sd15_dir, tmp_path, capsys):
    """Issue 13: the trainer's `neg_prompt` spelling is read by generate too (one reader, docs/data.md)."""
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "a", "negative_prompt": "x"}\n{"prompt": "b", "neg_prompt": "y"}\n{"prompt": "c"}\n',
                 encoding="utf-8")
    items = _read_prompts(_parse([str(sd15_dir), "--prompts", str(f), "--negative-prompt", "z", "--out", "o"]))
    assert [it["negative_prompt"] for it in items] == ["x", "y", "z"]
    f.write_text('{"prompt": "a", "negative_prompt": "x", "neg_prompt": "y"}\n{"prompt": "b"}\n', encoding="utf-8")
    items = _read_prompts(_parse([str(sd15_dir), "--prompts", str(f), "--out", "o"]))
    assert [it["prompt"] for it in items] == ["b"]  # the line with two different negatives: skipped, counted
    assert "bad_row: 1 (e.g. p.jsonl:1: both negative_prompt and neg_prompt" in capsys.readouterr().err


def test_one_prompts_reader_for_training_and_generation(sd15_dir, tmp_path, capsys):
    """Issue 21: the same file trains and generates: prompt/caption/text keys, bad and blank lines skipped and
    counted the same way by the trainer's PromptsFile and by generate --prompts (core/prompts.py)."""
    from npo_suite.trainer.data.prompts import PromptsFile

    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "a cat", "seed": 7}\n{"caption": "a dog"}\nnot json\n\n{"text": "a fox", "neg_prompt": "x"}\n'
                 '["a list"]\n{"prompt": "  "}\n{"text": "a cow"', encoding="utf-8")
    src = PromptsFile(f)
    trained = list(src)
    train_report = capsys.readouterr().err
    items = _read_prompts(_parse([str(sd15_dir), "--prompts", str(f), "--seeds", "1", "2", "--out", "o"]))
    assert [r.prompt for r in trained] == [it["prompt"] for it in items] == ["a cat", "a dog", "a fox"]
    assert [r.neg_prompt for r in trained] == [None, None, "x"] and [it["negative_prompt"] for it in items] == ["", "", "x"]
    assert [it["seeds"] for it in items] == [[7], [1, 2], [1, 2]]
    assert dict(src.summary.skipped) == {"bad_row": 2, "empty_prompt": 1, "torn_line": 1}
    assert capsys.readouterr().err == train_report  # the same counted skips, the same report


def test_bad_cli_input(sd15_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        _read_prompts(_parse([str(sd15_dir), "--prompts", str(tmp_path / "none.jsonl"), "--out", str(tmp_path)]))
    with pytest.raises(ValueError, match="no prompts"):
        _read_prompts(_parse([str(sd15_dir), "--out", str(tmp_path)]))
    b = load_model(sd15_dir)
    with pytest.raises(ValueError, match="one seed per prompt"):
        generate.sample(b, ["a", "b"], [0], "cfg")
    with pytest.raises(ValueError, match="unknown scheduler"):
        generate.sample(b, ["a"], [0], "cfg", scheduler="lms")
    with pytest.raises(ValueError, match="unknown mode"):
        generate.sample(b, ["a"], [0], "pag")


def test_shipped_configs_are_sd15_and_sdxl():
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    expected = {"sd15": 859_520_964, "sdxl": 2_567_463_684}
    for fam, n in expected.items():
        with init_empty_weights():
            unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(str(CONFIG_DIR / fam / "unet")))
        assert sum(p.numel() for p in unet.parameters()) == n
        assert (CONFIG_DIR / fam / "model_index.json").exists()
