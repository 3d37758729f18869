"""evaluation/: bootstrap statistics (golden behaviour), scorers (local-path errors, CLIP score on a
tiny random CLIPModel), runs/manifests and the `evaluate` CLI on a tiny manifest."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from npo_suite.core import stats
from npo_suite.evaluation.scorers import available_scorers, make_scorer


# ----------------------------------------------------------------------------- stats

def test_all_wins_gives_ci_one_one():
    a, b = np.zeros(50), np.ones(50)
    st = stats.paired_compare(a, b, n_boot=500, seed=0)
    assert st.win_rate == 1.0 and (st.ci_low, st.ci_high) == (1.0, 1.0)
    assert st.mean_diff == 1.0 and (st.diff_ci_low, st.diff_ci_high) == (1.0, 1.0)


def test_all_losses_and_all_ties():
    st = stats.paired_compare(np.ones(20), np.zeros(20), n_boot=200)
    assert (st.win_rate, st.ci_low, st.ci_high) == (0.0, 0.0, 0.0)
    st = stats.paired_compare(np.ones(20), np.ones(20), n_boot=200)
    assert (st.win_rate, st.ci_low, st.ci_high, st.ties) == (0.5, 0.5, 0.5, 20)


def test_symmetric_case_is_about_half_and_ci_covers_it():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=400), rng.normal(size=400)
    st = stats.paired_compare(a, b, n_boot=2000, seed=3)
    assert abs(st.win_rate - 0.5) < 0.06
    assert st.ci_low < 0.5 < st.ci_high
    # 95% interval of a proportion with n=400 is about +-0.049 wide on each side
    assert 0.07 < st.ci_high - st.ci_low < 0.13
    assert st.diff_ci_low < 0 < st.diff_ci_high


def test_bootstrap_is_seeded_and_seed_matters():
    v = np.random.default_rng(0).normal(size=100)
    assert stats.bootstrap_ci(v, seed=5, n_boot=300) == stats.bootstrap_ci(v, seed=5, n_boot=300)
    assert stats.bootstrap_ci(v, seed=5, n_boot=300) != stats.bootstrap_ci(v, seed=6, n_boot=300)


def test_win_scores_hand_values_and_right_to_wrong():
    assert stats.win_scores([0, 1, 2], [1, 1, 1]).tolist() == [1.0, 0.5, 0.0]
    assert stats.right_to_wrong([1, 1, 0, 0], [1, 0, 1, 0]) == 1


def test_paired_compare_rejects_bad_input():
    with pytest.raises(ValueError, match="same length"):
        stats.paired_compare([1, 2], [1])
    with pytest.raises(ValueError, match="NaN"):
        stats.paired_compare([1, np.nan], [1, 2])
    with pytest.raises(ValueError, match="no pairs"):
        stats.paired_compare([], [])


def test_table_and_plot(tmp_path):
    st = stats.paired_compare(np.zeros(10), np.arange(10) / 10, n_boot=100)
    md = stats.markdown_table([{"name": "x", **st.as_dict()}], [("name", "run"), ("win_rate", "win")])
    assert md.splitlines()[0] == "| run | win |" and "| x | 0.950 |" in md
    p = stats.plot_comparison({"x": st}, tmp_path / "p.png")
    with Image.open(p) as im:
        assert im.size[0] > 100


# ----------------------------------------------------------------------------- scorers

@pytest.mark.parametrize("name", ["clip_score", "pickscore", "hpsv2", "image_reward", "laion_aesthetic"])
def test_external_scorers_need_a_local_path(name, tmp_path):
    with pytest.raises(ValueError, match="nothing is downloaded"):
        make_scorer(name)
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="not found"):
        make_scorer(name, model_path=str(missing), head_path=str(missing), med_config=str(missing))


def test_unknown_scorer_lists_registry():
    with pytest.raises(ValueError, match="world_reward"):
        make_scorer("nope")


def test_pickle_head_refused_without_allow_pickle(tmp_path):
    from npo_suite.evaluation.scorers import load_state

    f = tmp_path / "head.pth"
    torch.save({"w": torch.zeros(1)}, f)
    with pytest.raises(ValueError, match="pickle"):
        load_state(f, False, "laion_aesthetic")
    assert load_state(f, True, "laion_aesthetic")["w"].shape == (1,)


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    from npo_suite.testing.tiny_models import build_tiny_clip

    d = tmp_path_factory.mktemp("tiny_clip")
    build_tiny_clip(d / "model", d / "tok")
    return d / "model"


def test_clip_score_on_tiny_random_clip(tiny_clip_dir):
    from transformers import CLIPModel

    sc = make_scorer("clip_score", model_path=str(tiny_clip_dir))
    rng = np.random.default_rng(0)
    ims = [Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8), mode="L") for _ in range(3)]
    prompts = ["a handwritten seven", "a thin handwritten one", "a photo of a cat"]
    s = sc.score(ims, prompts)
    assert s.shape == (3,) and np.isfinite(s).all() and (s >= 0).all() and (s <= 100).all()
    # hand check of the first score: 100 * max(cos(image, text), 0) on the same model and processor
    m = CLIPModel.from_pretrained(str(tiny_clip_dir)).eval()
    inp = sc.processor(text=prompts[:1], images=[ims[0].convert("RGB")], return_tensors="pt", padding=True)
    with torch.no_grad():
        out = m(**inp)
    cos = torch.nn.functional.cosine_similarity(out.image_embeds, out.text_embeds).item()
    assert s[0] == pytest.approx(100 * max(cos, 0.0), rel=1e-4, abs=1e-4)
    # PickScore keeps the sign and uses the model's logit scale
    ps = make_scorer("pickscore", model_path=str(tiny_clip_dir)).score(ims[:1], prompts[:1])
    assert ps[0] == pytest.approx(m.logit_scale.exp().item() * cos, rel=1e-4, abs=1e-4)
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        sc.score(ims[:2], prompts[:1])


def test_registry_names():
    assert {"world_reward", "world_realism", "clip_score", "pickscore", "hpsv2", "image_reward", "laion_aesthetic"} <= set(available_scorers())


# ----------------------------------------------------------------------------- runs + CLI

@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    """The world's reward models and splits (all that the world_* scorers read)."""
    from npo_suite.world.build import write_reward_assets

    d = tmp_path_factory.mktemp("w")
    write_reward_assets(d, seed=0)
    return d


