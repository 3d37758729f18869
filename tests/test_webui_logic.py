"""Forge / A1111 logic without a WebUI: settings and infotext, offset files, both row layouts,
LDM key mapping, and the contract that the per-row runtime equals the merged-weights two-model
computation (cond rows theta+eta, uncond rows theta+alpha*eta+beta*delta; METHODS.md "NPO
guidance") through each WebUI's layout. The UNet is the tiny SD1.x UNet seen through an
LDM-named view (the WebUIs' UNets use LDM names), with one layer replaced by a linear-like
module that is not an nn.Linear, as Forge's `ForgeOperations.Linear` is.
"""
from __future__ import annotations

import copy
import json
import logging
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from npo_suite.core.offsets import materialize, save_offset
from npo_suite.core.offsets.keys import diffusers_to_ldm, unet_block_prefixes
from npo_suite.core.offsets.types import LowRankDelta, Offset
from npo_suite.webui import xyz_axes
from npo_suite.webui.a1111_session import A1111Session, a1111_refusal
from npo_suite.webui.forge_wrapper import ForgeNPOWrapper
from npo_suite.webui.infotext import reported_errors
from npo_suite.webui.ldm_keys import unet_deltas_to_ldm
from npo_suite.webui.offset_files import OffsetCache, list_offset_files, resolve_offset_file
from npo_suite.webui.plan import build_plan
from npo_suite.webui.row_layouts import A1111RowCursor, a1111_uncond_flags, forge_uncond_flags
from npo_suite.webui.runtime import NPORuntime
from npo_suite.webui.settings import NONE, NPOSettings, paste_value
from npo_suite.webui.verify import VerifyLog
from torch import nn

TOL = 1e-4


