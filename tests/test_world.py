"""The embedded digits world: quick build (layout, SD interfaces, manifest), prompts, splits, the
generator-independent rewards, preference pairs (JSONL format) and the shipped world's base model."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from npo_suite.world import build as wb
from npo_suite.world.reward import DigitsReward


@pytest.fixture(scope="module")
def quick_world(tmp_path_factory):
    """A world built with 3 training steps: right layout and interfaces, meaningless weights."""
    return wb.build_world(tmp_path_factory.mktemp("qw") / "world", wb.WorldConfig(steps=3, batch_size=8),
                          diagnose_samples=4, log=None, command="test")


@pytest.fixture(scope="module")
def reward_assets(tmp_path_factory):
    d = tmp_path_factory.mktemp("rw")
    rm, splits = wb.write_reward_assets(d, seed=0)
    return d, rm, splits


def test_quick_build_layout_and_sd_interfaces(quick_world):
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    d = quick_world
    for sub in ("unet", "text_encoder", "tokenizer", "scheduler", "reward"):
        assert (d / sub).is_dir(), sub
    assert not (d / "vae").exists()
    assert not list(d.parent.glob(f".{d.name}.tmp-*"))  # atomic build leaves no temp folder
    index = json.loads((d / "model_index.json").read_text())
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"] and "vae" not in index
    m = json.loads((d / "world.json").read_text())
    assert m["format"] == wb.WORLD_FORMAT and m["command"] == "test"
    assert m["versions"]["sklearn"] and m["config"]["steps"] == 3 and m["diagnostics"]["n"] == 4
    w = wb.load_world(d)
    assert isinstance(w.unet, UNet2DConditionModel) and isinstance(w.text_encoder, CLIPTextModel)
    assert isinstance(w.tokenizer, CLIPTokenizer) and isinstance(w.scheduler, DDPMScheduler)
    assert w.unet.config.in_channels == 1 and w.unet.config.sample_size == 8
    assert len(w.scheduler.alphas_cumprod) == 1000
    # SD1.x/SDXL's schedule (world v2): scaled_linear 0.00085..0.012, eps-prediction
    sc = w.scheduler.config
    assert (sc.beta_schedule, sc.beta_start, sc.beta_end, sc.prediction_type) == ("scaled_linear", 0.00085, 0.012, "epsilon")
    abar = w.scheduler.alphas_cumprod.double()
    snr_inv = (1 - abar) / abar  # SD's (1 - abar)/abar: 2.6 at t = 500, 70 at t = 900, 214 at t = 999
    assert snr_inv[500].item() == pytest.approx(2.6, abs=0.1) and snr_inv[999].item() == pytest.approx(214, rel=0.01)
    assert m["scheduler"]["beta_schedule"] == "scaled_linear" and m["generic_prompt"] == wb.GENERIC_PROMPT
    # one BPE token per world word: bos + 4 words + eos
    ids = w.tokenizer("a thin handwritten seven").input_ids
    assert len(ids) == 6
    h = w.encode(["a handwritten seven", ""])
    assert h.shape == (2, w.tokenizer.model_max_length, w.unet.config.cross_attention_dim)
    assert not torch.allclose(h[0], h[1])
    out = w.unet(torch.randn(2, 1, 8, 8), torch.tensor([10, 500]), h).sample
    assert out.shape == (2, 1, 8, 8)


def test_project_loader_reads_the_world(quick_world):
    from npo_suite.families import loading
    from npo_suite.world.plugin import register

    register()
    b = loading.load_model(str(quick_world))
    assert b.family == "world" and b.vae is None and b.prediction_type == "epsilon"


def test_check_world_dir_errors(tmp_path, quick_world):
    with pytest.raises(FileNotFoundError, match="world build"):
        wb.check_world_dir(tmp_path / "none")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "world.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="missing model_index.json"):
        wb.check_world_dir(tmp_path / "half")


def test_world_cli_info_and_errors(quick_world, tmp_path, capsys):
    from npo_suite.cli import main

    assert main(["world", "info", "--path", str(quick_world), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["format"] == wb.WORLD_FORMAT
    assert main(["world", "info", "--path", str(tmp_path / "nope")]) == 1
    assert main(["world", "build", "--out", str(quick_world)]) == 0  # already built: no rebuild without --force
    assert "already built" in capsys.readouterr().out
    assert main(["world", "build", "--out", str(tmp_path / "x"), "--cfg-dropout", "1.5"]) == 2


def test_world_config_generic_prompt_bounds():
    assert wb.WorldConfig(generic_prob=0.0).generic_prob == 0.0
    with pytest.raises(ValueError, match="generic_prob"):
        wb.WorldConfig(cfg_dropout=0.5, generic_prob=0.5)
    assert wb.parse_prompt(wb.GENERIC_PROMPT) == (None, None)  # the class-free prompt names no class


def test_prompts_roundtrip():
    assert wb.prompt_for(7) == "a handwritten seven"
    assert wb.prompt_for(1, "thin") == "a thin handwritten one"
    assert wb.parse_prompt("a thick handwritten eight") == (8, "thick")
    assert wb.parse_prompt("a photo of a cat") == (None, None)
    assert wb.parse_prompt("one or two") == (None, None)
    assert len(set(wb.all_prompts())) == 30


def test_splits_are_disjoint_and_stratified(reward_assets):
    _, _, s = reward_assets
    idx = [set(s[k].indices.tolist()) for k in wb.SPLITS]
    assert not (idx[0] & idx[1]) and not (idx[0] & idx[2]) and not (idx[1] & idx[2])
    assert sum(map(len, idx)) == 1797
    for k in wb.SPLITS:
        counts = np.bincount(s[k].labels, minlength=10)
        assert counts.min() >= 0.8 * counts.mean()
    styles = s["gen"].styles
    assert 0.25 < styles.count("thin") / len(styles) < 0.4 and 0.25 < styles.count("thick") / len(styles) < 0.4


def test_reward_classifier_is_accurate_on_held_out_real_digits(reward_assets):
    """State it: the classifier (fitted on reward_train only) gets >= 93% on digits it never saw
    (measured 94.8% on reward_test, 95.1% on the generator's split with sklearn 1.9)."""
    d, rm, s = reward_assets
    assert rm.accuracy(s["reward_test"].pixels01(), s["reward_test"].labels) >= 0.93
    assert rm.accuracy(s["gen"].pixels01(), s["gen"].labels) >= 0.93
    r = rm.reward(s["gen"].pixels01(), s["gen"].labels)
    assert r.mean() > 0.8
    loaded = DigitsReward.for_world(d)  # safetensors round trip, same numbers
    np.testing.assert_allclose(loaded.reward(s["gen"].pixels01(), s["gen"].labels), r, rtol=1e-5, atol=1e-6)


def test_realism_separates_real_digits_from_junk(reward_assets):
    _, rm, s = reward_assets
    real = rm.realism(s["reward_test"].pixels01())
    rng = np.random.default_rng(0)
    noise = rm.realism(rng.uniform(size=(50, 64)))
    blank, full = rm.realism(np.zeros((1, 64))), rm.realism(np.ones((1, 64)))
    assert -1.3 < np.median(real) < -0.7
    assert noise.max() < real.min() or np.median(noise) < 2 * np.median(real)
    assert blank[0] < np.quantile(real, 0.05) and full[0] < np.quantile(real, 0.05)
    # contrast alone does not help: binarised noise is still far from the digits
    assert np.median(rm.realism((rng.uniform(size=(50, 64)) > 0.5).astype(float))) < 2 * np.median(real)


def test_reward_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="reward model missing"):
        DigitsReward.for_world(tmp_path)
    with pytest.raises(ValueError, match="8x8"):
        DigitsReward(np.zeros((10, 64)), np.zeros(10), np.zeros((5, 64)), 1.0).probs(np.zeros((1, 16)))


