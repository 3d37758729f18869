"""core.npo, the one home of NPO composition: groups, the α default, row chunks, module matching,
and that every front door uses it (the drift bugs of issue 13: α and `snpo` differed by front door)."""
from __future__ import annotations

import argparse
import ast
from pathlib import Path

import pytest
import torch
from torch import nn

from npo_suite.core.branch_lora import component_deltas
from npo_suite.core.npo import (ALPHA_DEFAULT, COND, UNCOND, NPOSpec, chunk_kinds, match_deltas, module_fits, npo_groups,
                                row_groups, sigma_bound, snpo_group)
from npo_suite.core.offsets.types import DenseDelta, LowRankDelta, Offset, delta_fits, delta_numel
from npo_suite.diffusers_host import generate
from npo_suite.webui.plan import NPOPlan
from npo_suite.webui.settings import NPOSettings

ROOT = Path(__file__).resolve().parents[1]


def _d(out=3, inp=2, r=1):
    return LowRankDelta(torch.ones(r, inp), torch.ones(out, r))


def _weights(terms):
    return [(dict(component_deltas(o)), w) for o, w in terms]


def test_alpha_default_is_the_papers_one():
    """seed 001 eq. 5/10 and the authors' gen.py: the negative model carries the whole positive offset."""
    assert ALPHA_DEFAULT == 1.0
    assert NPOSpec().alpha == ALPHA_DEFAULT


def test_every_front_door_defaults_alpha_from_core_npo():
    """Before: generate 1.0, the ComfyUI nodes and the WebUI panel 0.0 (the same files gave another
    negative model depending on where one sampled)."""
    from npo_suite.cli import generate as cli

    p = argparse.ArgumentParser()
    cli.add_arguments(p)
    assert p.parse_args(["model", "--out", "x"]).alpha == ALPHA_DEFAULT
    assert generate.Offsets().alpha == ALPHA_DEFAULT
    assert NPOSettings().alpha == ALPHA_DEFAULT
    assert NPOSettings.from_infotext({"NPO mode": "NPO", "NPO positive": "eta.safetensors"}).alpha == ALPHA_DEFAULT
    assert NPOPlan("NPO", {}, {}).alpha == ALPHA_DEFAULT


def _literal_alpha_defaults(path: Path) -> list:
    """Every literal number given as an `alpha` default in a file (keyword `alpha=`, `default=` of an
    "alpha" input, `value=` of an alpha slider): the ComfyUI / WebUI modules import their hosts."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.arguments):
            names = [a.arg for a in node.args[len(node.args) - len(node.defaults):]] + [a.arg for a in node.kwonlyargs]
            for name, default in zip(names, list(node.defaults) + list(node.kw_defaults)):
                if name == "alpha" and isinstance(default, ast.Constant):
                    found.append(default.value)
        if isinstance(node, ast.Call) and any(isinstance(a, ast.Constant) and a.value in ("alpha", "--alpha")
                                              for a in node.args):
            found += [k.value.value for k in node.keywords if k.arg == "default" and isinstance(k.value, ast.Constant)]
        if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", None) == "alpha" \
                and isinstance(node.value, ast.Constant):
            found.append(node.value.value)
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "alpha" for t in node.targets) \
                and isinstance(node.value, ast.Call):
            found += [k.value.value for k in node.value.keywords if k.arg == "value" and isinstance(k.value, ast.Constant)]
    return found


@pytest.mark.parametrize("rel", ["nodes/sampling.py", "scripts/npo_webui.py", "webui/settings.py", "webui/plan.py",
                                 "diffusers_host/generate.py", "cli/generate.py"])
def test_no_front_door_writes_its_own_alpha_default(rel):
    assert _literal_alpha_defaults(ROOT / rel) == []


def test_the_literal_finder_sees_a_hand_written_default(tmp_path):
    f = tmp_path / "x.py"
    f.write_text('def f(a, alpha=0.0):\n    pass\nio.Float.Input("alpha", default=0.5)\nalpha = gr.Slider(0, 1, value=0.25)\n'
                 'p.add_argument("--alpha", default=1.0)\nclass S:\n    alpha: float = 0.75\n')
    assert sorted(_literal_alpha_defaults(f)) == [0.0, 0.25, 0.5, 0.75, 1.0]


def test_snpo_is_one_model_theta_eta_beta_s_in_generate_and_the_webui():
    """SNPO (METHODS.md, seed 000 §4.3): both branches run ONE model. Before, generate ran θ+s
    (η silently dropped, s at weight 1) and the WebUI θ+η+β·s."""
    eta, s = Offset(unet={"m": _d()}), Offset(unet={"m": _d(), "n": _d()})
    gen = generate.Offsets(pos=eta, snpo=s, beta=0.5).groups()["snpo"]
    web = NPOPlan("SNPO", eta.unet, s.unet, beta=0.5).groups()["snpo"]
    assert _weights(gen) == _weights(web) == [(eta.unet, 1.0), (s.unet, 0.5)]
    # without an SNPO LoRA the one model is θ+η in both
    assert _weights(generate.Offsets(pos=eta).groups()["snpo"]) == _weights(NPOPlan("SNPO", eta.unet, {}).groups()["snpo"])


def test_groups_golden():
    eta, delta, s = {"a": _d()}, {"b": _d()}, {"c": _d()}
    g = NPOSpec(eta, delta, alpha=0.3, beta=0.8, snpo=s).groups()
    assert g == {"pos": [(eta, 1.0)], "neg": [(eta, 0.3), (delta, 0.8)], "snpo": [(eta, 1.0), (s, 0.8)]}
    assert npo_groups(eta, delta, 0.0, 0.0) == {"pos": [(eta, 1.0)], "neg": []}  # weight 0 adds nothing
    assert snpo_group({}, None) == []  # an empty mapping is no offset


def test_chunk_kinds_and_row_groups():
    assert chunk_kinds([COND, UNCOND], 4) == [0, 0, 1, 1]
    with pytest.raises(ValueError, match="equal chunks"):
        chunk_kinds([0, 1], 3)
    kinds = [COND, UNCOND, 2]
    assert row_groups(kinds, "npo") == ["pos", "neg", None]
    assert row_groups(kinds, "npo", active=False) == ["pos", "pos", None]
    assert row_groups(kinds, "snpo") == ["snpo", "snpo", None]
    assert row_groups(kinds, "cfg") == ["pos", "pos", None]
    assert sigma_bound(0.0) is None and sigma_bound(-1) is None and sigma_bound(2) == 2.0


def test_delta_fits_and_module_matching():
    lin, conv = nn.Linear(2, 3), nn.Conv2d(2, 3, 1)
    assert delta_numel(_d()) == 6 and delta_fits(_d(), (3, 2)) and delta_fits(_d(), (3, 2, 1, 1))
    assert not delta_fits(_d(), (2, 3))  # same size, other output dim
    assert delta_numel(DenseDelta(torch.zeros(3, 2))) == 6
    root = nn.Module()
    root.lin, root.conv = lin, conv
    assert module_fits(root, "lin", _d()) and module_fits(root, "conv", _d())
    assert not module_fits(root, "nope", _d()) and not module_fits(root, None, _d())
    deltas = {"x.lin": _d(), "conv": _d(), "bad": _d(4)}
    mapped, unmatched = match_deltas(deltas, root, lambda k: (k, k.removeprefix("x.")))
    assert list(mapped) == ["lin", "conv"] and unmatched == ["bad"]
