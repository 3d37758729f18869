"""The training working set a host that already holds the model (ComfyUI) must find free before the
first step: the traced estimate of `trainer.memory_estimate` (one real step on fake tensors, the same
estimator as `train --dry-run`), less the base weights the host accounts itself.

UNet (SD1.x / SDXL): traced on the shipped config of the backend's family. Flow DiT (SD3 / SD3.5, Flux):
traced on the diffusers transformer config of the model ComfyUI loaded (`transformer_config`, from
`model_config.unet_config`), host-encoded (`memory_estimate.HostEncoded`): ComfyUI's CLIP and VAE encode
the data before the first step and are ComfyUI's models, so the trace builds the transformer alone and
feeds the step the conditioning and latent shapes the backend's own encoders give.

Counted: the LoRA (and the method's ref / ema adapters), the optimizer state, the gradients and the
activations of one training step. Not counted, for both kinds alike: the text encoders and the VAE (ComfyUI
loads and unloads them; the UNet estimate counts them in its step and subtracts them again with the base
weights), the encoding of the data (before the reservation), text encoded during the steps (DDSPO's
rewritten prompts: ComfyUI's CLIP, no grad), the CUDA context and the allocator's slack.
"""
from __future__ import annotations

from dataclasses import dataclass

GIB = 2 ** 30


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes of the training working set beyond the loaded base weights, and the trace behind it."""

    total: int  # the training step's peak less the base weights: LoRA, adapters, optimizer state, grads, activations
    peak_gib: float  # the run's traced peak with the base weights (cache fill included)
    model: str  # the config traced: the backend's family's shipped config, the one given, or ComfyUI's model's

    def report(self) -> str:
        return (f"training memory estimate {self.total / GIB:.2f} GiB beyond the base weights "
                f"(traced on {self.model}; the run's peak with the weights {self.peak_gib:.2f} GiB)")


# ComfyUI's MMDiT (comfy/ldm/modules/diffusionmodules/mmdit.py `MMDiT.__init__`) arguments that must keep the
# value under which its blocks are those of diffusers' SD3Transformer2DModel (FeedForward mult 4, GELU-tanh,
# qkv bias, LayerNorm, AdaLN shift+scale, one joint block per layer, the last one context-pre-only).
_MMDIT_FIXED = {"mlp_ratio": 4.0, "learn_sigma": False, "register_length": 0, "rmsnorm": False,
                "scale_mod_only": False, "swiglu": False, "qkv_bias": True, "context_processor_layers": None,
                "pos_embed_offset": None, "final_layer": True, "skip_blocks": False, "compile_core": False,
                "disable_unet_model_creation": False}
# MMDiT arguments that change no module: the sin-cos grid is `pos_embed` of pos_embed_max_size (input_size only
# sizes it without one), the scaling factor is unused at inference (model_detection), checkpointing and the
# attention kernel are ComfyUI's runtime choices, context_size sizes the context processor (refused above);
# dtype is the weights' storage (`set_inference_dtype`): the base weights, which the estimate leaves out.
_MMDIT_NO_MODULES = {"input_size", "pos_embed_scaling_factor", "use_checkpoint", "attn_mode", "context_size", "dtype"}
# ComfyUI's Flux (comfy/ldm/flux/model.py `Flux.__init__`, `FluxParams`) against FluxTransformer2DModel:
# FeedForward mult 4 in both block kinds, qkv bias, RoPE theta 10000; 2x2 patches (our `pack`).
_FLUX_FIXED = {"image_model": "flux", "mlp_ratio": 4.0, "qkv_bias": True, "theta": 10000, "patch_size": 2,
               "final_layer": True, "disable_unet_model_creation": False}


# What ComfyUI's own blocks hold for backward against diffusers' blocks of the same config (the working set the
# trace counts on diffusers' transformer), both with PyTorch's SDPA attention (ComfyUI's choice on NVIDIA GPUs):
# ComfyUI's / traced, measured on random models through this backend at 64 and 256 px (8x8 and 32x32 latents)
# (2026-12-05, torch 2.13 CPU, fp32): SD3 of width 256: 1.099-1.106, Flux of width 256: 1.342-1.346 (its blocks
# add residuals in place, so the backend keeps a copy of each saved activation: flow.py
# `_copy_saved_activations`); the test fixtures (SD3 width 128, Flux width 64): 1.16 and 1.33. The ratio did not
# move with the token count; the wider models' value, rounded up, scales the trace (larger models: fixed
# overheads count less). Checked to 5 % in tests/comfyui/test_dit_training_node.py.
COMFY_BLOCKS_FACTOR = {"SD3": 1.11, "Flux": 1.35}


def _refuse(comfy_class: str, field: str, value, why: str) -> ValueError:
    return ValueError(f"memory estimate: ComfyUI {comfy_class} model config field {field}={value!r} has no "
                      f"diffusers {'SD3' if comfy_class == 'SD3' else 'Flux'}Transformer2DModel equivalent ({why})")


def _check_fixed(comfy_class: str, unet_config: dict, fixed: dict, free: set) -> None:
    """Every field is mapped, free (no module) or at the value `fixed` gives it; else the field is named."""
    mapped = {"SD3": {"in_channels", "out_channels", "patch_size", "depth", "num_blocks", "adm_in_channels",
                      "context_embedder_config", "num_patches", "pos_embed_max_size", "qk_norm",
                      "x_block_self_attn", "x_block_self_attn_layers"},
              "Flux": {"in_channels", "out_channels", "vec_in_dim", "context_in_dim", "hidden_size", "num_heads",
                       "depth", "depth_single_blocks", "axes_dim", "guidance_embed"}}[comfy_class]
    for k, v in unet_config.items():
        if k in fixed:
            if v != fixed[k]:
                raise _refuse(comfy_class, k, v, f"diffusers has {fixed[k]!r} only")
        elif k not in mapped and k not in free:
            raise _refuse(comfy_class, k, v, "a field this mapping does not know")


def _required(comfy_class: str, unet_config: dict, field: str):
    if unet_config.get(field) is None:
        raise _refuse(comfy_class, field, None, "diffusers' transformer always has it; the model config gives none")
    return unet_config[field]


def transformer_config(comfy_class: str, unet_config: dict) -> dict:
    """The diffusers transformer config (`transformer/config.json`, with `_class_name`) of the model ComfyUI
    built from `unet_config` (`model.model.model_config.unet_config`: what comfy/model_detection.py read from
    the checkpoint, merged with comfy/supported_models.py's class config). A field without an equivalent, or
    at a value diffusers' class cannot build, is refused with its name (ValueError): never another size."""
    c = dict(unet_config)
    if comfy_class == "SD3":
        _check_fixed("SD3", c, _MMDIT_FIXED, _MMDIT_NO_MODULES)
        depth = int(_required("SD3", c, "depth"))
        if c.get("num_blocks") not in (None, depth):
            raise _refuse("SD3", "num_blocks", c["num_blocks"], f"diffusers has one block per layer (depth {depth})")
        width = 64 * depth  # MMDiT: hidden size 64·depth, depth heads of 64
        ctx = _required("SD3", c, "context_embedder_config")
        if ctx.get("target") != "torch.nn.Linear" or ctx.get("params", {}).get("out_features") != width:
            raise _refuse("SD3", "context_embedder_config", ctx, f"diffusers' is a Linear to the width {width}")
        n = int(_required("SD3", c, "pos_embed_max_size"))
        if c.get("num_patches") not in (None, n * n):
            raise _refuse("SD3", "num_patches", c["num_patches"], f"diffusers' grid is pos_embed_max_size² = {n * n}")
        qk = {None: None, "rms": "rms_norm"}
        if c.get("qk_norm") not in qk:
            raise _refuse("SD3", "qk_norm", c["qk_norm"], "diffusers' SD3 has RMSNorm or none")
        in_ch = int(_required("SD3", c, "in_channels"))
        dual = list(range(depth)) if c.get("x_block_self_attn") else sorted(int(i) for i in c.get("x_block_self_attn_layers") or [])
        return {"_class_name": "SD3Transformer2DModel", "sample_size": 128, "patch_size": int(_required("SD3", c, "patch_size")),
                "in_channels": in_ch, "out_channels": int(c.get("out_channels") or in_ch), "num_layers": depth,
                "attention_head_dim": 64, "num_attention_heads": depth, "joint_attention_dim": int(ctx["params"]["in_features"]),
                "caption_projection_dim": width, "pooled_projection_dim": int(_required("SD3", c, "adm_in_channels")),
                "pos_embed_max_size": n, "dual_attention_layers": dual, "qk_norm": qk[c.get("qk_norm")]}
    if comfy_class == "Flux":
        _check_fixed("Flux", c, _FLUX_FIXED, {"dtype"})
        for k in ("image_model", "patch_size"):
            _required("Flux", c, k)
        hidden, heads = int(_required("Flux", c, "hidden_size")), int(_required("Flux", c, "num_heads"))
        axes = [int(a) for a in _required("Flux", c, "axes_dim")]
        if hidden % heads or sum(axes) != hidden // heads:
            raise _refuse("Flux", "axes_dim", axes, f"their sum must be the head width {hidden}/{heads}")
        p2 = 4  # 2x2 patches: diffusers sees packed latents (patch_size 1, 4x the channels)
        in_ch = int(_required("Flux", c, "in_channels"))
        return {"_class_name": "FluxTransformer2DModel", "patch_size": 1, "in_channels": in_ch * p2,
                "out_channels": int(c.get("out_channels") or in_ch) * p2, "num_layers": int(_required("Flux", c, "depth")),
                "num_single_layers": int(_required("Flux", c, "depth_single_blocks")), "attention_head_dim": hidden // heads,
                "num_attention_heads": heads, "joint_attention_dim": int(_required("Flux", c, "context_in_dim")),
                "pooled_projection_dim": int(_required("Flux", c, "vec_in_dim")),
                "guidance_embeds": bool(c.get("guidance_embed", False)), "axes_dims_rope": axes}
    raise ValueError(f"memory estimate: no diffusers transformer mapping for ComfyUI model class {comfy_class!r} "
                     "(SD3, Flux)")


def comfy_model_configs(backend, cfg):
    """(ModelConfigs of the transformer alone, HostEncoded shapes) of a ComfyUI flow backend: the config of the
    model it loaded, the conditioning of its CLIP (the run's ∅: every prompt of a run has its token count) and
    the latents of its VAE at the run's resolution."""
    from pathlib import Path

    from ...trainer.memory_estimate import TRANSFORMER_FAMILIES, HostEncoded, ModelConfigs
    from ...trainer.stream import latent_shape

    unet = transformer_config(backend.comfy_class, backend.patcher.model.model_config.unet_config)
    null = backend.null_cond(1)
    host = HostEncoded(tuple(null.hidden.shape[1:]), {k: tuple(v.shape[1:]) for k, v in null.added.items()},
                       latent_shape(backend, cfg.resolution))
    size = f"{unet['num_layers']} + {unet['num_single_layers']} blocks" if "num_single_layers" in unet else \
        f"depth {unet['num_layers']}"
    scheduler = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000,
                 "shift": float(backend.scheduler.config["shift"])}
    mc = ModelConfigs(TRANSFORMER_FAMILIES[unet["_class_name"]], Path("."), unet, [], None, scheduler,
                      f"ComfyUI's {backend.comfy_class} ({size}, width {unet['num_attention_heads'] * unet['attention_head_dim']})")
    return mc, host


