"""Tiny flow-matching DiT models and a tiny CLIP for the real-ComfyUI tests, built offline from
ComfyUI's own classes (nothing downloaded): SD3 (an MMDiT that ComfyUI's detection recognises:
hidden width 64·depth, 16 latent channels), Flux (ComfyUI's detection fixes Flux's widths at
3072, so the model is built through `comfy.supported_models.Flux` with small dimensions) and Wan 2.1
(`comfy.supported_models.WAN21_T2V`, small dimensions and a 32-wide text embedding).

ComfyUI's layers skip weight init, so every weight is filled explicitly (matrices N(0, std),
norm weights 1, biases 0). The CLIP is a 2-layer, 32-wide CLIP-L-shaped `comfy.sd1_clip` model with
ComfyUI's own CLIP tokenizer files; its 32-wide outputs are the text width of the three models.
"""
from __future__ import annotations

import types

import torch

TEXT = 32  # width of the tiny CLIP = context / pooled width of the tiny models


def random_state_dict(module: torch.nn.Module, seed: int, std: float = 0.05) -> dict:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, p in module.state_dict().items():
        if not p.is_floating_point():
            sd[name] = p.clone()
        elif p.ndim >= 2:
            sd[name] = torch.randn(p.shape, generator=g) * std
        elif name.endswith(("weight", "scale")):
            sd[name] = torch.ones(p.shape)
        else:
            sd[name] = torch.randn(p.shape, generator=g) * 0.01
    return sd


def _patcher(model):
    import comfy.model_management
    import comfy.model_patcher

    dev = comfy.model_management.get_torch_device()
    return comfy.model_patcher.ModelPatcher(model, load_device=dev, offload_device=comfy.model_management.unet_offload_device())


SD3_CONFIG = dict(patch_size=2, in_channels=16, out_channels=16, adm_in_channels=TEXT, num_patches=256,
                  pos_embed_max_size=16, pos_embed_scaling_factor=None, x_block_self_attn_layers=[],
                  context_embedder_config={"target": "torch.nn.Linear", "params": {"in_features": TEXT, "out_features": 128}})


def sd3_state_dict(depth: int = 2, seed: int = 0, pos_embed_max_size: int = 16) -> dict:
    """Random SD3-layout MMDiT weights (`depth` joint blocks, width 64·depth), as a diffusion-model file holds them
    (`pos_embed_max_size` patches per side: latents up to 2x that)."""
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.mmdit import MMDiT

    cfg = dict(SD3_CONFIG, pos_embed_max_size=pos_embed_max_size, num_patches=pos_embed_max_size ** 2, context_embedder_config={"target": "torch.nn.Linear",
                                                    "params": {"in_features": TEXT, "out_features": 64 * depth}})
    m = MMDiT(input_size=None, depth=depth, operations=comfy.ops.disable_weight_init, device="cpu", **cfg)
    sd = random_state_dict(m, seed)
    del m
    return sd


def tiny_sd3(depth: int = 2, seed: int = 0, pos_embed_max_size: int = 16):
    """A ModelPatcher of a random SD3 MMDiT loaded through ComfyUI's own detection (fp32)."""
    import comfy.sd

    mp = comfy.sd.load_diffusion_model_state_dict(sd3_state_dict(depth, seed, pos_embed_max_size), {"dtype": torch.float32})
    if mp is None or type(mp.model).__name__ != "SD3":
        raise AssertionError(f"ComfyUI did not detect the tiny MMDiT as SD3 (got {None if mp is None else type(mp.model)})")
    return mp


FLUX_CONFIG = dict(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=TEXT, context_in_dim=TEXT,
                   hidden_size=64, mlp_ratio=4.0, num_heads=2, depth=2, depth_single_blocks=2, axes_dim=[8, 12, 12],
                   theta=10000, patch_size=2, qkv_bias=True, guidance_embed=True)

WAN_CONFIG = dict(image_model="wan2.1", model_type="t2v", patch_size=(1, 2, 2), text_len=512, in_dim=16, dim=64,
                  ffn_dim=128, freq_dim=256, text_dim=TEXT, out_dim=16, num_heads=2, num_layers=2,
                  window_size=(-1, -1), qk_norm=True, cross_attn_norm=True, eps=1e-6)


def _from_supported(config_cls, unet_config: dict, seed: int):
    cfg = config_cls(dict(unet_config))
    cfg.set_inference_dtype(torch.float32, None)
    model = cfg.get_model({})
    missing, unexpected = model.diffusion_model.load_state_dict(random_state_dict(model.diffusion_model, seed),
                                                                strict=True)
    assert not missing and not unexpected
    return _patcher(model)


