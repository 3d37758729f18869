"""`python -m npo_suite world probe` on a quickly built world: the rows a negative LoRA gets, the null
branch, the --set overrides reaching the trainer, and its Markdown/JSON output."""
from __future__ import annotations

import json

import pytest

from npo_suite.cli import main
from npo_suite.world import probe as wp
from npo_suite.world.build import WorldConfig, build_world


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("pw") / "world", WorldConfig(steps=3, batch_size=8),
                       diagnose_samples=0, log=None)


def test_parse_sets():
    assert wp.parse_sets(["tdft_start=noise", "lr=1e-4", "tdft_guidance=-5", "x=true"]) == {
        "tdft_start": "noise", "lr": 1e-4, "tdft_guidance": -5, "x": True}
    with pytest.raises(ValueError, match="KEY=VALUE"):
        wp.parse_sets(["tdft_start"])


def test_probe_negative_lora_rows_null_branch_and_overrides(world, tmp_path, capsys):
    out = tmp_path / "probe"
    argv = ["--quick", "--world", str(world), "--out", str(out), "--method", "tdft", "--seeds", "0",
            "--set", "tdft_start=noise"]
    assert main(["world", "probe", *argv]) == 0
    printed = capsys.readouterr().out
    res = json.loads((out / "probe.json").read_text())
    names = [r["row"] for r in res["rows"]]
    assert names == ["negative (as world.results), strength 1", "negative, strength 0.25", "negative, strength 0.5",
                     "alone (LoRA on both branches)"]
    for r in res["rows"]:
        assert 0 <= r["ci_low"] <= r["win_rate"] <= r["ci_high"] <= 1 and 0 <= r["accuracy"] <= 1
        assert r["realism"] < 0
    assert res["null"]["base"] < 0 and res["null"]["lora"] < 0
    # where the negative LoRA acts (x0 space, prompt vs null): one row per noise level, one value per seed
    assert [r["level"] for r in res["transfer"]] == list(wp.TRANSFER_LEVELS)
    assert all(len(r["cos"]) == 1 and -1 <= r["cos"][0] <= 1 and r["ratio"][0] > 0 for r in res["transfer"])
    assert "Where the offset acts" in printed
    # the override reached the trainer: the run's stamp (world.results' cache key) records it
    stamp = json.loads((out / "runs" / "tdft" / "seed0" / "run.json").read_text())["stamp"]
    assert stamp["train"]["tdft_start"] == "noise"
    assert "--set tdft_start=noise" in printed and (out / "probe.md").read_text() in printed + "\n"
    with pytest.raises(ValueError, match="unknown method"):
        wp.probe("nope", [0], str(out))
    # other strengths (the cached run is reused): their rows, and the printed command says how they were asked for
    assert main(["world", "probe", *argv, "--strengths", "2", "1"]) == 0
    printed = capsys.readouterr().out
    res = json.loads((out / "probe.json").read_text())
    assert [r["row"] for r in res["rows"]] == ["negative (as world.results), strength 1", "negative, strength 2.0",
                                               "alone (LoRA on both branches)"]
    assert "--strengths 2 1" in printed and f"--world {world}" in printed
    with pytest.raises(ValueError, match="strengths must be > 0"):
        wp.probe("tdft", [0], str(out), strengths=(0.0,))
    # the sigma gate: a gate below every step's sigma leaves plain CFG, the base's own images (win rate exactly
    # one half: every image ties); a gate above every sigma is the ungated row; both said in the command
    assert main(["world", "probe", *argv, "--sigma-max", "0", "1e9"]) == 0
    printed = capsys.readouterr().out
    res = json.loads((out / "probe.json").read_text())
    rows = {r["row"]: r for r in res["rows"]}
    off, on = rows["negative, strength 1, only at sigma <= 0"], rows["negative, strength 1, only at sigma <= 1e+09"]
    assert off["win_rate"] == 0.5 and off["right_to_wrong"] == off["wrong_to_right"] == 0
    assert off["realism"] == pytest.approx(res["base_realism"], abs=1e-12)
    ungated = rows["negative (as world.results), strength 1"]
    assert on["win_rate"] == ungated["win_rate"] and on["realism"] == pytest.approx(ungated["realism"], abs=1e-12)
    assert on["win_rate"] != 0.5  # the LoRA changes images here, so the zero gate's 0.5 is the gate's doing
    assert "--sigma-max 0 1e+09" in printed
    with pytest.raises(ValueError, match="sigma_max must be >= 0"):
        wp.probe("tdft", [0], str(out), sigma_maxes=(-1.0,))


@pytest.mark.parametrize("kind", ["eps", "v_prediction", "flow"])
def test_x0_transfer_by_hand(world, kind, tmp_path):
    """An offset that adds b to the UNet's output bias moves every model output by b, under any prompt: in x0
    space that is, per pixel, -sqrt(1 - abar)/sqrt(abar) * b (eps world), -sqrt(1 - abar) * b (a v-predicting
    eps-kind world: x0 = sqrt(abar) x_t - sqrt(1 - abar) v) or -t * b (flow: x0 = x_t - t v), the same under
    the prompt and the null prompt: ratio 1, cosine 1, |d_prompt| per image = that factor * |b| * 8 (64 pixels)."""
    import torch

    from npo_suite.core.offsets.types import DenseDelta
    from npo_suite.world.build import load_world

    cfg = {"eps": None, "v_prediction": WorldConfig(steps=3, batch_size=8, prediction_type="v_prediction"),
           "flow": WorldConfig(kind="flow", steps=3, batch_size=8)}[kind]
    w = load_world(world if cfg is None else build_world(tmp_path / "w", cfg, diagnose_samples=0, log=None))
    conv = w.unet.conv_out
    b = 0.3
    off = {"conv_out": DenseDelta(weight=torch.zeros_like(conv.weight), bias=torch.full((conv.out_channels,), b))}
    images = torch.rand(6, 8, 8, generator=torch.Generator().manual_seed(0))  # [N, 8, 8] in [0, 1], as sampled
    rows = wp.x0_transfer(w, off, images, ["a photo of the digit 3"] * 6, levels=(0.3, 0.5))
    for r in rows:
        t = r["level"]
        if kind == "flow":
            factor = t
        else:
            target = ((1 - t) / t) ** 2 / (1 + ((1 - t) / t) ** 2)
            a = float(w.scheduler.alphas_cumprod[int(torch.argmin((w.scheduler.alphas_cumprod - target).abs()))])
            factor = ((1 - a) / a) ** 0.5 if kind == "eps" else (1 - a) ** 0.5
        assert r["ratio"] == pytest.approx(1.0, abs=1e-5) and r["cos"] == pytest.approx(1.0, abs=1e-5)
        assert r["d_prompt"] == pytest.approx(factor * b * 8, rel=1e-4)