def memory_estimate_for(backend, cfg, model: str | None = None) -> MemoryEstimate:
    """The traced estimate for a built backend and a TrainConfig. model: the config to trace (a shipped
    name or a diffusers folder); default the shipped config of the backend's family (ValueError when there
    is none). A flow DiT backend (nodes/comfy/flow.py) is traced on its own model's config
    (`comfy_model_configs`; ValueError naming a field that does not map); `model` does not apply to it."""
    from ...trainer.memory_estimate import SHIPPED, training_estimate

    device = "cuda" if getattr(getattr(backend, "device", None), "type", "cpu") == "cuda" else "cpu"
    if getattr(backend, "prediction_type", None) == "flow":  # ComfyUI's SD3 / Flux (nodes/comfy/flow.py)
        if model is not None:
            raise ValueError(f"memory estimate: a ComfyUI {backend.family} run is traced on the config of the model "
                             f"ComfyUI loaded, not on {model!r}")
        mc, host = comfy_model_configs(backend, cfg)
        e = training_estimate(cfg, mc, device, host=host)
        k = COMFY_BLOCKS_FACTOR[backend.comfy_class]
        return MemoryEstimate(int(e.training_beyond_base_gib() * k * GIB), e.peak_gib, f"{mc.source}, x{k} for ComfyUI's blocks")
    if model is None:
        if backend.family not in SHIPPED:
            raise ValueError(f"memory estimate: no shipped config for family {backend.family!r} "
                             f"(known: {sorted(SHIPPED)})")
        model = backend.family
    e = training_estimate(cfg, model, device)
    return MemoryEstimate(int(e.training_beyond_base_gib() * GIB), e.peak_gib, str(model))
