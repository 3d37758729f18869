"""Offsets read with the file's own key names (core/offsets/read.py `load_offset_file_keys`): the
form the ComfyUI nodes resolve with ComfyUI's key map of the loaded model (SD3, Flux, Wan, ...)."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from npo_suite.core.offsets import load_offset_file_keys, offset_file_keys_from_state_dict
from npo_suite.core.offsets.types import DenseDelta, LowRankDelta


def test_every_spelling_keeps_its_key_prefix_and_scale():
    g = torch.Generator().manual_seed(0)
    sd = {
        "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.randn(2, 8, generator=g),
        "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.randn(24, 2, generator=g),
        "lora_unet_double_blocks_0_img_attn_qkv.alpha": torch.tensor(1.0),
        "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.randn(4, 8, generator=g),
        "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.randn(8, 4, generator=g),
        "diffusion_model.blocks.0.self_attn.q.lora_A.default.weight": torch.randn(2, 8, generator=g),
        "diffusion_model.blocks.0.self_attn.q.lora_B.default.weight": torch.randn(8, 2, generator=g),
        "diffusion_model.final_layer.linear.diff": torch.randn(4, 8, generator=g),
        "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.randn(2, 8, generator=g),
        "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.randn(8, 2, generator=g),
    }
    off = offset_file_keys_from_state_dict(sd, name="f", metadata={"npo_family": "flux"})
    assert off.file_keys
    assert set(off.unet) == {"lora_unet_double_blocks_0_img_attn_qkv", "transformer.transformer_blocks.0.attn.to_q",
                             "diffusion_model.blocks.0.self_attn.q", "diffusion_model.final_layer.linear"}
    kohya = off.unet["lora_unet_double_blocks_0_img_attn_qkv"]
    assert isinstance(kohya, LowRankDelta) and kohya.scale == pytest.approx(0.5)  # alpha 1 / rank 2
    assert off.unet["transformer.transformer_blocks.0.attn.to_q"].scale == 1.0  # no alpha: alpha = rank
    assert isinstance(off.unet["diffusion_model.final_layer.linear"], DenseDelta)
    assert off.report.family == "flux"
    assert any("2 text-encoder keys not read" in n for n in off.report.notes)


def test_refusals(tmp_path):
    with pytest.raises(ValueError, match="non-finite"):
        offset_file_keys_from_state_dict({"a.lora_down.weight": torch.tensor([[float("nan")]]),
                                          "a.lora_up.weight": torch.ones(1, 1)})
    with pytest.raises(ValueError, match="text-encoder keys only"):
        offset_file_keys_from_state_dict({"lora_te_x.lora_down.weight": torch.ones(1, 2),
                                          "lora_te_x.lora_up.weight": torch.ones(2, 1)})
    with pytest.raises(ValueError, match="not an offset"):
        offset_file_keys_from_state_dict({"double_blocks.0.img_attn.qkv.weight": torch.ones(2, 2)})
    p = tmp_path / "x.ckpt"
    torch.save({"a.lora_down.weight": torch.ones(1, 2)}, p)
    with pytest.raises(ValueError, match="pickle"):
        load_offset_file_keys(p)
    q = tmp_path / "ok.safetensors"
    save_file({"a.lora_down.weight": torch.ones(1, 2), "a.lora_up.weight": torch.ones(2, 1)}, str(q))
    assert set(load_offset_file_keys(q).unet) == {"a"}


def test_save_round_trip_names_the_family(tmp_path):
    from safetensors import safe_open

    from npo_suite.core.offsets import save_offset

    g = torch.Generator().manual_seed(1)
    off = offset_file_keys_from_state_dict({
        "diffusion_model.double_blocks.0.img_attn.qkv.lora_down.weight": torch.randn(2, 8, generator=g),
        "diffusion_model.double_blocks.0.img_attn.qkv.lora_up.weight": torch.randn(24, 2, generator=g),
        "diffusion_model.double_blocks.0.img_attn.qkv.alpha": torch.tensor(1.0)})
    with pytest.raises(ValueError, match="needs family"):
        save_offset(off, tmp_path / "x.safetensors")
    p = save_offset(off, tmp_path / "x.safetensors", family="flux", metadata={"npo_role": "negative"})
    with safe_open(str(p), "pt") as f:
        meta = f.metadata()
    assert meta["npo_family"] == "flux" and meta["ss_base_model_version"] == "flux"
    back = load_offset_file_keys(p)
    d0, d1 = off.unet["diffusion_model.double_blocks.0.img_attn.qkv"], back.unet["diffusion_model.double_blocks.0.img_attn.qkv"]
    assert torch.equal(d0.dense(), d1.dense()) and back.report.family == "flux"
