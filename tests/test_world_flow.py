"""The flow-matching digits world (issue 22): `world build --kind flow`, its family, flow Euler sampling
through generate.sample (checked against a hand-written Euler loop), and `world results` on it with
every data kind and LoRA role (a quick build: right interfaces, meaningless weights)."""
from __future__ import annotations

import json

import pytest
import torch

from npo_suite.cli import main
from npo_suite.world import build as wb
from npo_suite.world import results as wr


@pytest.fixture(scope="module")
def flow_world(tmp_path_factory):
    return wb.build_world(tmp_path_factory.mktemp("fw") / "world", wb.WorldConfig(steps=3, batch_size=8, kind="flow"),
                          diagnose_samples=4, log=None, command="test")


def test_flow_world_layout_family_and_manifest(flow_world):
    from npo_suite.families.loading import load_model
    from npo_suite.world.plugin import register

    m = json.loads((flow_world / "world.json").read_text())
    assert m["kind"] == "flow" and m["scheduler"]["class"] == "FlowMatchEulerDiscreteScheduler"
    assert m["diagnostics"]["sampler"].startswith("flow-euler-20") and m["diagnostics"]["n"] == 4
    assert json.loads((flow_world / "model_index.json").read_text())["scheduler"][1] == "FlowMatchEulerDiscreteScheduler"
    register()
    b = load_model(str(flow_world))
    assert (b.family, b.prediction_type) == ("world_flow", "flow")
    assert wb.load_world(flow_world).kind == "flow"
    assert wr.world_kind(str(flow_world)) == "flow" and wr.world_kind(None) == "eps"
    e = load_model(str(wb.PACKAGE_WORLD_DIR))  # the eps world is still the eps family
    assert (e.family, e.prediction_type) == ("world", "epsilon")
    with pytest.raises(ValueError, match="kind"):
        wb.WorldConfig(kind="edm")


def test_flow_sampling_is_euler_with_cfg_on_velocities(flow_world):
    """generate.sample(..., scheduler="flow-euler") = x_1 = ε(seed); K steps x += (t_{k+1} − t_k)·v,
    v = v_u + w·(v_c − v_u), t_k = 1 − k/K, the UNet at timestep t·1000. Same ops, fp32: 1e-5."""
    from npo_suite.diffusers_host.generate import sample
    from npo_suite.families.loading import load_model
    from npo_suite.world.plugin import register

    register()
    b = load_model(str(flow_world))
    prompts, seeds, K, w = ["a handwritten seven", "a thin handwritten two"], [3, 4], 5, 3.0
    got = sample(b, prompts, seeds, "cfg", cfg_scale=w, steps=K, scheduler="flow-euler", decode=False).latents
    wo = wb.load_world(flow_world)
    c, u = wo.encode(prompts), wo.encode(["", ""])
    x = torch.stack([torch.randn(1, 8, 8, generator=torch.Generator().manual_seed(s)) for s in seeds])
    with torch.no_grad():
        for k in range(K):
            t, t_next = 1 - k / K, 1 - (k + 1) / K
            v_c = wo.unet(x, torch.tensor(t * 1000), c).sample
            v_u = wo.unet(x, torch.tensor(t * 1000), u).sample
            x = x + (t_next - t) * (v_u + w * (v_c - v_u))
    torch.testing.assert_close(got, x, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="does not sample a flow model"):
        sample(b, prompts, seeds, "cfg", steps=2, scheduler="ddim")
    e = load_model(str(wb.PACKAGE_WORLD_DIR))
    with pytest.raises(ValueError, match="does not sample a epsilon model"):
        sample(e, prompts, seeds, "cfg", steps=2, scheduler="flow-euler")


def test_world_results_on_the_flow_world(flow_world, tmp_path, capsys):
    """Every data kind and LoRA role trains and samples on the flow world; the report goes to the flow block."""
    out = tmp_path / "res"
    report = tmp_path / "R.md"
    eps_block = f"{wr.BEGIN}\neps table\n{wr.END}\n"
    fb, fe = wr.MARKERS["flow"]
    report.write_text(f"# R\n{eps_block}flow:\n{fb}\nold\n{fe}\n")
    argv = ["--quick", "--world", str(flow_world), "--out", str(out), "--methods", "snpo", "tdft", "ddspo",
            "--seeds", "0", "--train-steps", "2", "--json", "--report", str(report)]
    assert main(["world", "results", *argv]) == 0
    res = json.loads([ln for ln in capsys.readouterr().out.splitlines() if ln.strip()][0])
    assert list(res["methods"]) == ["snpo", "tdft", "ddspo"]
    full = json.loads((out / "results.json").read_text())
    assert full["details"]["config"]["scheduler"] == "flow-euler"
    assert full["details"]["roles"] == {"snpo": "snpo", "tdft": "negative", "ddspo": "positive"}
    text = report.read_text()
    assert text.startswith(f"# R\n{eps_block}flow:\n{fb}\n") and "old" not in text and "--world " in text


@pytest.mark.skipif(not (wb.PACKAGE_WORLD_DIRS["flow"] / "world.json").is_file(), reason="no shipped flow world")
def test_shipped_flow_world_base_model_is_clearly_imperfect():
    """The shipped flow world's base model, sampled with the project's flow Euler sampler (plain CFG 3,
    20 steps), scores clearly below real held-out digits: the methods have something to improve."""
    from npo_suite.diffusers_host import generate as gen
    from npo_suite.families.loading import load_model
    from npo_suite.world.plugin import register
    from npo_suite.world.reward import DigitsReward

    register()
    d = wb.PACKAGE_WORLD_DIRS["flow"]
    assert json.loads((d / "world.json").read_text())["kind"] == "flow"
    rm = DigitsReward.for_world(d)
    real = wb.load_world_splits(d)["reward_test"]
    bundle = load_model(str(d))
    assert bundle.family == "world_flow"
    prompts = [p for p in wb.all_prompts() for _ in range(2)]  # 30 prompts x 2 seeds
    res = gen.sample(bundle, prompts, list(range(60)), "cfg", cfg_scale=3.0, steps=20, scheduler="flow-euler")
    px = res.images.float().mean(1).reshape(60, -1).numpy()
    labels = [wb.parse_prompt(p)[0] for p in prompts]
    acc = rm.accuracy(px, labels)
    assert acc < rm.accuracy(real.pixels01(), real.labels) - 0.1, acc
    assert acc > 0.3  # but it does draw digits: the prompt matters
    assert rm.reward(px, labels).mean() < rm.reward(real.pixels01(), real.labels).mean() - 0.05