def tiny_flux(seed: int = 0, guidance_embed: bool = True):
    import comfy.supported_models

    return _from_supported(comfy.supported_models.Flux, dict(FLUX_CONFIG, guidance_embed=guidance_embed), seed)


def tiny_wan(seed: int = 0):
    import comfy.supported_models

    return _from_supported(comfy.supported_models.WAN21_T2V, WAN_CONFIG, seed)


CLIP_CONFIG = {"architectures": ["CLIPTextModel"], "attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0,
               "eos_token_id": 49407, "hidden_act": "quick_gelu", "hidden_size": TEXT, "initializer_factor": 1.0,
               "initializer_range": 0.02, "intermediate_size": 64, "layer_norm_eps": 1e-05,
               "max_position_embeddings": 77, "model_type": "clip_text_model", "num_attention_heads": 2,
               "num_hidden_layers": 2, "pad_token_id": 1, "projection_dim": TEXT, "torch_dtype": "float32",
               "vocab_size": 49408}


def tiny_clip(seed: int = 0):
    """A real `comfy.sd.CLIP` (SD1 CLIP-L code path, ComfyUI's tokenizer) with a 2-layer 32-wide random encoder."""
    import comfy.sd
    import comfy.sd1_clip

    class TinyClip(comfy.sd1_clip.SD1ClipModel):
        def __init__(self, device="cpu", dtype=None, model_options={}, **kw):
            super().__init__(device=device, dtype=dtype, model_options=model_options,
                             clip_model=comfy.sd1_clip.SDClipModel, textmodel_json_config=dict(CLIP_CONFIG), **kw)

    target = types.SimpleNamespace(clip=TinyClip, tokenizer=comfy.sd1_clip.SD1Tokenizer, params={})
    clip = comfy.sd.CLIP(target, model_options={"dtype": torch.float32})
    sd = random_state_dict(clip.cond_stage_model, seed, std=0.2)
    # keys of the whole cond_stage_model ("clip_l.transformer..."): `load_sd(sd)` without full_model
    # would hand them to the inner transformer, match none (strict=False) and leave every weight unset
    missing, unexpected = clip.load_sd(sd, full_model=True)
    if missing or unexpected:
        raise AssertionError(f"tiny CLIP: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return clip


def encode(clip, text: str) -> list:
    """CLIPTextEncode's conditioning."""
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))


def linear_modules(model_patcher, prefixes: tuple[str, ...]) -> dict[str, tuple[int, int]]:
    """{module path: (out, in)} of every 2-D weight inside the diffusion model under `prefixes`."""
    out = {}
    for k, v in model_patcher.model.diffusion_model.state_dict().items():
        if k.endswith(".weight") and v.ndim == 2 and k.startswith(prefixes):
            out[k[: -len(".weight")]] = tuple(v.shape)
    return out