def test_pairs_jsonl_format(tmp_path, reward_assets):
    from npo_suite.world.pairs import make_pairs, read_pairs

    _, rm, s = reward_assets
    real = torch.from_numpy(s["reward_test"].images / 16.0).float()  # [N, 8, 8] in [0, 1]
    by_class = {c: real[torch.from_numpy(s["reward_test"].labels == c)] for c in range(10)}

    def fake_sampler(prompts, seeds):
        """Even seeds: a real digit of the prompted class; odd seeds: the same digit (-> tie) for prompt
        index 0 and uniform noise otherwise."""
        out = []
        for p, sd in zip(prompts, seeds):
            c = wb.parse_prompt(p)[0]
            digit = by_class[c][sd // 2 % len(by_class[c])]
            tie = p == prompts_used[0]
            out.append(digit if sd % 2 == 0 or tie else torch.rand(8, 8, generator=torch.Generator().manual_seed(sd)))
        return torch.stack(out)

    prompts_used = ["a handwritten three", "a thick handwritten seven", "a handwritten zero"]
    st = make_pairs(fake_sampler, rm, tmp_path / "pairs", prompts=prompts_used, samples_per_prompt=4, tie_margin=0.05,
                    seed_offset=0)
    assert st.samples == 12 and st.dropped_ties == 2 and st.pairs == 4
    lines = (tmp_path / "pairs" / "pairs.jsonl").read_text().splitlines()
    assert len(lines) == 4
    for rec in read_pairs(st.path):
        assert set(rec) >= {"prompt", "chosen", "rejected"}
        assert not rec["chosen"].startswith("/") and rec["chosen_path"].is_file() and rec["rejected_path"].is_file()
        with Image.open(rec["chosen_path"]) as im:
            assert im.size == (8, 8) and im.mode == "L"
        assert rec["reward_chosen"] > rec["reward_rejected"] + 0.05
        assert rec["seed_chosen"] % 2 == 0  # the real digit wins against noise
    with pytest.raises(ValueError, match="even"):
        make_pairs(fake_sampler, rm, tmp_path / "p2", samples_per_prompt=3)
    with pytest.raises(ValueError, match="names no digit"):
        make_pairs(fake_sampler, rm, tmp_path / "p3", prompts=["a cat"], samples_per_prompt=2)
    from npo_suite.trainer.data import pairs as pairs_mod  # the trainer's own JSONL reader
    recs = list(pairs_mod.open_pairs(str(st.path), verbose=False))
    assert len(recs) == 4 and recs[0].prompt == json.loads(lines[0])["prompt"]


def test_shipped_world_base_model_is_clearly_imperfect():
    """The shipped base model, sampled with the project's sampler (plain CFG), scores clearly below
    real held-out digits under the reward: preference methods have something to improve."""
    assert (wb.PACKAGE_WORLD_DIR / "world.json").is_file(), "the shipped world is missing (world/assets/digits_world)"
    from npo_suite.diffusers_host import generate as gen
    from npo_suite.families.loading import load_model
    from npo_suite.world.plugin import register

    register()

    d = wb.PACKAGE_WORLD_DIR
    rm = DigitsReward.for_world(d)
    real = wb.load_world_splits(d)["reward_test"]
    real_acc = rm.accuracy(real.pixels01(), real.labels)
    bundle = load_model(str(d))
    prompts = [p for p in wb.all_prompts() for _ in range(2)]  # 30 prompts x 2 seeds
    res = gen.sample(bundle, prompts, list(range(60)), "cfg", cfg_scale=3.0, steps=20)
    px = res.images.float().mean(1).reshape(60, -1).numpy()
    labels = [wb.parse_prompt(p)[0] for p in prompts]
    acc = rm.accuracy(px, labels)
    # world v2, measured at build time on 300 samples: accuracy 0.80, reward 0.74, realism -1.17
    # (real: 0.95, 0.83, -1.03) (docs/world.md)
    assert acc < real_acc - 0.1, (acc, real_acc)
    assert acc > 0.3  # but it does draw digits: the prompt matters
    assert rm.reward(px, labels).mean() < rm.reward(real.pixels01(), real.labels).mean() - 0.05
    assert rm.realism(px).mean() < rm.realism(real.pixels01()).mean() - 0.1


class _Recorder(torch.nn.Module):
    """Wraps a UNet: records the (x_t, t) it is called with and the output it returns."""

    def __init__(self, unet):
        super().__init__()
        self.unet, self.calls = unet, []

    def forward(self, x_t, t, hidden):
        out = self.unet(x_t, t, hidden)
        self.calls.append((x_t.detach().clone(), t.clone(), out.sample.detach().clone()))
        return out


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_world_unet_objective_by_prediction_type(prediction_type):
    """_train_unet's first loss = mse(UNet(x_t, t), target) with target ε (world v2) or, for the v-prediction
    experiment world, v = sqrt(abar)·ε − sqrt(1 − abar)·x0. Every row shows the same image x, so ε is read
    back from the recorded x_t: ε = (x_t − sqrt(abar)·x)/sqrt(1 − abar). lr 0: the recorded output is the
    one the loss saw. float32 throughout, ε recovered to ~1e-6 relative: 1e-4 on a loss of order 1."""
    from diffusers import UNet2DConditionModel

    cfg = wb.WorldConfig(steps=1, batch_size=4, lr=0.0, prediction_type=prediction_type)
    sched = wb.make_scheduler("eps", prediction_type)
    assert sched.config.prediction_type == prediction_type
    abar = torch.as_tensor(sched.alphas_cumprod, dtype=torch.float64)
    torch.manual_seed(0)
    unet = _Recorder(UNet2DConditionModel(**wb.unet_config_world(cfg)))
    x = torch.rand(1, 1, 8, 8) * 2 - 1
    cond_table = torch.randn(3, 4, cfg.text_hidden)
    prompt_ids = torch.tensor([[1, 1, 2], [1, 1, 2]])
    loss, _ = wb._train_unet(unet, cond_table, prompt_ids, x.repeat(2, 1, 1, 1), cfg, abar, None,
                             torch.Generator().manual_seed(0))
    (x_t, t, out), = unet.calls
    a = abar[t].float().view(-1, 1, 1, 1)
    eps = (x_t - a.sqrt() * x) / (1 - a).sqrt()
    target = a.sqrt() * eps - (1 - a).sqrt() * x if prediction_type == "v_prediction" else eps
    assert loss == pytest.approx(torch.nn.functional.mse_loss(out, target).item(), rel=1e-4)
    other = eps if prediction_type == "v_prediction" else a.sqrt() * eps - (1 - a).sqrt() * x
    assert abs(loss - torch.nn.functional.mse_loss(out, other).item()) > 1e-3  # the two targets differ here
    with pytest.raises(ValueError, match="prediction_type"):
        wb.WorldConfig(kind="flow", prediction_type="v_prediction")
