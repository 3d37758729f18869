"""The ComfyUI DiT node's memory estimate without ComfyUI: ComfyUI's model config (`unet_config`, as
comfy/model_detection.py reads it from a checkpoint) mapped to diffusers' transformer config, the refusals
naming the field that does not map, and the host-encoded trace (no text encoders, no VAE: ComfyUI's) against
the same step on real tensors."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from npo_suite.nodes.comfy.memory import transformer_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
# what ComfyUI's detection gives for the SD3.5 medium and FLUX.1-dev checkpoints (comfy/model_detection.py:
# mmdit and flux branches; supported_models.SD3 / Flux class configs and `set_inference_dtype` merged in)
SD35M = dict(in_channels=16, patch_size=2, out_channels=16, depth=24, input_size=None, adm_in_channels=2048,
             context_embedder_config={"target": "torch.nn.Linear", "params": {"in_features": 4096, "out_features": 1536}},
             num_patches=384 * 384, pos_embed_max_size=384, qk_norm="rms", pos_embed_scaling_factor=None,
             x_block_self_attn_layers=list(range(13)), dtype="bfloat16")
FLUX_DEV = dict(image_model="flux", in_channels=16, patch_size=2, out_channels=16, vec_in_dim=768, context_in_dim=4096,
                hidden_size=3072, mlp_ratio=4.0, num_heads=24, depth=19, depth_single_blocks=38, axes_dim=[16, 56, 56],
                theta=10000, qkv_bias=True, guidance_embed=True, dtype="bfloat16")


def _shipped(name):
    return json.loads((CONFIGS / name / "transformer" / "config.json").read_text())


def test_sd35m_maps_to_the_shipped_diffusers_config():
    assert transformer_config("SD3", SD35M) == _shipped("sd35m")


def test_flux_dev_maps_to_the_shipped_diffusers_config():
    got, want = transformer_config("Flux", FLUX_DEV), _shipped("flux1dev")
    assert got.pop("out_channels") == want["in_channels"]  # diffusers' default (None) is in_channels
    assert got == want
    assert transformer_config("Flux", dict(FLUX_DEV, guidance_embed=False))["guidance_embeds"] is False  # schnell


@pytest.mark.parametrize("cls,base,field,value", [
    ("SD3", SD35M, "swiglu", True),
    ("SD3", SD35M, "context_processor_layers", 2),
    ("SD3", SD35M, "register_length", 4),
    ("SD3", SD35M, "qk_norm", "ln"),
    ("SD3", SD35M, "num_patches", 100),
    ("SD3", SD35M, "adm_in_channels", None),
    ("SD3", SD35M, "a_new_comfy_field", 1),
    ("Flux", FLUX_DEV, "mlp_ratio", 3.0),
    ("Flux", FLUX_DEV, "image_model", "chroma"),
    ("Flux", FLUX_DEV, "theta", 2000),
    ("Flux", FLUX_DEV, "axes_dim", [16, 56, 48]),
    ("Flux", FLUX_DEV, "txt_norm", True),
])
def test_a_field_that_does_not_map_is_refused_by_name(cls, base, field, value):
    with pytest.raises(ValueError, match=f"field {field}="):
        transformer_config(cls, dict(base, **{field: value}))


def test_other_model_classes_are_refused():
    with pytest.raises(ValueError, match="no diffusers transformer mapping for ComfyUI model class 'WAN21'"):
        transformer_config("WAN21", {})


def test_host_encoded_trace_matches_the_real_step():
    """The trace of a mapped tiny SD3 with the host's shapes (77 CLIP tokens of width 32, 8x8 latents), fake
    tensors against the same run on real tensors (`measure_run`: the CPU allocator): the same ops, so the same
    peak up to kernels' scratch buffers (rel 0.15, as test_memory_estimate.py). The working set beyond the base
    weights is the step's, not the text encoders' or the VAE's (none is built: base = the transformer)."""
    import torch

    from npo_suite.trainer.config import TrainConfig
    from npo_suite.trainer.memory_estimate import HostEncoded, ModelConfigs, estimate_run, measure_run

    tiny = dict(SD35M, depth=2, adm_in_channels=32, num_patches=256, pos_embed_max_size=16, x_block_self_attn_layers=[1],
                context_embedder_config={"target": "torch.nn.Linear", "params": {"in_features": 32, "out_features": 128}})
    unet = transformer_config("SD3", tiny)
    mc = ModelConfigs("sd3", Path("."), unet, [], None, {"_class_name": "FlowMatchEulerDiscreteScheduler"}, "tiny")
    host = HostEncoded((77, 32), {"pooled_projections": (32,)}, (16, 8, 8))
    cfg = TrainConfig(method="snpo", resolution=64, batch_size=1, lora_rank=2, cache_dir="c")
    est = estimate_run(cfg, mc, device="cpu", host=host)
    meas = measure_run(cfg, mc, device="cpu", host=host)
    assert est.peak_gib == pytest.approx(meas["allocator_peak_gib"], rel=0.15)
    import diffusers

    with torch.device("meta"):
        n = sum(p.numel() for p in diffusers.SD3Transformer2DModel.from_config(unet).parameters())
    pos = 256 * 128  # the sin-cos `pos_embed` buffer
    assert est.base_weights_gib == pytest.approx((n + pos) * 4 / 2**30, abs=1e-4)  # the transformer alone
    assert 0 < est.beyond_base_bytes < est.peak_gib * 2**30 and est.settings["host_encoded"] is True
    assert est.settings["fill_images"] == 0 and "host-encoded" in " ".join(est.notes)
    with pytest.raises(ValueError, match="denoiser's config alone"):
        estimate_run(cfg, "sd35m", device="cpu", host=host)


def test_memory_estimate_for_a_flow_backend_takes_no_other_model():
    from npo_suite.nodes.comfy.memory import memory_estimate_for
    from npo_suite.trainer.config import TrainConfig

    b = type("B", (), {"prediction_type": "flow", "family": "sd3"})()
    with pytest.raises(ValueError, match="traced on the config of the model ComfyUI loaded"):
        memory_estimate_for(b, TrainConfig(), model="sd35m")
