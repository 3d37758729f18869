"""Weight offsets: formats, round trips, interoperability with diffusers/peft, merge, extraction."""
from __future__ import annotations

import copy
import json

import pytest
import torch

try:  # pytest --import-mode=importlib registers tests/conftest.py as "tests.conftest" (pytest 9)
    from tests.conftest import load_sd15, load_sdxl
except ImportError:  # pragma: no cover - other pytest versions / rootdirs
    from conftest import load_sd15, load_sdxl

from npo_suite.core import offsets as O
from npo_suite.core.offsets.keys import SD15_UNET, SDXL_UNET, Target, diffusers_to_ldm, unet_block_prefixes
from npo_suite.core.offsets.types import DenseDelta, LowRankDelta, Offset
from npo_suite.testing.tiny_models import unet_config_sd15, unet_config_sdxl

UNET_LINEAR = ["attentions.0.transformer_blocks.0.attn1.to_q", "attentions.0.transformer_blocks.0.attn2.to_k",
               "attentions.0.transformer_blocks.0.attn1.to_out.0", "attentions.0.transformer_blocks.0.ff.net.0.proj",
               "attentions.0.proj_in"]
# diffusers recognises kohya text-encoder attention LoRAs only when out_proj is among them (as in real files)
TE = ["text_model.encoder.layers.0.self_attn.q_proj", "text_model.encoder.layers.0.self_attn.out_proj",
      "text_model.encoder.layers.1.mlp.fc1"]


def _rand_lora(weight_shape, rank, g, alpha=None, tucker=False, conv_kernel_in_down=True):
    out_f, in_f = weight_shape[:2]
    if len(weight_shape) == 2:
        d = LowRankDelta(torch.randn(rank, in_f, generator=g), torch.randn(out_f, rank, generator=g))
    elif tucker:
        d = LowRankDelta(torch.randn(rank, in_f, 1, 1, generator=g), torch.randn(out_f, rank, 1, 1, generator=g),
                         mid=torch.randn(rank, rank, *weight_shape[2:], generator=g))
    else:
        d = LowRankDelta(torch.randn(rank, in_f, *weight_shape[2:], generator=g), torch.randn(out_f, rank, 1, 1, generator=g))
    d.scale = (alpha if alpha is not None else rank) / rank
    d.up *= 0.05
    return d


def _offset_for(pipe, g, tucker=True, te=True):
    """Random LoRA on attention, ff, proj_in, 3x3 conv (LoCon), 1x1 conv, time_emb_proj (+ Tucker) and text encoders."""
    unet = pipe.unet
    attn_block = next(n.rsplit(".attentions.0", 1)[0] for n, _ in unet.named_modules() if n.endswith("attentions.0")
                      and n.startswith("down_blocks"))
    paths = [f"{attn_block}.{p}" for p in UNET_LINEAR]
    res = next(n for n, m in unet.named_modules() if n.startswith("up_blocks") and n.endswith("conv_shortcut"))
    res = res.rsplit(".", 1)[0]
    paths += [f"{res}.conv1", f"{res}.conv_shortcut", f"{res}.time_emb_proj"]
    off = Offset()
    for i, p in enumerate(paths):
        w = unet.get_submodule(p).weight
        off.unet[p] = _rand_lora(tuple(w.shape), 2 + i % 3, g, alpha=1.0 + i)
    if tucker:
        p = f"{res}.conv2"
        off.unet[p] = _rand_lora(tuple(unet.get_submodule(p).weight.shape), 2, g, alpha=1.0, tucker=True)
    if te:
        for comp, mod in (("te1", pipe.text_encoder), ("te2", getattr(pipe, "text_encoder_2", None))):
            if mod is not None:
                off.text_encoders[comp] = {p: _rand_lora(tuple(O.module_for_path(mod, p).weight.shape), 3, g, alpha=1.5) for p in TE}
    return off


def _assert_same_deltas(a: Offset, b: Offset, atol=1e-6):
    assert {c: sorted(m) for c, m in a.components().items() if m} == {c: sorted(m) for c, m in b.components().items() if m}
    for c, mods in a.components().items():
        for p, d in mods.items():
            torch.testing.assert_close(b.components()[c][p].dense(), d.dense(), atol=atol, rtol=1e-5)