def kohya_lora(modules: dict, seed: int, rank: int = 2, std: float = 0.2, alpha: float = 1.0) -> dict:
    """A kohya LoRA file (lora_unet_<path_with_underscores>.lora_down/up.weight + .alpha) over `modules`."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for path, (o, i) in modules.items():
        k = "lora_unet_" + path.replace(".", "_")
        sd[f"{k}.lora_down.weight"] = torch.randn(rank, i, generator=g) * std
        sd[f"{k}.lora_up.weight"] = torch.randn(o, rank, generator=g) * std
        sd[f"{k}.alpha"] = torch.tensor(float(alpha))
    return sd


def peft_lora(model_patcher, key_prefix: str, seed: int, rank: int = 2, std: float = 0.1) -> dict:
    """A PEFT-suffixed LoRA (`<name>.lora_A.weight` / `.lora_B.weight`) over every key of ComfyUI's
    key map that starts with `key_prefix` ("transformer." = diffusers names; for Flux these include
    the slices of the fused qkv / linear1 projections)."""
    import comfy.lora

    km = comfy.lora.model_lora_keys_unet(model_patcher.model, {})
    shapes = {k: tuple(v.shape) for k, v in model_patcher.model.state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, target in sorted(km.items()):
        if not name.startswith(key_prefix):
            continue
        wkey, sl = (target[0], target[1]) if isinstance(target, tuple) else (target, None)
        if not wkey.endswith(".weight") or len(shapes.get(wkey, ())) != 2:
            continue
        o, i = shapes[wkey]
        if sl is not None:
            o = sl[2]
        sd[f"{name}.lora_A.weight"] = torch.randn(rank, i, generator=g) * std
        sd[f"{name}.lora_B.weight"] = torch.randn(o, rank, generator=g) * std
    return sd


# ---------------------------------------------------------------------------------------------
# diffusers-format transformers with widths ComfyUI's converter and detection accept
# ---------------------------------------------------------------------------------------------
# SD3: ComfyUI reads depth = pos_embed width / 64 and heads = depth, so width 64·depth with 64-wide
# heads; 16 latent channels (ComfyUI's SD3 config), the tiny pipeline's text widths (T5 64, pooled 32+32).
SD3_DIFFUSERS = dict(sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=64,
                     num_attention_heads=2, joint_attention_dim=64, caption_projection_dim=128,
                     pooled_projection_dim=64, pos_embed_max_size=16)
# Flux: ComfyUI's detection fixes the widths at Flux's (3072, 24 heads), so the tiny one is loaded
# through `comfy.supported_models.Flux` with this config (`FLUX_FROM_DIFFUSERS`) after ComfyUI's own
# diffusers-to-Flux key conversion. 16 latent channels packed 2x2 (diffusers in_channels 64).
FLUX_DIFFUSERS = dict(patch_size=1, in_channels=64, out_channels=None, num_layers=2, num_single_layers=2,
                      attention_head_dim=32, num_attention_heads=2, joint_attention_dim=64, pooled_projection_dim=32,
                      guidance_embeds=True, axes_dims_rope=(8, 12, 12))
FLUX_FROM_DIFFUSERS = dict(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=32, context_in_dim=64,
                           hidden_size=64, mlp_ratio=4.0, num_heads=2, depth=2, depth_single_blocks=2,
                           axes_dim=[8, 12, 12], theta=10000, patch_size=2, qkv_bias=True, guidance_embed=True)


def comfy_from_diffusers_transformer(state_dict: dict, family: str):
    """A ModelPatcher of a diffusers SD3 / Flux transformer state dict, as ComfyUI loads it (fp32).

    SD3: `comfy.sd.load_diffusion_model_state_dict` (ComfyUI converts the diffusers keys and detects
    the model). Flux: ComfyUI's converter `comfy.model_detection.convert_diffusers_mmdit`, then the
    weights into `comfy.supported_models.Flux(FLUX_FROM_DIFFUSERS)` with strict key matching (the
    detection would assume Flux's full widths)."""
    import comfy.model_detection
    import comfy.sd
    import comfy.supported_models

    sd = {k: v.clone() for k, v in state_dict.items()}
    if family == "sd3":
        mp = comfy.sd.load_diffusion_model_state_dict(sd, {"dtype": torch.float32})
        if mp is None or type(mp.model).__name__ != "SD3":
            raise AssertionError(f"ComfyUI did not load the diffusers SD3 transformer as SD3 (got {mp})")
        return mp
    converted = comfy.model_detection.convert_diffusers_mmdit(sd, "")
    if converted is None:
        raise AssertionError("ComfyUI's converter did not recognise the diffusers Flux transformer")
    cfg = comfy.supported_models.Flux(dict(FLUX_FROM_DIFFUSERS))
    cfg.set_inference_dtype(torch.float32, None)
    model = cfg.get_model({})
    missing, unexpected = model.diffusion_model.load_state_dict(converted, strict=False)
    if missing or unexpected:
        raise AssertionError(f"converted Flux weights: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return _patcher(model)


def tiny_vae16(seed: int = 0):
    """A real `comfy.sd.VAE` with 16 latent channels (SD3 / Flux latents): ComfyUI's TAESD architecture
    (the small one its VAE loader detects from `taesd_decoder.1.weight`), random weights, 8x down-sampling."""
    import comfy.sd
    import comfy.taesd.taesd

    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, p in comfy.taesd.taesd.TAESD(latent_channels=16).state_dict().items():
        # weights N(0, 1/fan_in): a deep random conv stack keeps unit scale (a fixed std blows up to ~1e7)
        # (x0.8: each residual block adds its input back); biases 0, vae_scale 1, vae_shift 0
        sd[k] = (torch.randn(p.shape, generator=g) * 0.8 / p[0].numel() ** 0.5 if p.ndim >= 2 else
                 torch.ones(p.shape) if k == "vae_scale" else torch.zeros(p.shape))
    return comfy.sd.VAE(sd=sd)