def _write_run(d, images, prompts, seeds, mode=None):
    d.mkdir(parents=True, exist_ok=True)
    items = []
    for i, (im, p, s) in enumerate(zip(images, prompts, seeds)):
        Image.fromarray(im, mode="L").save(d / f"{i}.png")
        items.append({"file": f"{i}.png", "prompt": p, "seed": s, **({"mode": mode} if mode else {})})
    (d / "manifest.json").write_text(json.dumps({"images": items}))
    return d


def test_read_run_modes_and_pairing(tmp_path):
    from npo_suite.evaluation.runs import pair_runs, read_run

    im = np.zeros((8, 8), np.uint8)
    d = tmp_path / "multi"
    d.mkdir()
    Image.fromarray(im, mode="L").save(d / "a.png")
    items = [{"file": "a.png", "prompt": "p", "seed": 1, "mode": m} for m in ("cfg", "npo")]
    (d / "manifest.json").write_text(json.dumps({"images": items}))
    with pytest.raises(ValueError, match="several modes"):
        read_run(d)
    assert [e.mode for e in read_run(f"{d}:npo")] == ["npo"]
    with pytest.raises(ValueError, match="modes present"):
        read_run(d, mode="snpo")
    with pytest.raises(FileNotFoundError, match="manifest"):
        read_run(tmp_path / "absent")
    other = _write_run(tmp_path / "other", [im], ["q"], [1])
    with pytest.raises(ValueError, match="share no"):
        pair_runs(read_run(d, "cfg"), read_run(other))


