"""`python -m npo_suite world results` on a quickly built world: every data kind and LoRA role of the
registry, two training seeds, ONE JSON line, pooled figures, resumable per (method, seed)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from npo_suite.cli import main
from npo_suite.world import results as wr
from npo_suite.world.build import GENERIC_PROMPT, WorldConfig, build_world
from npo_suite.world.rewrite import WorldDigitsRewriter, remove_content

KEYS = {"win_rate", "ci_low", "ci_high", "realism_win_rate", "realism_ci_low", "mean_reward", "accuracy",
        "right_to_wrong", "wrong_to_right", "seeds"}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("rw") / "world", WorldConfig(steps=3, batch_size=8),
                       diagnose_samples=0, log=None)


def test_world_rewriter_removes_the_content():
    from npo_suite.trainer.ddspo import build_rewriter, rewriter_names

    assert "world_digits" in rewriter_names() and isinstance(build_rewriter("world_digits"), WorldDigitsRewriter)
    assert remove_content("a thick handwritten seven") == GENERIC_PROMPT == "a handwritten digit"
    assert remove_content("a handwritten one") == GENERIC_PROMPT
    rw = build_rewriter("world_digits")
    assert rw(["a thin handwritten two", "a handwritten nine"], [1, 2]) == [GENERIC_PROMPT] * 2
    with pytest.raises(ValueError, match="names no digit class"):
        rw(["a photo of a cat"], [0])
    with pytest.raises(ValueError, match="no model path"):
        build_rewriter("world_digits", path="/some/model")


def test_results_json_pooled_and_resumable(world, tmp_path, capsys):
    out = tmp_path / "res"
    argv = ["--quick", "--world", str(world), "--out", str(out), "--methods", "snpo", "tdft", "ddspo",
            "--seeds", "0", "1", "--train-steps", "2", "--json"]
    assert main(["world", "results", *argv]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.strip()]
    assert len(lines) == 1  # ONE JSON line on stdout (progress and logs on stderr)
    res = json.loads(lines[0])
    assert set(res) == {"methods", "base_accuracy", "base_mean_reward"}
    assert list(res["methods"]) == ["snpo", "tdft", "ddspo"]  # every data kind and every LoRA role
    full = json.loads((out / "results.json").read_text())
    for m, r in res["methods"].items():
        assert set(r) == KEYS and r["seeds"] == [0, 1]
        assert 0 <= r["ci_low"] <= r["win_rate"] <= r["ci_high"] <= 1
        # pooled = over both seeds' pairs: the mean of the per-seed figures (equal sizes), counts summed
        per = full["details"]["per_seed"][m]
        assert r["win_rate"] == pytest.approx(np.mean([per[s]["win_rate"] for s in ("0", "1")]))
        assert r["accuracy"] == pytest.approx(np.mean([per[s]["accuracy"] for s in ("0", "1")]))
        assert r["right_to_wrong"] == sum(per[s]["right_to_wrong"] for s in ("0", "1"))
    assert full["details"]["roles"] == {"snpo": "snpo", "tdft": "negative", "ddspo": "positive"}
    assert full["details"]["n_per_seed"] == 20  # 10 plain prompts x 2 evaluation seeds
    # the data each kind trained on
    from npo_suite.core.ddspo_format import is_prepared, read_manifest
    from safetensors.torch import load_file

    prepared = out / "data" / "ddspo" / "prepared"
    assert is_prepared(prepared)
    entries = read_manifest(prepared)
    assert len(entries) == 30 and all(e["neg_prompt"] == GENERIC_PROMPT for e in entries)
    lat = load_file(str(prepared / entries[0]["files"]["latents"]))
    assert lat["latents_w"].shape == lat["latents_l"].shape == (1, 8, 8)  # the loser: the base's image for c-
    assert lat["latents_w"].min() >= -1 and lat["latents_w"].max() <= 1
    real = (out / "data" / "real_images" / "prompts.jsonl").read_text().splitlines()
    assert len(real) == 898 and "image" in json.loads(real[0])
    # a rerun reuses every (method, seed) run; a changed setting redoes them
    log = []
    again = wr.run_results(wr.ResultsConfig.quick(world=str(world), out=str(out), methods=("snpo", "tdft"),
                                                  seeds=(0, 1), train_steps=2), log=log.append)
    assert sum("reused" in x for x in log) == 4 and not any("trained" in x for x in log)
    assert again["methods"]["snpo"] == res["methods"]["snpo"]
    log.clear()
    wr.run_results(wr.ResultsConfig.quick(world=str(world), out=str(out), methods=("snpo",), seeds=(1,), train_steps=3),
                   log=log.append)
    assert any("settings differ" in x for x in log) and any("trained" in x for x in log)


def test_report_block_is_replaced_and_the_rest_kept(tmp_path):
    f = tmp_path / "R.md"
    f.write_text(f"# Title\nintro\n{wr.BEGIN}\nold table\n{wr.END}\nreading\n")
    wr.write_report(f, "new table")
    assert f.read_text() == f"# Title\nintro\n{wr.BEGIN}\nnew table\n{wr.END}\nreading\n"
    f.write_text("no markers\n")
    with pytest.raises(ValueError, match="exactly one"):
        wr.write_report(f, "x")


def test_sampling_follows_the_lora_role():
    """One table "LoRA role -> how it is sampled" (core.guidance.ROLE_SAMPLING): results, demo and probe sample
    through core.npo.role_spec, training validation through trainer.validation.ROLE_BRANCHES, both read it."""
    from npo_suite.core.guidance import ROLE_SAMPLING
    from npo_suite.core.npo import role_spec
    from npo_suite.core.offsets.schema import ROLES
    from npo_suite.trainer.methods import METHODS
    from npo_suite.trainer.validation import ROLE_BRANCHES

    assert set(ROLE_SAMPLING) == set(ROLES) and {m.role for m in METHODS.values()} <= set(ROLES)
    assert role_spec("positive", "L")[0] == "cfg" and role_spec("positive", "L")[1].eta == "L"
    mode, off = role_spec("negative", "L")
    assert mode == "npo" and off.delta == "L" and off.alpha == 0.0 and off.beta == 1.0
    assert role_spec("negative", "L", beta=0.25)[1].beta == 0.25  # world.probe's strengths
    assert role_spec("snpo", "L")[1].snpo == "L"
    with pytest.raises(ValueError, match="no sampling rule"):
        role_spec("other", "L")
    assert ROLE_BRANCHES == {"base": (None, None, "cfg"), "positive": ("policy", "policy", "cfg"),
                             "negative": (None, "policy", "npo"), "snpo": ("policy", "policy", "snpo")}
    assert wr.ResultsConfig().methods == tuple(METHODS)  # the registry, not a list beside it