class PlainLinear(nn.Module):
    """Linear-like but not an nn.Linear (Forge's ForgeOperations.Linear)."""

    def __init__(self, lin: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = lin.in_features, lin.out_features
        self.weight = nn.Parameter(lin.weight.detach().clone())
        self.bias = None if lin.bias is None else nn.Parameter(lin.bias.detach().clone())

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


def ldm_view(unet: nn.Module) -> nn.Module:
    """A module tree naming `unet`'s (shared) Linear/Conv layers by their LDM paths."""
    prefixes = unet_block_prefixes(unet.config)
    root = nn.Module()
    for name, mod in unet.named_modules():
        if not (isinstance(mod, (nn.Linear, nn.Conv2d, PlainLinear))):
            continue
        ldm = diffusers_to_ldm(name, prefixes)
        if ldm is None:
            continue
        node = root
        parts = ldm.split(".")
        for part in parts[:-1]:
            if not hasattr(node, part):
                node.add_module(part, nn.Module())
            node = getattr(node, part)
        node.add_module(parts[-1], mod)
    return root


@pytest.fixture(scope="module")
def unet(sd15):
    u = copy.deepcopy(sd15.unet).eval()
    blk = u.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    blk.to_q = PlainLinear(blk.to_q)
    return u


def random_offset(unet: nn.Module, seed: int, rank: int = 2, std: float = 0.1) -> Offset:
    g = torch.Generator().manual_seed(seed)
    deltas = {}
    for name, m in unet.named_modules():
        if name.endswith(("to_q", "to_k", "to_v", "to_out.0", "proj_in", "ff.net.2", "conv1", "time_emb_proj")):
            w = m.weight
            if w.ndim == 4:
                down = torch.randn(rank, w.shape[1], *w.shape[2:], generator=g) * std
                up = torch.randn(w.shape[0], rank, 1, 1, generator=g) * std
            else:
                down = torch.randn(rank, w.shape[1], generator=g) * std
                up = torch.randn(w.shape[0], rank, generator=g) * std
            deltas[name] = LowRankDelta(down=down, up=up, scale=1.5)
    return Offset(unet=deltas)


def rel_err(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


# ---------------------------------------------------------------------------------------------
# settings, infotext, files
# ---------------------------------------------------------------------------------------------
def test_infotext_round_trip_and_paste():
    s = NPOSettings(True, "NPO", positive="pos/eta.safetensors", alpha=0.25, negative="delta.safetensors",
                    beta=0.8, sigma_min=0.5, sigma_max=10)
    info = s.infotext()
    assert info == {"NPO mode": "NPO", "NPO positive": "pos/eta.safetensors", "NPO alpha": "0.25",
                    "NPO negative": "delta.safetensors", "NPO beta": "0.8", "NPO sigma min": "0.5",
                    "NPO sigma max": "10"}
    assert NPOSettings.from_infotext(info) == s
    assert paste_value(info, "enabled") is True and paste_value(info, "beta") == 0.8
    assert paste_value({"Steps": "20"}, "enabled") is False and paste_value({}, "negative") == NONE
    assert NPOSettings(False, negative="d.safetensors").infotext() == {}
    snpo = NPOSettings(True, "SNPO", negative="snpo.safetensors", alpha=0.7)
    assert snpo.infotext() == {"NPO mode": "SNPO", "NPO negative": "snpo.safetensors", "NPO beta": "1",
                               "NPO uncond": "empty prompt"}  # says what was encoded as the uncond input
    assert NPOSettings.from_infotext(snpo.infotext()).mode == "SNPO"


@pytest.mark.parametrize("kw, msg", [
    (dict(mode="XNPO", negative="d"), "unknown mode"),
    (dict(negative=""), "choose a negative offset"),
    (dict(negative="d", sigma_min=5, sigma_max=1), "larger than sigma max"),
    (dict(negative="d", beta=float("nan")), "finite"),
])
def test_settings_validate(kw, msg):
    with pytest.raises(ValueError, match=msg):
        NPOSettings(True, **kw).validate()


def test_offset_files(tmp_path):
    a, b = tmp_path / "npo", tmp_path / "Lora"
    (a / "sub").mkdir(parents=True)
    b.mkdir()
    for p in (a / "delta.safetensors", a / "sub" / "eta.safetensors", b / "delta.safetensors", b / "style.safetensors",
              b / "old.ckpt", b / "notes.txt"):
        p.write_bytes(b"x")
    dirs = [a, b, tmp_path / "missing"]
    assert list_offset_files(dirs) == ["delta.safetensors", "style.safetensors", "sub/eta.safetensors"]
    assert resolve_offset_file("delta.safetensors", dirs) == a / "delta.safetensors"  # first folder wins
    assert resolve_offset_file("style.safetensors", dirs) == b / "style.safetensors"
    for bad, err in (("../x.safetensors", ValueError), ("/etc/x.safetensors", ValueError),
                     ("old.ckpt", ValueError), ("nope.safetensors", FileNotFoundError)):
        with pytest.raises(err, match="NPO"):
            resolve_offset_file(bad, dirs)


def test_offset_cache_rereads_changed_file(tmp_path, unet):
    calls = []

    def loader(p, family=None, strict=True):
        calls.append((p, family, strict))
        return Offset()

    f = tmp_path / "d.safetensors"
    f.write_bytes(b"1")
    cache = OffsetCache(loader)
    assert cache.get(f, "sd1") is cache.get(f, "sd1") and len(calls) == 1
    f.write_bytes(b"22")
    cache.get(f, "sd1")
    assert len(calls) == 2 and calls[0][2] is False


def test_xyz_axes_register_once_and_override_the_panel():
    """The X/Y/Z plot script is found among the loaded scripts, gets the four NPO axes once, and an
    axis value set on `p` replaces the panel's value (normalised again: "None" = no offset)."""
    class AxisOption:
        def __init__(self, label, type, apply, choices=None):
            self.label, self.type, self.apply, self.choices = label, type, apply, choices

    class XYZScript:
        pass

    XYZScript.__module__ = "xyz_grid.py"  # the WebUI loads scripts by file name
    xyz = types.SimpleNamespace(AxisOption=AxisOption, axis_options=[AxisOption("Seed", int, None)])
    other = types.SimpleNamespace(script_class=NPOSettings, module=object())
    data = [other, types.SimpleNamespace(script_class=XYZScript, module=xyz)]
    assert xyz_axes.find_xyz_module(data) is xyz and xyz_axes.find_xyz_module([other]) is None
    assert xyz_axes.add_axes(xyz, lambda: ["d.safetensors"]) is True
    assert xyz_axes.add_axes(xyz, lambda: []) is False  # on_before_ui calls it again
    axes = {o.label: o for o in xyz.axis_options}
    assert list(axes) == ["Seed", "[NPO] Alpha", "[NPO] Beta", "[NPO] Negative offset", "[NPO] Mode"]
    assert axes["[NPO] Negative offset"].choices() == ["d.safetensors"]
    assert axes["[NPO] Mode"].choices() == ["NPO", "SNPO"]
    p = types.SimpleNamespace()
    axes["[NPO] Beta"].apply(p, "0.25", None)
    axes["[NPO] Negative offset"].apply(p, "None", None)
    panel = NPOSettings(True, "NPO", "", 0.5, "d.safetensors", 1.0)
    s = xyz_axes.apply_overrides(panel, p)
    assert (s.beta, s.negative, s.alpha, s.mode) == (0.25, "", 0.5, "NPO")
    assert xyz_axes.apply_overrides(NPOSettings(True, negative="d", beta=0.6), types.SimpleNamespace()).beta == 0.6


# ---------------------------------------------------------------------------------------------
# row layouts
# ---------------------------------------------------------------------------------------------
def test_forge_and_a1111_layouts():
    assert forge_uncond_flags([0, 1], 4) == [False, False, True, True]
    assert forge_uncond_flags([1, 0], 2) == [True, False]  # Forge may batch uncond first
    assert forge_uncond_flags([0], 3) == [False] * 3  # cfg = 1: no uncond rows
    with pytest.raises(ValueError, match="equal chunks"):
        forge_uncond_flags([0, 1], 3)
    assert a1111_uncond_flags(5, 2) == [False, False, False, True, True]  # AND-prompts: 3 cond rows, uncond last
    with pytest.raises(ValueError):
        a1111_uncond_flags(2, 3)


def test_a1111_cursor_slices_and_skip():
    cur = A1111RowCursor()
    cur.reset(4, 2)
    assert cur.take(4) == [False, False, True, True] and cur.take(2) is None  # whole batch, then outside CFG
    cur.reset(4, 2)
    assert [cur.take(2), cur.take(2)] == [[False, False], [True, True]]  # batch_cond_uncond off
    cur.reset(6, 2)
    assert [cur.take(4), cur.take(2)] == [[False] * 4, [True, True]]  # cond/uncond of different lengths
    cur.reset(4, 2)
    assert cur.take(2) == [False, False]  # skipped uncond: x_in truncated, next step resets
    cur.reset(4, 2)
    assert cur.take(4) == [False, False, True, True]


# ---------------------------------------------------------------------------------------------
# key mapping and the runtime contract
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def offsets(unet):
    return random_offset(unet, 1), random_offset(unet, 2)


def test_ldm_mapping(unet, offsets):
    view = ldm_view(unet)
    eta, _ = offsets
    mapped, unmatched = unet_deltas_to_ldm(eta, view, [unet.config])
    assert not unmatched and len(mapped) == len(eta.unet)
    assert "input_blocks.1.1.transformer_blocks.0.attn1.to_q" in mapped
    assert "input_blocks.1.0.emb_layers.1" in mapped  # resnet time_emb_proj
    # diffusers-named UNets pass through
    assert unet_deltas_to_ldm(eta, unet, [unet.config])[0].keys() == eta.unet.keys()
    # an offset for another architecture: nothing fits -> build_plan refuses before applying anything
    foreign = Offset(unet={"down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q":
                           LowRankDelta(torch.zeros(2, 999), torch.zeros(7, 2))})
    with pytest.raises(ValueError, match="none of its 1 UNet modules fit"):
        build_plan(NPOSettings(True, negative="x"), view, None, foreign, [unet.config])


def _inputs(batch: int = 2):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 4, 8, 8, generator=g)  # [B, C, H, W]
    cond = torch.randn(batch, 5, 32, generator=g)  # [B, L, D]
    uncond = torch.randn(batch, 5, 32, generator=g)
    return x, cond, uncond


ALPHA, BETA = 0.5, 0.8


@pytest.fixture(scope="module")
def case(unet, offsets):
    """Inputs and the merged-weights two-model reference: theta+eta on cond, theta+alpha*eta+beta*delta on uncond."""
    eta, delta = offsets
    x, cond, uncond = _inputs()
    t = torch.tensor(500)
    m_pos = materialize(unet, [(eta, 1.0)])
    m_neg = materialize(unet, [(eta, ALPHA), (delta, BETA)])
    with torch.no_grad():
        ref_pos = m_pos(x, t, encoder_hidden_states=cond).sample
        ref_neg = m_neg(x, t, encoder_hidden_states=uncond).sample
    return x, cond, uncond, t, ref_pos, ref_neg


@pytest.mark.parametrize("order", [[0, 1], [1, 0]])
def test_forge_wrapper_equals_merged_two_model(unet, offsets, case, order, tmp_path):
    eta, delta = offsets
    view = ldm_view(unet)
    plan, lines = build_plan(NPOSettings(True, "NPO", "eta", ALPHA, "delta", BETA), view, eta, delta, [unet.config])
    assert "negative:" in lines[1] and f"{len(delta.unet)}/{len(delta.unet)} UNet modules" in lines[1]
    x, cond, uncond, t, ref_pos, ref_neg = case
    chunks = {0: cond, 1: uncond}
    args = {"input": torch.cat([x, x]), "timestep": torch.full((4,), 3.0),
            "c": {"c_crossattn": torch.cat([chunks[order[0]], chunks[order[1]]])}, "cond_or_uncond": order}

    def apply_model(xx, sigma, c_crossattn):  # stands in for Forge's KModel.apply_model
        return unet(xx, t, encoder_hidden_states=c_crossattn).sample

    verify = VerifyLog(tmp_path / "v.jsonl") if order == [0, 1] else None
    wrapper = ForgeNPOWrapper(NPORuntime(view, plan), verify=verify)
    assert copy.deepcopy(wrapper) is wrapper
    with torch.no_grad():
        out = wrapper(apply_model, args).chunk(2)
        plain = apply_model(args["input"], None, args["c"]["c_crossattn"]).chunk(2)
    got = {order[0]: out[0], order[1]: out[1]}
    assert rel_err(got[0], ref_pos) < TOL and rel_err(got[1], ref_neg) < TOL
    assert rel_err(got[1], plain[order.index(1)]) > 1e-2  # the offsets do change the negative branch
    if verify is not None:
        rec = json.loads((tmp_path / "v.jsonl").read_text().splitlines()[0])
        assert rec["rows"] == ["cond", "cond", "uncond", "uncond"] and rec["groups"][2:] == ["neg", "neg"]
        assert rec["max_abs_diff_merged"] < TOL * rec["max_abs_out"] and rec["max_abs_diff_plain"] > 1e-3
    assert not any(m._forward_hooks for m in unet.modules())  # hooks live for one forward only


def test_sigma_range_and_snpo_groups(unet, offsets):
    eta, delta = offsets
    view = ldm_view(unet)
    plan, _ = build_plan(NPOSettings(True, "NPO", "e", 0.0, "d", 1.0, sigma_min=1.0, sigma_max=5.0), view, eta, delta,
                         [unet.config])
    assert plan.row_groups([False, True], 3.0) == ["pos", "neg"]
    assert plan.row_groups([False, True], 9.0) == ["pos", "pos"]  # outside: plain CFG of theta+eta
    snpo, _ = build_plan(NPOSettings(True, "SNPO", "", 0.0, "d", 0.7), view, None, delta, [unet.config])
    assert snpo.row_groups([False, True], 3.0) == ["snpo", "snpo"]
    assert [w for _, w in snpo.groups()["snpo"]] == [0.7] and snpo.groups()["pos"] == []


class LDMUNet(nn.Module):
    """The tiny UNet under LDM module names, called the way A1111's DiffusionWrapper calls its
    UNet: `diffusion_model(x, t, context=...)`."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        for name, child in ldm_view(unet).named_children():
            self.add_module(name, child)
        object.__setattr__(self, "_unet", unet)  # not a submodule: its modules are the ones above

    def forward(self, x, timesteps, context=None):
        return self._unet(x, timesteps, encoder_hidden_states=context).sample


def test_a1111_session_layouts_equal_merged_two_model(unet, offsets, case, tmp_path):
    """A1111: x_in = [cond rows, uncond rows (last)], the UNet called on the whole tensor, on
    consecutive slices (batch_cond_uncond off / cond and uncond of different token lengths), or on
    the cond rows only (skip-early-CFG, NGMS); each call gets its rows, a call the step does not
    explain is refused, and the verify hook logs the merged-weights comparison per call."""
    eta, delta = offsets
    model = LDMUNet(unet)
    plan, _ = build_plan(NPOSettings(True, "NPO", "e", ALPHA, "d", BETA), model, eta, delta, [unet.config])
    x, cond, uncond, t, ref_pos, ref_neg = case
    owner = object()
    sess = A1111Session(model, plan, owner, VerifyLog(tmp_path / "v.jsonl", limit=10))
    try:
        with torch.no_grad():
            assert sess.step(owner, 4, 2, 2.0)
            whole = model(torch.cat([x, x]), t, context=torch.cat([cond, uncond]))
            sess.step(owner, 4, 2, 2.0)
            a, b = model(x, t, context=cond), model(x, t, context=uncond)
            sess.step(owner, 4, 2, 2.0)
            skipped = model(x, t, context=cond)  # uncond dropped before the UNet
            sess.step(owner, 4, 2, 2.0)
            model(torch.cat([x, x]), t, context=torch.cat([cond, uncond]))
            with pytest.raises(RuntimeError, match="does not explain"):
                model(x, t, context=uncond)  # a 5th and 6th row in a 4-row step
    finally:
        sess.close()
    assert rel_err(whole[:2], ref_pos) < TOL and rel_err(whole[2:], ref_neg) < TOL
    assert rel_err(a, ref_pos) < TOL and rel_err(b, ref_neg) < TOL and rel_err(skipped, ref_pos) < TOL
    recs = [json.loads(r) for r in (tmp_path / "v.jsonl").read_text().splitlines()]
    assert [r["rows"] for r in recs] == [["cond"] * 2 + ["uncond"] * 2, ["cond"] * 2, ["uncond"] * 2, ["cond"] * 2,
                                         ["cond"] * 2 + ["uncond"] * 2]
    assert all(r["max_abs_diff_merged"] < TOL * r["max_abs_out"] for r in recs)
    assert recs[2]["groups"] == ["neg", "neg"] and recs[2]["max_abs_diff_plain"] > 1e-3
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in [model, *unet.modules()])


def test_a1111_session_belongs_to_its_generation(unet, offsets, case):
    """A generation whose sampling raised never reaches postprocess_batch: the next generation's
    first CFG step closes the stale session, and its UNet calls run without offsets."""
    eta, delta = offsets
    model = LDMUNet(unet)
    plan, _ = build_plan(NPOSettings(True, "NPO", "e", ALPHA, "d", BETA), model, eta, delta, [unet.config])
    x, cond, uncond, t, _, _ = case
    failed, nxt = object(), object()
    sess = A1111Session(model, plan, failed)
    with torch.no_grad():
        sess.step(failed, 4, 2, 2.0)
        model(x, t, context=cond)  # ... and then the failed generation's sampling raised
        assert sess.step(nxt, 4, 2, 2.0) is False and sess.closed
        out = model(torch.cat([x, x]), t, context=torch.cat([cond, uncond]))
        plain = unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([cond, uncond])).sample
    assert torch.equal(out, plain)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in [model, *unet.modules()])
    sess.close()  # idempotent


def test_a1111_refusals():
    class Model:
        cond_stage_key = "txt"

    assert a1111_refusal(Model(), None) is None and a1111_refusal(Model(), "None") is None
    assert "refiner" in a1111_refusal(Model(), "sdxl_refiner.safetensors")
    Model.cond_stage_key = "edit"
    assert "InstructPix2Pix" in a1111_refusal(Model(), None)


def test_errors_are_reported_never_swallowed(caplog):
    """Without diffusers the kohya loader's ImportError used to vanish (only OSError/ValueError
    were reported): every exception goes to the infotext and the log, and is re-raised."""
    params = {}
    with caplog.at_level(logging.ERROR, logger="npo_suite"):
        with pytest.raises(ModuleNotFoundError):
            with reported_errors(params, logging.getLogger("npo_suite")):
                raise ModuleNotFoundError("No module named 'diffusers'", name="diffusers")
    assert "diffusers is not installed" in params["NPO error"] and "install.py" in params["NPO error"]
    assert "NPO error" in caplog.text and "diffusers" in caplog.text
    params = {}
    with pytest.raises(RuntimeError):
        with reported_errors(params, logging.getLogger("npo_suite")):
            raise RuntimeError("a, b")
    assert params == {"NPO error": "a; b"}


def test_kohya_file_through_cache_maps_to_ldm(unet, tmp_path):
    """A real kohya file (as the trainer writes it) loads through OffsetCache and maps onto the LDM view."""
    off = random_offset(unet, 3)
    path = save_offset(off, tmp_path / "neg.safetensors", base=unet, metadata={"role": "negative"})
    loaded = OffsetCache(lambda p, family=None, strict=True: __import__(
        "npo_suite.core.offsets", fromlist=["load_offset"]).load_offset(p, base=unet, strict=strict)).get(path, "sd1")
    mapped, unmatched = unet_deltas_to_ldm(loaded, ldm_view(unet), [unet.config])
    assert len(mapped) == len(off.unet) and not unmatched
    assert loaded.report is not None and "kohya" in loaded.report.summary()


def test_flow_models_are_refused_with_a_panel_message():
    """SD3 (A1111 >= 1.10 `is_sd3`) and Flux (Forge: `double_blocks` in its diffusion model) end in a
    message naming the model and the way to run it, raised inside `reported_errors` (the infotext's
    `NPO error`), never a generation that silently ignores the offsets. SD1.x/SDXL pass."""
    from npo_suite.webui.plan import flow_model_refusal

    class FluxDM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.double_blocks = torch.nn.ModuleList([torch.nn.Linear(2, 2)])

    assert "SD3 flow-matching" in flow_model_refusal(types.SimpleNamespace(is_sd3=True, is_sdxl=False))
    msg = flow_model_refusal(types.SimpleNamespace(is_sdxl=False), FluxDM())
    assert "Flux flow-matching" in msg and "CFG 1" in msg and "generate" in msg
    assert flow_model_refusal(types.SimpleNamespace(is_sdxl=True), torch.nn.Linear(2, 2)) is None
    assert flow_model_refusal(types.SimpleNamespace(is_sd3=False)) is None
    chroma = flow_model_refusal(types.SimpleNamespace(is_chroma=True))
    assert "Chroma flow-matching" in chroma and "No part of NPO Suite runs Chroma yet" in chroma
    params = {}
    with pytest.raises(ValueError), reported_errors(params, logging.getLogger("t")):
        raise ValueError(msg)
    assert "Flux" in next(iter(params.values()))


def test_the_script_refuses_flow_models_before_loading_offsets():
    src = (Path(__file__).resolve().parents[1] / "scripts" / "npo_webui.py").read_text(encoding="utf-8")
    process = src[src.index("def process(self, p"):src.index("def process_batch")]
    assert process.index("flow_model_refusal(") < process.index("load_offsets(")