def test_evaluate_cli_on_tiny_manifest(tmp_path, tiny_world):
    from npo_suite.cli import main
    from npo_suite.world.build import load_world_splits

    splits = load_world_splits(tiny_world)
    real = splits["reward_test"]
    n = 12
    prompts = [f"a handwritten {w}" for w in
               [("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")[int(c)] for c in real.labels[:n]]]
    good = [np.round(x / 16 * 255).astype(np.uint8) for x in real.images[:n]]
    bad = [np.full((8, 8), 128, np.uint8) for _ in range(n)]
    run_a = _write_run(tmp_path / "a", bad, prompts, list(range(n)))
    run_b = _write_run(tmp_path / "b", good, prompts, list(range(n)))
    out = tmp_path / "cmp"
    assert main(["evaluate", "compare", str(run_a), str(run_b), "--world", str(tiny_world), "--out", str(out),
                 "--n-boot", "300", "--json"]) == 0
    res = json.loads((out / "compare.json").read_text())
    st = res["scorers"]["world_reward"]
    assert res["n"] == n and st["win_rate"] > 0.8 and st["mean_diff"] > 0
    assert "world_correct" in res["scorers"] and res["scorers"]["world_correct"]["right_to_wrong"] == 0
    assert (out / "compare.png").is_file() and "| world_reward |" in (out / "compare.md").read_text()
    js = tmp_path / "scores.json"
    assert main(["evaluate", "score", "--images", str(run_b), "--scorer", "world_reward", "world_realism",
                 "--world", str(tiny_world), "--out", str(js)]) == 0
    sc = json.loads(js.read_text())
    assert sc["n"] == n and sc["scores"]["world_reward"]["mean"] > 0.5
    assert main(["evaluate", "score", "--images", str(tmp_path / "missing"), "--world", str(tiny_world)]) == 1


def test_sweep_beta_zero_is_beta_zero(sd15_dir, tmp_path):
    """Issue 21: `evaluate sweep` rendered `beta or 1.0`, so the setting beta = 0 sampled beta = 1. With beta 0
    (and no eta) the negative model is the base itself: NPO guidance gives exactly the plain-CFG images."""
    from npo_suite.cli.evaluate import sweep_renderer, sweep_setting
    from npo_suite.core.offsets import save_offset
    from npo_suite.core.offsets.types import LowRankDelta, Offset
    from npo_suite.diffusers_host.generate import load_offsets
    from npo_suite.families.loading import load_model

    bundle = load_model(sd15_dir)
    g = torch.Generator().manual_seed(0)
    delta = {n: LowRankDelta(torch.randn(2, m.in_features, generator=g) * 0.3,
                             torch.randn(m.out_features, 2, generator=g) * 0.3, scale=1.0)
             for n, m in bundle.unet.named_modules() if isinstance(m, torch.nn.Linear) and n.endswith(("to_k", "to_v"))}
    path = save_offset(Offset(unet=delta), tmp_path / "delta.safetensors", base={"unet": bundle.unet})
    loaded, _ = load_offsets(bundle, neg=path)
    mode, off = sweep_setting(loaded, 1.0, 0.0)
    assert mode == "npo" and off.beta == 0.0 and off.delta is loaded.delta
    assert sweep_setting(loaded, None, None)[0] == "cfg"
    render = sweep_renderer(bundle, loaded, [("a photo of a cat", "", 0), ("a red cube", "", 1)],
                            cfg_scale=5.0, steps=2, scheduler="ddim", batch_size=2)
    as_arrays = lambda ims: [np.asarray(im, dtype=np.int16) for im in ims]  # noqa: E731
    base, zero, one = (as_arrays(render(a, b)) for a, b in ((None, None), (1.0, 0.0), (1.0, 1.0)))
    assert all(b.std() > 0 for b in base)  # real images, not constant ones
    assert all((z == b).all() for z, b in zip(zero, base))
    assert any(np.abs(o - b).max() > 0 for o, b in zip(one, base))  # the LoRA does act at beta 1
