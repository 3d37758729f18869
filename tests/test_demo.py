"""Demo smoke test: `python -m npo_suite demo --quick --json` on a quickly built world runs the whole
loop with the project's code (pairs -> trainer npo + snpo -> generate.sample -> scores -> report)."""
from __future__ import annotations

import json

import pytest

import npo_suite.diffusers_host.generate  # noqa: F401 - our own modules: a broken import fails, never skips
import npo_suite.trainer.loop  # noqa: F401


@pytest.mark.slow
def test_demo_quick_json(tmp_path, capsys):
    from npo_suite.cli import main
    from npo_suite.world.build import WorldConfig, build_world

    world = build_world(tmp_path / "world", WorldConfig(steps=3, batch_size=8), diagnose_samples=0, log=None)
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--json", "--world", str(world), "--out", str(out)]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.strip()]
    assert len(lines) == 1  # ONE JSON line on stdout (logs go to stderr)
    res = json.loads(lines[0])
    assert set(res) == {"methods", "base_mean_reward", "base_accuracy", "report"}
    assert set(res["methods"]) == {"npo", "snpo"}
    for r in res["methods"].values():
        assert set(r) == {"win_rate", "ci_low", "ci_high", "mean_reward", "accuracy", "right_to_wrong"}
        assert 0 <= r["ci_low"] <= r["win_rate"] <= r["ci_high"] <= 1
        assert 0 <= r["accuracy"] <= 1 and r["right_to_wrong"] >= 0
    assert 0 <= res["base_mean_reward"] <= 1
    report = (out / "report.md").read_text()
    assert "win rate vs CFG" in report and "right->wrong" in report
    for f in ("grid.png", "win_rates.png", "results.json", "pairs/pairs.jsonl",
              "train_npo/npo_lora.safetensors", "train_snpo/snpo_lora.safetensors", "images/cfg/manifest.json"):
        assert (out / f).is_file(), f
    # the demo's runs are valid `evaluate compare` inputs (same prompts and seeds)
    assert main(["evaluate", "compare", str(out / "images" / "cfg"), str(out / "images" / "npo"),
                 "--world", str(world), "--n-boot", "100", "--json"]) == 0
    cmp = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert cmp["n"] == 20


def test_method_grid_layout(tmp_path):
    """One block per run, one row per digit, one column per seed, each image upsampled 8x: the cell of
    (run b, digit r, seed k) holds that run's image of the plain prompt for digit r and seed k."""
    import numpy as np
    import torch
    from PIL import Image

    from npo_suite.world.build import all_prompts
    from npo_suite.world.demo import method_grid

    prompts = [p for p in all_prompts() for _ in range(5)]
    seeds = [s for _ in all_prompts() for s in range(5)]
    value = torch.tensor([(i % 251) / 255 for i in range(len(prompts))])
    runs = {"cfg": value[:, None, None].expand(-1, 8, 8), "npo": (1 - value)[:, None, None].expand(-1, 8, 8)}
    path = method_grid(runs, prompts, seeds, tmp_path / "g.png", columns=4, scale=8, pad=2, gap=12)
    with Image.open(path) as im:
        a = np.asarray(im)
    cell, head, left, block = 64, 16, 44, 4 * 66 - 2
    assert a.shape == (head + 10 * 66 + 2, left + 2 * (block + 12))
    for b, name in enumerate(runs):
        for r in (0, 7):
            for k in (0, 3):
                i = prompts.index(f"a handwritten {['zero', 'one', 'two', 'three', 'four', 'five', 'six', 'seven', 'eight', 'nine'][r]}") + k
                y, x = head + r * 66 + cell // 2, left + b * (block + 12) + k * 66 + cell // 2
                assert a[y, x] == round(float(runs[name][i, 0, 0]) * 255)