def _unet_inputs(pipe, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = pipe.unet.config
    x = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([10, 500])
    ctx = torch.randn(2, 7, cfg.cross_attention_dim, generator=g)
    kw = {}
    if cfg.addition_embed_type == "text_time":
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        kw["added_cond_kwargs"] = {"text_embeds": torch.randn(2, pooled, generator=g),
                                   "time_ids": torch.tensor([[8., 8, 0, 0, 8, 8]] * 2)}
    return (x, t, ctx), kw


@torch.no_grad()
def _unet_out(unet, pipe):
    args, kw = _unet_inputs(pipe)
    return unet(*args, **kw).sample


def _max_rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


# ---------------------------------------------------------------- key maps
@pytest.mark.parametrize("cfg", [unet_config_sd15(), unet_config_sdxl(), SD15_UNET, SDXL_UNET], ids=["sd1", "sdxl", "sd15", "sdxl-base"])
def test_ldm_names_match_diffusers_converter(cfg):
    """Our diffusers->LDM module map agrees with diffusers' own LDM->diffusers checkpoint converter."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    with torch.device("meta"):
        unet = UNet2DConditionModel(**cfg)
    prefixes = unet_block_prefixes(unet.config)
    keys = list(unet.state_dict())
    ldm = {}
    for i, k in enumerate(keys):
        mod, p = k.rsplit(".", 1)
        ldm["model.diffusion_model." + diffusers_to_ldm(mod, prefixes) + "." + p] = torch.tensor([float(i)])
    back = convert_ldm_unet_checkpoint(ldm, dict(unet.config))
    assert {k: int(v.item()) for k, v in back.items()} == {k: i for i, k in enumerate(keys)}
    # and back through our inverse map (used for LDM full checkpoints)
    norm = O.normalize_unet_state_dict(ldm, unet.config)
    assert {k: int(v.item()) for k, v in norm.items()} == {k: i for i, k in enumerate(keys)}
    # without a config the layout is read from the LDM keys (it used to be assumed to be SD1.5's: a tiny or
    # non-standard UNet then crashed or got wrong names), giving the same names
    norm = O.normalize_unet_state_dict(ldm)
    assert {k: int(v.item()) for k, v in norm.items()} == {k: i for i, k in enumerate(keys)}
    t = Target.from_module(unet, "unet")
    assert len(t.flat) == len(t.shapes) + len(t.ldm)  # the kohya underscore spellings never collide


# ---------------------------------------------------------------- round trips
@pytest.mark.parametrize("fmt", ["kohya", "peft"])
@pytest.mark.parametrize("fam", ["sd1", "sdxl"])
def test_save_load_round_trip(fam, fmt, sd15, sdxl, tmp_path):
    pipe = sd15 if fam == "sd1" else sdxl
    off = _offset_for(pipe, torch.Generator().manual_seed(1), tucker=(fmt == "kohya"))
    f = tmp_path / f"x_{fam}_{fmt}.safetensors"
    O.save_offset(off, f, format=fmt, base=pipe, metadata={"npo_role": "negative", "npo_beta": 2000.0, "npo_steps": 10})
    back = O.load_offset(f, base=pipe)
    _assert_same_deltas(off, back)
    assert back.report.format == fmt and back.report.family == fam and back.report.unmatched_keys == []
    assert back.report.matched == sum(len(m) for m in off.components().values())
    meta = back.metadata
    assert meta["npo_role"] == "negative" and meta["npo_beta"] == "2000" and meta["npo_steps"] == "10"
    assert meta["ss_base_model_version"] == {"sd1": "sd_v1", "sdxl": "sdxl_base_v1-0"}[fam]
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_output_name"] == f.stem
    assert all(isinstance(v, str) for v in meta.values())
    if fmt == "kohya":
        from safetensors import safe_open

        keys = list(safe_open(str(f), "pt").keys())
        if fam == "sd1":
            assert any(k.startswith("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.") for k in keys)
            assert any(k.startswith("lora_te_text_model_encoder_layers_0_self_attn_q_proj.") for k in keys)
        else:  # kohya sd-scripts SDXL: LDM names
            assert any(k.startswith("lora_unet_input_blocks_") for k in keys)
            assert not any(k.startswith("lora_unet_down_blocks") for k in keys)
            assert any(k.startswith("lora_te2_text_model_") for k in keys)
        assert any(k.endswith(".lora_mid.weight") for k in keys)


def test_peft_tucker_is_folded(sd15, tmp_path):
    off = _offset_for(sd15, torch.Generator().manual_seed(2), tucker=True, te=False)
    f = tmp_path / "t.safetensors"
    O.save_offset(off, f, format="peft", base=sd15)
    _assert_same_deltas(off, O.load_offset(f, base=sd15), atol=1e-5)


def test_diffusers_style_and_comfy_keys_resolve(sdxl, tmp_path):
    """The same SDXL LoRA spelled as kohya-diffusers names and ComfyUI LDM names loads identically."""
    off = _offset_for(sdxl, torch.Generator().manual_seed(3), tucker=False, te=False)
    ref = O.offset_to_state_dict(off, format="kohya", base=sdxl)
    to_ldm = Target.from_module(sdxl.unet, "unet").to_ldm()
    diff_style, comfy = {}, {}
    for p, d in off.unet.items():
        for stem, sd in (("lora_unet_" + p.replace(".", "_"), diff_style), ("diffusion_model." + to_ldm[p], comfy)):
            sd[f"{stem}.lora_down.weight"], sd[f"{stem}.lora_up.weight"] = d.down, d.up
            sd[f"{stem}.alpha"] = torch.tensor(d.scale * d.rank)
    for sd, fmt in ((ref, "kohya"), (diff_style, "kohya"), (comfy, "comfyui")):
        back = O.offset_from_state_dict(sd, base=sdxl)
        assert back.report.format == fmt
        _assert_same_deltas(off, back)


def test_family_detection_without_model(tmp_path):
    """Real-size keys, no model: resolved against the standard SD1.5 / SDXL architectures."""
    g = torch.Generator().manual_seed(0)
    sd1 = {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight": torch.randn(2, 768, generator=g),
           "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight": torch.randn(320, 2, generator=g),
           "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.alpha": torch.tensor(1.0)}
    off = O.offset_from_state_dict(sd1, name="sd1.safetensors")
    assert off.report.family == "sd1" and off.unet["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"].scale == 0.5
    xl = {"lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_k.lora_down.weight": torch.randn(2, 2048, generator=g),
          "lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_k.lora_up.weight": torch.randn(640, 2, generator=g),
          "lora_te2_text_model_encoder_layers_31_self_attn_out_proj.lora_down.weight": torch.randn(2, 1280, generator=g),
          "lora_te2_text_model_encoder_layers_31_self_attn_out_proj.lora_up.weight": torch.randn(1280, 2, generator=g)}
    off = O.offset_from_state_dict(xl, name="xl.safetensors")
    assert off.report.family == "sdxl"
    assert list(off.unet) == ["down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k"]
    assert list(off.text_encoders["te2"]) == ["text_model.encoder.layers.31.self_attn.out_proj"]
    with pytest.raises(ValueError, match=r"xl\.safetensors.*looks like SDXL but the requested family is SD1\.x"):
        O.offset_from_state_dict(xl, name="xl.safetensors", family="sd1")


# ---------------------------------------------------------------- interoperability
@pytest.mark.parametrize("fmt", ["kohya", "peft"])
@pytest.mark.parametrize("fam", ["sd1", "sdxl"])
def test_saved_lora_loads_in_diffusers(fam, fmt, sd15_dir, sdxl_dir, tmp_path):
    """diffusers' own load_lora_weights on our file == our applied() merge (UNet and text encoders)."""
    load, d = (load_sd15, sd15_dir) if fam == "sd1" else (load_sdxl, sdxl_dir)
    ours, theirs = load(d), load(d)
    off = _offset_for(ours, torch.Generator().manual_seed(4), tucker=False)
    f = tmp_path / f"lora_{fam}.safetensors"
    O.save_offset(off, f, format=fmt, base=ours)
    theirs.load_lora_weights(str(f))
    ids = torch.tensor([[0, 5, 9, 12, 1, 1, 1]])
    with torch.no_grad():
        with O.applied(ours.unet, [(off, 1.0)]), O.applied(ours.text_encoder, [(off, 1.0)], "te1"):
            want_u, want_t = _unet_out(ours.unet, ours), ours.text_encoder(ids)[0]
        got_u, got_t = _unet_out(theirs.unet, theirs), theirs.text_encoder(ids)[0]
        base_u = _unet_out(ours.unet, ours)
    assert _max_rel(got_u, want_u) <= 1e-4 and _max_rel(got_t, want_t) <= 1e-4
    assert _max_rel(base_u, want_u) > 1e-3  # the LoRA does something
    if fam == "sdxl":
        with torch.no_grad(), O.applied(ours.text_encoder_2, [(off, 1.0)], "te2"):
            assert _max_rel(theirs.text_encoder_2(ids)[0], ours.text_encoder_2(ids)[0]) <= 1e-4


def test_offset_from_peft_equals_peft_model(sd15_dir, tmp_path):
    from peft import LoraConfig

    pipe = load_sd15(sd15_dir)
    unet = pipe.unet
    cfg = LoraConfig(r=4, lora_alpha=6, init_lora_weights=False,
                     target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1", "conv_shortcut"])
    unet.add_adapter(cfg, adapter_name="policy")
    with torch.no_grad():
        for n, p in unet.named_parameters():
            if "lora_B" in n:
                p.mul_(0.05)
    want = _unet_out(unet, pipe)
    deltas = O.offset_from_peft(unet, "policy")
    assert any(d.down.ndim == 4 and d.down.shape[2:] == (3, 3) for d in deltas.values())
    off = Offset(unet=deltas)
    f = tmp_path / "trained.safetensors"
    O.save_offset(off, f, metadata={"npo_role": "negative", "npo_base_model_hash": O.model_hash(unet)})
    loaded = O.load_offset(f, base=unet)  # PEFT-wrapped model: names seen through base_layer
    unet.disable_adapters()
    base_out = _unet_out(unet, pipe)
    with O.applied(unet, [(loaded, 1.0)]):
        got = _unet_out(unet, pipe)
    assert _max_rel(got, want) <= 1e-4 and _max_rel(base_out, want) > 1e-3
    with pytest.raises(ValueError, match="adapters found: \\['policy'\\]"):
        O.offset_from_peft(unet, "nope")


# ---------------------------------------------------------------- merge
def test_applied_restores_bit_exact_and_matches_merged(sd15):
    unet = sd15.unet
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    g = torch.Generator().manual_seed(5)
    eta, delta = _offset_for(sd15, g, te=False), _offset_for(sd15, g, te=False)
    terms = [(eta, 0.5), (delta, 0.8)]
    merged = O.merged_state_dict(unet, terms)
    mat = O.materialize(unet, terms)
    with O.applied(unet, terms):
        inside = {k: v.clone() for k, v in unet.state_dict().items()}
        out_applied = _unet_out(unet, sd15)
    for k in before:
        assert torch.equal(unet.state_dict()[k], before[k])
        torch.testing.assert_close(inside[k], merged[k], rtol=0, atol=0)
        torch.testing.assert_close(mat.state_dict()[k], merged[k], rtol=0, atol=0)
    p = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    want = before[p + ".weight"] + 0.5 * eta.unet[p].dense() + 0.8 * delta.unet[p].dense()
    torch.testing.assert_close(merged[p + ".weight"], want)
    torch.testing.assert_close(_unet_out(mat, sd15), out_applied)
    with pytest.raises(RuntimeError, match="boom"), O.applied(unet, terms):
        raise RuntimeError("boom")
    assert all(torch.equal(unet.state_dict()[k], before[k]) for k in before)


def test_applied_validates_before_touching(sd15):
    unet = sd15.unet
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    off = _offset_for(sd15, torch.Generator().manual_seed(6), te=False)
    off.unet["down_blocks.9.nothing"] = next(iter(off.unet.values()))
    with pytest.raises(ValueError, match="down_blocks.9.nothing: no such module"), O.applied(unet, [(off, 1.0)]):
        pass
    assert all(torch.equal(unet.state_dict()[k], before[k]) for k in before)


# ---------------------------------------------------------------- extraction and diffs
def test_extract_lora_error_decreases_with_rank():
    g = torch.Generator().manual_seed(7)
    w = torch.randn(24, 6, generator=g) @ torch.randn(6, 20, generator=g) + 0.01 * torch.randn(24, 20, generator=g)
    conv = torch.randn(16, 8, 3, 3, generator=g)
    dense = Offset(unet={"lin": DenseDelta(w), "conv": DenseDelta(conv), "norm": DenseDelta(torch.randn(16, generator=g))})
    errs = []
    for r in (1, 2, 4, 8):
        lr, rep = O.extract_lora(dense, r)
        assert lr.unet["conv"].down.shape == (r, 8, 3, 3) and lr.unet["conv"].up.shape == (16, r, 1, 1)
        actual = ((lr.unet["lin"].dense() - w).pow(2).sum() + (lr.unet["conv"].dense() - conv).pow(2).sum()).sqrt()
        assert rep["overall"] == pytest.approx(float(actual / (w.pow(2).sum() + conv.pow(2).sum()).sqrt()), rel=1e-3)
        assert rep["dropped"] == ["unet:norm"] and "norm" not in lr.unet
        errs.append(rep["overall"])
    assert all(a > b for a, b in zip(errs, errs[1:])) and errs[-1] > 0
    full, rep = O.extract_lora(dense, 20, conv_rank=72, keep_dense=True)
    assert rep["overall"] < 1e-5 and max(rep["modules"].values()) < 1e-5
    torch.testing.assert_close(full.unet["lin"].dense(), w, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(full.unet["conv"].dense(), conv, atol=1e-4, rtol=1e-4)
    assert isinstance(full.unet["norm"], DenseDelta)
    _, rep6 = O.extract_lora(dense, 6)
    assert rep6["modules"]["unet:lin"] < 0.01  # rank-6 signal + small noise


def test_full_unet_diff(sd15_dir, tmp_path):
    from safetensors.torch import save_file

    pipe = load_sd15(sd15_dir)
    base = pipe.unet
    tuned = copy.deepcopy(base)
    g = torch.Generator().manual_seed(8)
    with torch.no_grad():
        for n, p in tuned.named_parameters():
            if "attn2" in n or "conv1" in n or n.startswith("conv_norm_out"):
                p.add_(0.01 * torch.randn(p.shape, generator=g))
    want = _unet_out(tuned, pipe)
    prefixes = unet_block_prefixes(base.config)
    sd = {k: v.contiguous() for k, v in tuned.state_dict().items()}
    ldm = {"model.diffusion_model." + diffusers_to_ldm(k.rsplit(".", 1)[0], prefixes) + "." + k.rsplit(".", 1)[1]: v
           for k, v in sd.items()}
    for name, tensors in (("diffusers", sd), ("ldm", ldm)):
        f = tmp_path / f"tuned_{name}.safetensors"
        save_file(tensors, str(f))
        off = O.load_offset(f, base=base)
        assert off.report.format == "full_unet" and all(isinstance(d, DenseDelta) for d in off.unet.values())
        assert "conv_norm_out" in off.unet and "conv_in" not in off.unet  # unchanged modules are left out
        with O.applied(base, [(off, 1.0)]):
            assert _max_rel(_unet_out(base, pipe), want) <= 1e-5
        with pytest.raises(ValueError, match=rf"{f.name}.*full UNet.*pass base="):
            O.load_offset(f)
    off2 = O.diff_between(tuned, base)
    _assert_same_deltas(off, off2)
    saved = tmp_path / "diff.safetensors"
    O.save_offset(off2, saved, format="diff", base=pipe)
    _assert_same_deltas(off2, O.load_offset(saved, base=pipe))
    with pytest.raises(ValueError, match="dense.*extract_lora"):
        O.save_offset(off2, tmp_path / "no.safetensors")


def test_model_hash(sd15):
    unet = sd15.unet
    h = O.model_hash(unet)
    assert len(h) == 64 and h == O.model_hash(unet.state_dict())
    assert O.model_hash({k: v.half() for k, v in unet.state_dict().items()}) == h
    sd = dict(unet.state_dict())
    sd["conv_in.weight"] = sd["conv_in.weight"] + 1.0
    assert O.model_hash(sd) != h


# ---------------------------------------------------------------- bad input
def test_bad_inputs_name_the_file(sd15, sdxl, tmp_path):
    missing = tmp_path / "missing.safetensors"
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        O.load_offset(missing)
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="empty.safetensors.*empty"):
        O.load_offset(empty)
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(ValueError, match="corrupt.safetensors.*not a readable safetensors"):
        O.load_offset(corrupt)
    from safetensors.torch import save_file

    no_tensors = tmp_path / "none.safetensors"
    save_file({}, str(no_tensors))
    with pytest.raises(ValueError, match="none.safetensors.*no tensors"):
        O.load_offset(no_tensors)

    off = _offset_for(sd15, torch.Generator().manual_seed(9), te=False)
    sd = O.offset_to_state_dict(off, base=sd15)
    pkl = tmp_path / "lora.ckpt"
    torch.save(sd, pkl)
    with pytest.raises(ValueError, match="lora.ckpt.*allow_pickle=True"):
        O.load_offset(pkl, base=sd15)
    _assert_same_deltas(off, O.load_offset(pkl, base=sd15, allow_pickle=True))

    # unmatched keys: strict raises with the list, non-strict reports them
    extra = dict(sd)
    extra["lora_unet_no_such_block_to_q.lora_down.weight"] = torch.zeros(2, 4)
    extra["lora_unet_no_such_block_to_q.lora_up.weight"] = torch.zeros(4, 2)
    f = tmp_path / "extra.safetensors"
    save_file(extra, str(f))
    with pytest.raises(ValueError, match=r"extra.safetensors: 2 key\(s\) match no module.*no_such_block"):
        O.load_offset(f, base=sd15)
    loose = O.load_offset(f, base=sd15, strict=False)
    assert sorted(loose.report.unmatched_keys) == sorted(k for k in extra if "no_such" in k)
    _assert_same_deltas(off, loose)

    # half a LoRA
    half = {k: v for k, v in sd.items() if not k.endswith("lora_up.weight")}
    f = tmp_path / "half.safetensors"
    save_file(half, str(f))
    with pytest.raises(ValueError, match="half.safetensors: incomplete LoRA"):
        O.load_offset(f, base=sd15)

    # an SDXL LoRA on an SD1.x model fails loudly, naming both families
    xl = _offset_for(sdxl, torch.Generator().manual_seed(10))
    f = tmp_path / "sdxl_lora.safetensors"
    O.save_offset(xl, f, base=sdxl)
    with pytest.raises(ValueError, match=r"sdxl_lora.safetensors.*looks like SDXL but the model is SD1\.x"):
        O.load_offset(f, base=sd15)
    with pytest.raises(ValueError, match="npo_role"):
        O.save_offset(off, tmp_path / "r.safetensors", metadata={"npo_role": "evil"})


# ---------------------------------------------------------------- CLI
def test_cli_inspect_convert_extract_merge(sd15_dir, tmp_path, capsys):
    from npo_suite.cli import main

    pipe = load_sd15(sd15_dir)
    off = _offset_for(pipe, torch.Generator().manual_seed(11), tucker=False)
    f = tmp_path / "neg.safetensors"
    O.save_offset(off, f, base=pipe, metadata={"npo_role": "negative"})
    assert main(["offsets", "inspect", str(f), "--base", str(sd15_dir), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "kohya" and info["family"] == "sd1" and info["matched"] == len(off.unet) + len(TE)
    assert info["metadata"]["npo_role"] == "negative"

    g = tmp_path / "neg_peft.safetensors"
    assert main(["offsets", "convert", str(f), str(g), "--format", "peft", "--base", str(sd15_dir)]) == 0
    _assert_same_deltas(off, O.load_offset(g, base=pipe))

    out_dir = tmp_path / "merged"
    assert main(["offsets", "merge", "--base", str(sd15_dir), "--offset", f"{f}:0.5", "--out", str(out_dir)]) == 0
    merged = load_sd15(out_dir)
    from_file = O.load_offset(f, base=pipe)  # kohya alphas are unified on save: compare with what the file holds
    want_unet = O.materialize(pipe.unet, [(from_file, 0.5)])
    for k, v in want_unet.state_dict().items():
        torch.testing.assert_close(merged.unet.state_dict()[k], v, rtol=0, atol=0)
    want_te = O.merged_state_dict(pipe.text_encoder, [(from_file, 0.5)], "te1")
    got_te = merged.text_encoder.state_dict()
    for k, v in want_te.items():
        torch.testing.assert_close(got_te[k], v, rtol=0, atol=0)
    q = O.module_for_path(merged.text_encoder, TE[0]).weight
    assert not torch.equal(q, O.module_for_path(pipe.text_encoder, TE[0]).weight)

    lora_out = tmp_path / "extracted.safetensors"
    capsys.readouterr()
    assert main(["offsets", "extract", "--tuned", str(out_dir), "--base", str(sd15_dir), "--rank", "4",
                 "--out", str(lora_out), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["overall"] < 1e-4  # the merged LoRA ranks are <= 4: exact at rank 4
    ext = O.load_offset(lora_out, base=pipe)
    for p, d in off.unet.items():
        torch.testing.assert_close(ext.unet[p].dense(), 0.5 * d.dense(), atol=1e-5, rtol=1e-4)
    assert main(["offsets", "inspect", str(tmp_path / "nope.safetensors")]) == 2
    assert "nope.safetensors" in capsys.readouterr().err


def test_coverage_line_reports_what_applies():
    """The one report line shared by the ComfyUI nodes and the WebUI panel."""
    import torch

    from npo_suite.core.offsets.types import LoadReport, LowRankDelta, Offset, coverage_line

    d = LowRankDelta(torch.zeros(1, 2), torch.zeros(2, 1))
    off = Offset(unet={"a": d, "b": d}, text_encoders={"te1": {"q": d}},
                 report=LoadReport(path="x.safetensors", format="kohya", family="sd1", matched=3))
    line = coverage_line(off, 1, ["b"], "negative δ")
    assert line.startswith("negative δ: x.safetensors: kohya (sd1), 3 modules")
    assert "1/2 UNet modules apply to this model, 1 do not (e.g. b)" in line
    assert "1 text-encoder modules ignored" in line
    assert coverage_line(None, 0, (), "positive η") == "positive η: none"
    assert coverage_line(Offset(unet={"a": d}), 1, (), "eta") == "eta: 1/1 UNet modules apply to this model"


# ---------------------------------------------------------------------------------------------
# text-encoder parts on a ComfyUI CLIP (core.offsets.keys.comfy_clip_deltas; NPO Negative CLIP)
# ---------------------------------------------------------------------------------------------
def _comfy_clip_shapes(family: str) -> dict:
    """{module path: shape} as a ComfyUI CLIP's cond_stage_model names them (comfy/sd1_clip.py,
    sdxl_clip.py: `clip_l.transformer.<transformers-4.x path>`, SDXL adds `clip_g.transformer.`),
    built from the standard architectures' real module names and shapes."""
    out = {f"clip_l.transformer.{p}": s for p, s in Target.standard(family, "te1").shapes.items()}
    if family == "sdxl":
        out.update({f"clip_g.transformer.{p}": s for p, s in Target.standard("sdxl", "te2").shapes.items()})
    return out


def _te_offset(family: str, tmp_path, g) -> Offset:
    """A kohya file with UNet + text-encoder LoRAs (lora_te_ for SD1.x, lora_te1_/lora_te2_ for SDXL), loaded back."""
    te1 = Target.standard(family, "te1").shapes
    tes = {"te1": {p: _rand_lora(te1[p], 2, g) for p in TE}}
    if family == "sdxl":
        te2 = Target.standard("sdxl", "te2").shapes
        tes["te2"] = {p: _rand_lora(te2[p], 2, g) for p in (*TE, "text_model.encoder.layers.31.mlp.fc2")}
    unet = Target.standard(family, "unet").shapes
    blk = "down_blocks.1" if family == "sdxl" else "down_blocks.0"
    off = Offset(unet={f"{blk}.{p}": _rand_lora(unet[f"{blk}.{p}"], 2, g) for p in UNET_LINEAR[:2]}, text_encoders=tes)
    path = O.save_offset(off, tmp_path / f"{family}_te.safetensors", format="kohya", family=family)
    keys = set(__import__("safetensors.torch", fromlist=["load_file"]).load_file(str(path)))
    prefix = ("lora_te1_", "lora_te2_") if family == "sdxl" else ("lora_te_",)
    assert any(k.startswith(prefix[-1]) for k in keys) and any(k.startswith(prefix[0]) for k in keys)
    return O.load_offset(path)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_comfy_clip_deltas_map_kohya_te_keys(family, tmp_path):
    from npo_suite.core.offsets.keys import comfy_clip_deltas, comfy_clip_layout

    g = torch.Generator().manual_seed(0)
    off = _te_offset(family, tmp_path, g)
    shapes = _comfy_clip_shapes(family)
    layout = comfy_clip_layout(shapes)
    assert layout == ({"te1": "clip_l.transformer.", "te2": "clip_g.transformer."} if family == "sdxl"
                      else {"te1": "clip_l.transformer."})
    km = comfy_clip_deltas(off.text_encoders, shapes)
    assert not km.unmatched
    assert km.coverage["te1"] == (3, 3)
    assert "clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj" in km.modules
    assert "clip_l.transformer.text_model.encoder.layers.1.mlp.fc1" in km.modules
    if family == "sdxl":
        assert km.coverage["te2"] == (4, 4)
        k = "clip_g.transformer.text_model.encoder.layers.31.mlp.fc2"
        assert km.modules[k] is off.text_encoders["te2"]["text_model.encoder.layers.31.mlp.fc2"]
        assert tuple(km.modules[k].dense().shape) == shapes[k]
    else:
        assert not any(k.startswith("clip_g.") for k in km.modules)
    for key, d in km.modules.items():  # every delta has the shape of the weight it patches
        assert tuple(d.dense().shape) == shapes[key]


def test_comfy_clip_deltas_refuse_wrong_family_and_report(tmp_path):
    from npo_suite.core.offsets.keys import clip_coverage_line, comfy_clip_deltas

    g = torch.Generator().manual_seed(1)
    sdxl = _te_offset("sdxl", tmp_path, g)
    with pytest.raises(ValueError, match=r"te2.*SD1\.x CLIP \(clip_l only\)"):
        comfy_clip_deltas(sdxl.text_encoders, _comfy_clip_shapes("sd1"))
    # te1 deltas of CLIP-G width on a CLIP-L: nothing fits -> a clear error, not a silent no-op
    wide = {"te1": {p: d for p, d in sdxl.text_encoders["te2"].items()}}
    with pytest.raises(ValueError, match="none of the offset's 4 te1 modules fit an SD1.x CLIP"):
        comfy_clip_deltas(wide, _comfy_clip_shapes("sd1"))
    # partly fitting: the misfits are listed, the rest applies
    mixed = {"te1": {**sdxl.text_encoders["te1"], "text_model.encoder.layers.12.mlp.fc1": sdxl.text_encoders["te1"][TE[2]]}}
    km = comfy_clip_deltas(mixed, _comfy_clip_shapes("sd1"))
    assert km.coverage == {"te1": (3, 4)} and km.unmatched == ["te1:text_model.encoder.layers.12.mlp.fc1"]
    line = clip_coverage_line(Offset(text_encoders=mixed), km, "negative δ", 0.5)
    assert line.startswith("negative δ x 0.5: 3/4 text-encoder modules apply (te1 3/4), 1 do not")
    unet_only = Offset(unet={"a": LowRankDelta(torch.zeros(1, 2), torch.zeros(2, 1))})
    assert "no text-encoder part" in clip_coverage_line(unet_only, comfy_clip_deltas({}, {}), "negative δ", 1.0)
    assert clip_coverage_line(None, None, "positive η", 0.0) == "positive η: none"
    assert clip_coverage_line(Offset(text_encoders=mixed), km, "positive η", 0.0).endswith("weight 0: not applied")


def test_coverage_line_text_encoder_note():
    from npo_suite.core.offsets.types import LowRankDelta, Offset, coverage_line

    d = LowRankDelta(torch.zeros(1, 2), torch.zeros(2, 1))
    off = Offset(unet={"a": d}, text_encoders={"te1": {"q": d, "k": d}})
    assert coverage_line(off, 1, (), "δ").endswith("; 2 text-encoder modules ignored (sampling offsets act on the UNet)")
    assert coverage_line(off, 1, (), "δ", te_note="apply via X").endswith("; 2 text-encoder modules apply via X")


def test_comfy_clip_layout_names_every_comfyui_clip_kind():
    from npo_suite.core.offsets.keys import comfy_clip_layout, describe_clip_layout

    q = "transformer.text_model.encoder.layers.0.self_attn.q_proj"
    cases = {("clip_l",): ({"te1": "clip_l.transformer."}, "an SD1.x CLIP (clip_l only)"),
             ("clip_l", "clip_g"): ({"te1": "clip_l.transformer.", "te2": "clip_g.transformer."},
                                    "an SDXL CLIP (clip_l + clip_g)"),
             ("clip_h",): ({"te1": "clip_h.transformer."}, "an SD2.x CLIP (clip_h only)"),
             ("clip_g",): ({"te2": "clip_g.transformer."}, "a CLIP (clip_g only)")}  # SDXL refiner
    for heads, (layout, text) in cases.items():
        got = comfy_clip_layout([f"{h}.{q}" for h in heads] + ["logit_scale"])
        assert got == layout and describe_clip_layout(got) == text


# ---------------------------------------------------------------- metadata schema (issue 13)
def test_metadata_schema_one_spelling_old_files_still_read(sd15, tmp_path):
    from npo_suite.core.offsets.schema import metadata_lines, npo_metadata, read_npo_metadata

    assert npo_metadata(role="snpo", beta=2000.0, steps=10, method=None) == {
        "npo_role": "snpo", "npo_beta": "2000", "npo_steps": "10"}
    with pytest.raises(ValueError, match="npo_role must be one of"):
        npo_metadata(role="evil")
    # a file the trainer wrote before the schema: npo_suite.<field>, still read; npo_* wins over it
    old = {"npo_suite.role": "negative", "npo_suite.method": "npo", "npo_suite.beta": "5000.0", "ss_network_dim": "4"}
    assert read_npo_metadata(old) == {"role": "negative", "method": "npo", "beta": "5000.0"}
    assert read_npo_metadata({**old, "npo_role": "snpo"})["role"] == "snpo"
    assert metadata_lines(old) == ["method: npo", "role: negative", "β: 5000.0"]
    assert metadata_lines({"npo_role": "evil"}) == ["role: evil (invalid: npo_role must be one of "
                                                    "('positive', 'negative', 'snpo'), got 'evil')"]
    # the validator runs on either spelling: an old file with a bad role is refused when re-saved
    off = _offset_for(sd15, torch.Generator().manual_seed(3), tucker=False, te=False)
    with pytest.raises(ValueError, match="r.safetensors: npo_role must be one of"):
        O.save_offset(off, tmp_path / "r.safetensors", metadata={"npo_suite.role": "evil"})


def test_inspect_without_base_checks_nothing_and_shows_metadata(tmp_path, capsys):
    """Issue 13: a LoRA of a model that is neither SD1.5 nor SDXL (the digits world's widths) is not
    refused by `offsets inspect` without --base; format, modules, ranks and metadata are shown."""
    from npo_suite.cli import main

    g = torch.Generator().manual_seed(0)
    blk = "down_blocks.0.attentions.0.transformer_blocks.0"
    off = Offset(unet={f"{blk}.attn1.{p}": LowRankDelta(torch.randn(2, 32, generator=g), torch.randn(32, 2, generator=g))
                       for p in ("to_q", "to_k", "to_v")})
    f = tmp_path / "world_lora.safetensors"
    O.save_offset(off, f, family="sd1", metadata={"npo_role": "negative", "npo_method": "npo"})
    with pytest.raises(ValueError, match="do not fit the model's weights"):
        O.load_offset(f)  # against the standard SD1.5 UNet (320 wide there)
    assert main(["offsets", "inspect", str(f), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "kohya" and info["matched"] == 3
    assert info["components"]["unet"] == {"modules": 3, "ranks": [2], "dense": 0}
    assert info["npo"] == {"role": "negative", "method": "npo"} and info["notes"] == ["names and shapes not checked: no model given"]
    assert main(["offsets", "inspect", str(f)]) == 0
    assert "role: negative" in capsys.readouterr().out


def test_model_hash_of_a_tensor_larger_than_float32_counts():
    """A tensor of 29,491,200 values (a ComfyUI SD1.5 UNet has such): float32 linspace rounded the last
    position up to n and indexed out of bounds."""
    big = torch.zeros(29_491_200, dtype=torch.float16)
    big[-1] = 1.0
    h = O.model_hash({"w": big})
    big[-1] = 2.0
    assert O.model_hash({"w": big}) != h  # the last value is sampled
