"""Tiny SD1.x-, SDXL-, SD3-, Flux- and SANA-shaped models with random weights, built locally (no downloads).

Used by the test-suite fixtures and the benchmarks; production code never imports this package
(the world's tokenizer lives in `world/tokenizer.py`). Every
component has the same class as its full-size counterpart (UNet2DConditionModel,
CLIPTextModel / CLIPTextModelWithProjection, AutoencoderKL, CLIPTokenizer), so the code under
test cannot tell the difference except by size.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from ..world.tokenizer import DEFAULT_WORDS, build_tokenizer, text_encoder_config, write_tokenizer_files  # noqa: F401


def unet_config_sd15(cross_attention_dim: int = 32, sample_size: int = 8, in_channels: int = 4) -> dict:
    """SD1.x-shaped: cross-attention in the outer down/up blocks, eps-prediction, no added conditioning."""
    return dict(
        sample_size=sample_size, in_channels=in_channels, out_channels=in_channels,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=cross_attention_dim,
        attention_head_dim=8, norm_num_groups=8,
    )


def unet_config_sdxl(cross_attention_dim: int = 64, pooled_dim: int = 32, time_dim: int = 8, sample_size: int = 8) -> dict:
    """SDXL-shaped: two text encoders concatenated, `text_time` added conditioning, linear projections."""
    return dict(
        sample_size=sample_size, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=cross_attention_dim,
        transformer_layers_per_block=(1, 2), attention_head_dim=(2, 4), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=pooled_dim + 6 * time_dim, norm_num_groups=8,
    )


def vae_config() -> dict:
    return dict(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1, norm_num_groups=8, sample_size=16,
    )


def _scheduler(prediction_type: str = "epsilon"):
    from diffusers import DDPMScheduler

    return DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                         clip_sample=False, prediction_type=prediction_type)


def build_sd15(directory: str | os.PathLike | None = None, seed: int = 0, prediction_type: str = "epsilon"):
    """A tiny SD1.x-shaped StableDiffusionPipeline with random weights (saved to `directory` if given)."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    tok_dir = Path(directory or "/tmp/npo_suite_tok") / "tokenizer_src"
    tokenizer = build_tokenizer(tok_dir)
    te = CLIPTextModel(text_encoder_config(len(tokenizer))).eval()
    unet = UNet2DConditionModel(**unet_config_sd15()).eval()
    vae = AutoencoderKL(**vae_config()).eval()
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tokenizer, unet=unet,
                                   scheduler=_scheduler(prediction_type), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    if directory is not None:
        pipe.save_pretrained(directory, safe_serialization=True)
    return pipe


def build_sdxl(directory: str | os.PathLike | None = None, seed: int = 0):
    """A tiny SDXL-shaped StableDiffusionXLPipeline with random weights (saved to `directory` if given)."""
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tok_dir = Path(directory or "/tmp/npo_suite_tok_xl") / "tokenizer_src"
    tokenizer = build_tokenizer(tok_dir)
    te1 = CLIPTextModel(text_encoder_config(len(tokenizer))).eval()
    te2 = CLIPTextModelWithProjection(text_encoder_config(len(tokenizer), projection_dim=32)).eval()
    unet = UNet2DConditionModel(**unet_config_sdxl()).eval()
    vae = AutoencoderKL(**vae_config()).eval()
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tokenizer,
                                     tokenizer_2=tokenizer, unet=unet, scheduler=_scheduler())
    if directory is not None:
        pipe.save_pretrained(directory, safe_serialization=True)
    return pipe


def build_tiny_clip(directory: str | os.PathLike, tokenizer_dir: str | os.PathLike, seed: int = 0) -> Path:
    """A tiny CLIPModel + CLIPProcessor (random weights, 32 px images) saved to `directory`: a local
    CLIP-style scorer for the evaluation and ComfyUI scoring tests."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tok = build_tokenizer(tokenizer_dir, max_length=16)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16)
    torch.manual_seed(seed)
    CLIPModel(cfg).save_pretrained(directory)
    ip = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=ip, tokenizer=tok).save_pretrained(directory)
    return Path(directory)


# ------------------------------------------------------------------------------------------------
# Single-file (LDM) checkpoints, as ComfyUI's and A1111's model folders hold them
# ------------------------------------------------------------------------------------------------
CLIP_VOCAB_SIZE = 49408  # the real CLIP vocabulary (the shipped tokenizer, configs/clip_tokenizer)


def _vae_to_ldm_key(key: str, n_blocks: int) -> str:
    """A diffusers AutoencoderKL state-dict key -> its LDM (`first_stage_model.*`) name: the inverse of
    diffusers' `convert_ldm_vae_checkpoint` (decoder blocks are numbered from the bottom in LDM)."""
    import re

    k = key.replace("mid_block.attentions.0.", "mid.attn_1.").replace("conv_norm_out", "norm_out")
    k = re.sub(r"mid_block\.resnets\.(\d+)\.", lambda m: f"mid.block_{int(m.group(1)) + 1}.", k)
    k = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.down.\1.block.\2.", k)
    k = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", k)
    k = re.sub(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.",
               lambda m: f"decoder.up.{n_blocks - 1 - int(m.group(1))}.block.{m.group(2)}.", k)
    k = re.sub(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
               lambda m: f"decoder.up.{n_blocks - 1 - int(m.group(1))}.upsample.", k)
    k = k.replace("conv_shortcut", "nin_shortcut")
    for d, l in (("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."), ("to_out.0.", "proj_out.")):
        if "mid.attn_1." in k:
            k = k.replace("mid.attn_1." + d, "mid.attn_1." + l)
    return "first_stage_model." + k


def ldm_state_dict(unet, text_encoder, vae=None) -> dict:
    """The LDM single-file state dict of an SD1.x UNet + CLIP text encoder (+ VAE): `model.diffusion_model.*`
    (module names by `core.offsets.keys.diffusers_to_ldm`), `cond_stage_model.transformer.*`,
    `first_stage_model.*` (1x1-conv attention weights, as the original checkpoints store them)."""
    from ..core.offsets.keys import diffusers_to_ldm, unet_block_prefixes

    prefixes = unet_block_prefixes(unet.config)
    sd = {}
    for k, v in unet.state_dict().items():
        mod, param = k.rsplit(".", 1)
        ldm = diffusers_to_ldm(mod, prefixes)
        if ldm is None:
            raise ValueError(f"no LDM name for UNet key {k}")
        sd[f"model.diffusion_model.{ldm}.{param}"] = v
    for k, v in text_encoder.state_dict().items():  # transformers 5 drops the `text_model.` the files carry
        sd["cond_stage_model.transformer." + (k if k.startswith("text_model.") else "text_model." + k)] = v
    if vae is not None:
        n = len(vae.config.block_out_channels)
        for k, v in vae.state_dict().items():
            ldm = _vae_to_ldm_key(k, n)
            sd[ldm] = v[..., None, None] if ".mid.attn_1." in ldm and ldm.endswith("weight") and v.ndim == 2 else v
    return {k: v.detach().contiguous().clone() for k, v in sd.items()}


def _open_clip_state_dict(te2, prefix: str) -> dict:
    """A CLIPTextModelWithProjection's weights in OpenCLIP names (SDXL's `conditioner.embedders.1.model.*`):
    the inverse of diffusers' `convert_open_clip_checkpoint` (q/k/v fused into `attn.in_proj_*`, the text
    projection stored transposed)."""
    import re

    sd, qkv = {}, {}
    for k, v in te2.state_dict().items():
        k = k if k.startswith(("text_model.", "text_projection")) else "text_model." + k
        if k == "text_projection.weight":
            sd[prefix + "text_projection"] = v.T.contiguous()
            continue
        k = k.replace("text_model.embeddings.position_embedding.weight", "positional_embedding")
        k = k.replace("text_model.embeddings.token_embedding.weight", "token_embedding.weight")
        k = k.replace("text_model.final_layer_norm.", "ln_final.")
        if k.endswith("position_ids"):
            continue
        m = re.match(r"text_model\.encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)$", k)
        if m:
            qkv.setdefault((int(m.group(1)), m.group(3)), {})[m.group(2)] = v
            continue
        if k.startswith("text_model.encoder.layers."):
            k = "transformer." + k[len("text_model.encoder."):].replace("layers.", "resblocks.", 1)
            for d, o in (("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), (".fc1.", ".c_fc."), (".fc2.", ".c_proj."),
                         (".self_attn.", ".attn.")):
                k = k.replace(d, o)
        sd[prefix + k] = v
    for (i, kind), parts in qkv.items():
        sd[f"{prefix}transformer.resblocks.{i}.attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return sd


def build_sdxl_single_file(path: str | os.PathLike, config_dir: str | os.PathLike | None = None, *, seed: int = 0):
    """A tiny SDXL single-file checkpoint as SDXL files are saved (`model.diffusion_model.*` UNet with
    `label_emb`, CLIP-L under `conditioner.embedders.0.transformer.*`, OpenCLIP-G under
    `conditioner.embedders.1.model.*`, VAE under `first_stage_model.*`), with the real CLIP vocabulary size
    10 OpenCLIP layers (diffusers recognises an SDXL file by its `resblocks.9`) and encoder widths 32 / 48; `config_dir` receives
    the diffusers configs (the tiny stand-in of the shipped `configs/sdxl`). Returns (unet, te1, te2, vae)."""
    import json

    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)

    def cfg(hidden, layers, act):
        c = text_encoder_config(CLIP_VOCAB_SIZE, hidden=hidden, layers=layers, projection_dim=32)
        c.bos_token_id, c.eos_token_id, c.pad_token_id, c.hidden_act = 49406, 49407, 49407, act
        return c

    # the encoders' widths differ as in SDXL (768 / 1280): diffusers tells CLIP-L from OpenCLIP-G by them
    te1 = CLIPTextModel(cfg(32, 2, "quick_gelu")).eval()
    te2 = CLIPTextModelWithProjection(cfg(48, 10, "gelu")).eval()
    unet = UNet2DConditionModel(**unet_config_sdxl(cross_attention_dim=32 + 48)).eval()
    vae = AutoencoderKL(**vae_config()).eval()
    sd = ldm_state_dict(unet, te1, vae)
    sd = {("conditioner.embedders.0.transformer." + k[len("cond_stage_model.transformer."):]
           if k.startswith("cond_stage_model.") else k): v for k, v in sd.items()}
    sd.update(_open_clip_state_dict(te2, "conditioner.embedders.1.model."))
    save_file({k: v.detach().contiguous().clone() for k, v in sd.items()}, str(path))
    if config_dir is not None:
        d = Path(config_dir)
        unet.save_config(d / "unet")
        vae.save_config(d / "vae")
        te1.config.save_pretrained(d / "text_encoder")
        te2.config.save_pretrained(d / "text_encoder_2")
        _scheduler().save_config(d / "scheduler")
        index = {"_class_name": "StableDiffusionXLPipeline", "_diffusers_version": "0.30.0",
                 "scheduler": ["diffusers", "DDPMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
                 "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
                 "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
                 "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
                 "force_zeros_for_empty_prompt": True}
        (d / "model_index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
    return unet, te1, te2, vae


def build_sd15_single_file(path: str | os.PathLike, config_dir: str | os.PathLike | None = None, *, seed: int = 0,
                           with_vae: bool = True, v_pred: bool = False, dtype: torch.dtype = torch.float32,
                           vocab_size: int = CLIP_VOCAB_SIZE):
    """A tiny SD1.x single-file checkpoint (LDM keys) with the real CLIP vocabulary size, written to `path`;
    `config_dir` (if given) receives its diffusers architecture configs (the tiny stand-in of the shipped
    `configs/sd15`). v_pred: the empty `v_pred` tensor ComfyUI writes for v-prediction models. Returns
    (unet, text_encoder, vae) in float32."""
    import json

    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    te_cfg = text_encoder_config(vocab_size)
    if vocab_size == CLIP_VOCAB_SIZE:
        te_cfg.bos_token_id, te_cfg.eos_token_id, te_cfg.pad_token_id = 49406, 49407, 49407
    te = CLIPTextModel(te_cfg).eval()
    unet = UNet2DConditionModel(**unet_config_sd15()).eval()
    vae = AutoencoderKL(**vae_config()).eval()
    sd = ldm_state_dict(unet, te, vae if with_vae else None)
    if v_pred:
        sd["v_pred"] = torch.tensor([])
    save_file({k: (v.to(dtype) if v.is_floating_point() else v) for k, v in sd.items()}, str(path))
    if config_dir is not None:
        d = Path(config_dir)
        unet.save_config(d / "unet")
        vae.save_config(d / "vae")
        te.config.save_pretrained(d / "text_encoder")
        _scheduler().save_config(d / "scheduler")
        index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.30.0",
                 "feature_extractor": [None, None], "safety_checker": [None, None],
                 "scheduler": ["diffusers", "DDPMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
                 "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
                 "vae": ["diffusers", "AutoencoderKL"], "requires_safety_checker": False}
        (d / "model_index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
    return unet, te, vae


# ----------------------------------------------------------------------------------------------
# Flow-matching transformers (SD3, Flux): the classes of the full-size pipelines, tiny sizes
# ----------------------------------------------------------------------------------------------
def build_t5_tokenizer(directory: str | os.PathLike | None = None, words=DEFAULT_WORDS, max_length: int = 32):
    """A T5-style word-level tokenizer built offline (`tokenizers` WordLevel, wrapped in
    PreTrainedTokenizerFast): <pad>=0, </s>=1, <unk>=2, one id per word, `</s>` appended like T5's."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for w in sorted(set(w.lower() for w in words)):
        vocab.setdefault(w, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                  model_max_length=max_length)
    if directory is not None:
        tok.save_pretrained(str(directory))
    return tok


def t5_encoder(vocab_size: int, d_model: int = 64, layers: int = 2):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=vocab_size, d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=layers,
                                   num_heads=4, relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1,
                                   decoder_start_token_id=0)).eval()


def flow_vae_config(latent_channels: int = 4, shift_factor: float = 0.0609, scaling_factor: float = 1.5035) -> dict:
    """An AutoencoderKL with SD3/Flux's latent shift and scale (2x down-sampling, no quant convs)."""
    return dict(in_channels=3, out_channels=3, latent_channels=latent_channels, block_out_channels=(8, 16),
                down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                layers_per_block=1, norm_num_groups=8, sample_size=16, use_quant_conv=False,
                use_post_quant_conv=False, shift_factor=shift_factor, scaling_factor=scaling_factor)


def sd3_transformer_config() -> dict:
    """SD3.5-medium-shaped MMDiT: joint blocks (the last one context-pre-only), patch 2, pooled = the two
    CLIP projections, context = T5 width; SD3.5's RMS q/k norm and, in block 0, its second (image-only)
    attention `attn2` (MMDiT-X), so every Linear kind of SD3 and SD3.5 is in the tiny model."""
    return dict(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
                num_attention_heads=4, joint_attention_dim=64, caption_projection_dim=32, pooled_projection_dim=64,
                pos_embed_max_size=16, qk_norm="rms_norm", dual_attention_layers=(0,))


def build_sd3(directory: str | os.PathLike | None = None, seed: int = 0, shift: float = 3.0,
              transformer_config: dict | None = None, latent_channels: int = 4):
    """A tiny StableDiffusion3Pipeline (CLIP-L, CLIP-G with projections, T5; MMDiT; flow-match Euler with
    `shift`), random weights, tokenizers built offline (saved to `directory` if given).
    transformer_config: replaces `sd3_transformer_config()` (e.g. ComfyUI-detectable widths, 16 latent
    channels); latent_channels: the VAE's (must equal the transformer's in_channels)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tok_dir = Path(directory or "/tmp/npo_suite_tok_sd3") / "tokenizer_src"
    clip_tok = build_tokenizer(tok_dir)
    t5_tok = build_t5_tokenizer()
    te1 = CLIPTextModelWithProjection(text_encoder_config(len(clip_tok), projection_dim=32)).eval()
    te2 = CLIPTextModelWithProjection(text_encoder_config(len(clip_tok), projection_dim=32)).eval()
    te3 = t5_encoder(len(t5_tok))
    transformer = SD3Transformer2DModel(**(transformer_config or sd3_transformer_config())).eval()
    vae = AutoencoderKL(**flow_vae_config(latent_channels, 0.0609, 1.5035)).eval()
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=shift),
                                    vae=vae, text_encoder=te1, tokenizer=clip_tok, text_encoder_2=te2,
                                    tokenizer_2=clip_tok, text_encoder_3=te3, tokenizer_3=t5_tok)
    if directory is not None:
        pipe.save_pretrained(directory, safe_serialization=True)
    return pipe


def _swap_halves(w: torch.Tensor) -> torch.Tensor:
    """(shift, scale) <-> (scale, shift) along dim 0: diffusers' `swap_scale_shift`, its own inverse."""
    a, b = w.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def _final_and_renamed(o: dict, sd: dict, ren: dict, name: str) -> None:
    """Into the original-layout dict `o`: the final AdaLN modulation ((scale, shift) -> (shift, scale)) and every
    `ren` {original: diffusers} module's weight and bias, popped from `sd`; any diffusers key left is an error."""
    for p in ("weight", "bias"):
        o[f"final_layer.adaLN_modulation.1.{p}"] = _swap_halves(sd.pop(f"norm_out.linear.{p}"))
        for new, old in ren.items():
            o[f"{new}.{p}"] = sd.pop(f"{old}.{p}")
    if sd:
        raise ValueError(f"{name}: diffusers keys without an original name: {sorted(sd)[:8]}")


def sd3_original_state_dict(transformer) -> dict:
    """The SAI single-file names (`model.diffusion_model.joint_blocks.*`, fused qkv, LDM-style final layer) of a
    diffusers SD3Transformer2DModel: the inverse of diffusers' `convert_sd3_transformer_checkpoint_to_diffusers`
    (tests load it back through that converter and compare every tensor)."""
    sd = {k: v.detach().clone() for k, v in transformer.state_dict().items()}
    n = transformer.config.num_layers
    o = {"pos_embed": sd.pop("pos_embed.pos_embed")}
    ren = {"x_embedder.proj": "pos_embed.proj", "t_embedder.mlp.0": "time_text_embed.timestep_embedder.linear_1",
           "t_embedder.mlp.2": "time_text_embed.timestep_embedder.linear_2", "context_embedder": "context_embedder",
           "y_embedder.mlp.0": "time_text_embed.text_embedder.linear_1",
           "y_embedder.mlp.2": "time_text_embed.text_embedder.linear_2", "final_layer.linear": "proj_out"}
    for i in range(n):
        b, d = f"joint_blocks.{i}.", f"transformer_blocks.{i}."
        ren.update({b + "x_block.attn.proj": d + "attn.to_out.0", b + "x_block.adaLN_modulation.1": d + "norm1.linear",
                    b + "x_block.mlp.fc1": d + "ff.net.0.proj", b + "x_block.mlp.fc2": d + "ff.net.2"})
        if i < n - 1:
            ren.update({b + "context_block.attn.proj": d + "attn.to_add_out",
                        b + "context_block.adaLN_modulation.1": d + "norm1_context.linear",
                        b + "context_block.mlp.fc1": d + "ff_context.net.0.proj",
                        b + "context_block.mlp.fc2": d + "ff_context.net.2"})
        for p in ("weight", "bias"):
            o[f"{b}x_block.attn.qkv.{p}"] = torch.cat([sd.pop(f"{d}attn.to_{x}.{p}") for x in "qkv"])
            o[f"{b}context_block.attn.qkv.{p}"] = torch.cat([sd.pop(f"{d}attn.add_{x}_proj.{p}") for x in "qkv"])
            if f"{d}attn2.to_q.{p}" in sd:
                o[f"{b}x_block.attn2.qkv.{p}"] = torch.cat([sd.pop(f"{d}attn2.to_{x}.{p}") for x in "qkv"])
                o[f"{b}x_block.attn2.proj.{p}"] = sd.pop(f"{d}attn2.to_out.0.{p}")
            if i == n - 1:
                o[f"{b}context_block.adaLN_modulation.1.{p}"] = _swap_halves(sd.pop(f"{d}norm1_context.linear.{p}"))
        for blk, attn, pre in (("x_block", "attn", ""), ("context_block", "attn", "added_"), ("x_block", "attn2", "")):
            for x in "qk":
                key = f"{d}{attn}.norm_{pre}{x}.weight"
                if key in sd:
                    o[f"{b}{blk}.{attn}.ln_{x}.weight"] = sd.pop(key)
    _final_and_renamed(o, sd, ren, "sd3_original_state_dict")
    return {"model.diffusion_model." + k: v.contiguous() for k, v in o.items()}


def build_sd3_single_file(path: str | os.PathLike, folder: str | os.PathLike, *, with_vae: bool = True,
                          seed: int = 0) -> Path:
    """A tiny SD3 single file as SAI ships SD3.5 (`model.diffusion_model.*` MMDiT + `first_stage_model.*` VAE,
    no text encoders) with the random weights of `build_sd3(folder, seed)` (the folder is written too: it is the
    `--config` such a file needs)."""
    from safetensors.torch import save_file

    pipe = build_sd3(folder, seed=seed)
    sd = sd3_original_state_dict(pipe.transformer)
    if with_vae:
        n = len(pipe.vae.config.block_out_channels)
        for k, v in pipe.vae.state_dict().items():
            ldm = _vae_to_ldm_key(k, n)
            sd[ldm] = (v[..., None, None] if ".mid.attn_1." in ldm and ldm.endswith("weight") and v.ndim == 2 else v).clone()
    path = Path(path)
    save_file(sd, str(path))
    return path


def flux_transformer_config(guidance_embeds: bool = True) -> dict:
    """Flux-shaped: double (joint) and single-stream blocks, 2x2-packed latents (in_channels = 4 * 4),
    RoPE axes summing to the head dim, guidance embedding (dev) or not (schnell)."""
    return dict(patch_size=1, in_channels=16, out_channels=None, num_layers=1, num_single_layers=2,
                attention_head_dim=16, num_attention_heads=2, joint_attention_dim=64, pooled_projection_dim=32,
                guidance_embeds=guidance_embeds, axes_dims_rope=(4, 4, 8))


def build_flux(directory: str | os.PathLike | None = None, seed: int = 0, guidance_embeds: bool = True,
               transformer_config: dict | None = None, latent_channels: int = 4):
    """A tiny FluxPipeline (CLIP-L pooled + T5, double/single-stream transformer, Flux-dev's dynamic
    shift schedule), random weights, tokenizers built offline (saved to `directory` if given).
    transformer_config: replaces `flux_transformer_config(guidance_embeds)` (its in_channels = 4 x
    latent_channels: 2x2 packing); latent_channels: the VAE's."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    tok_dir = Path(directory or "/tmp/npo_suite_tok_flux") / "tokenizer_src"
    clip_tok = build_tokenizer(tok_dir)
    t5_tok = build_t5_tokenizer()
    te1 = CLIPTextModel(text_encoder_config(len(clip_tok))).eval()
    te2 = t5_encoder(len(t5_tok))
    transformer = FluxTransformer2DModel(**(transformer_config or flux_transformer_config(guidance_embeds))).eval()
    vae = AutoencoderKL(**flow_vae_config(latent_channels, 0.1159, 0.3611)).eval()
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                            base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(transformer=transformer, scheduler=sched, vae=vae, text_encoder=te1, tokenizer=clip_tok,
                        text_encoder_2=te2, tokenizer_2=t5_tok)
    if directory is not None:
        pipe.save_pretrained(directory, safe_serialization=True)
    return pipe


def flux_original_state_dict(transformer) -> dict:
    """The BFL single-file names (`double_blocks.*` with fused qkv, `single_blocks.*` with the fused `linear1` =
    q, k, v, mlp input, `final_layer.*`; no prefix, as BFL ships Flux.1) of a diffusers FluxTransformer2DModel: the
    inverse of diffusers' `convert_flux_transformer_checkpoint_to_diffusers` (which splits `linear1` at the
    released width 3072: tests of a tiny model lay it out at that width before converting it back)."""
    sd = {k: v.detach().clone() for k, v in transformer.state_dict().items()}
    ren = {"img_in": "x_embedder", "txt_in": "context_embedder", "final_layer.linear": "proj_out"}
    for o, d in (("time_in", "timestep"), ("vector_in", "text"), ("guidance_in", "guidance")):
        if f"time_text_embed.{d}_embedder.linear_1.weight" in sd:
            ren.update({f"{o}.in_layer": f"time_text_embed.{d}_embedder.linear_1",
                        f"{o}.out_layer": f"time_text_embed.{d}_embedder.linear_2"})
    o = {}
    for i in range(transformer.config.num_layers):
        b, d = f"double_blocks.{i}.", f"transformer_blocks.{i}."
        ren.update({b + "img_attn.proj": d + "attn.to_out.0", b + "txt_attn.proj": d + "attn.to_add_out",
                    b + "img_mlp.0": d + "ff.net.0.proj", b + "img_mlp.2": d + "ff.net.2",
                    b + "txt_mlp.0": d + "ff_context.net.0.proj", b + "txt_mlp.2": d + "ff_context.net.2",
                    b + "img_mod.lin": d + "norm1.linear", b + "txt_mod.lin": d + "norm1_context.linear"})
        for p in ("weight", "bias"):
            o[f"{b}img_attn.qkv.{p}"] = torch.cat([sd.pop(f"{d}attn.to_{x}.{p}") for x in "qkv"])
            o[f"{b}txt_attn.qkv.{p}"] = torch.cat([sd.pop(f"{d}attn.add_{x}_proj.{p}") for x in "qkv"])
        for stream, pre in (("img", ""), ("txt", "added_")):
            for x, n in (("q", "query"), ("k", "key")):
                o[f"{b}{stream}_attn.norm.{n}_norm.scale"] = sd.pop(f"{d}attn.norm_{pre}{x}.weight")
    for i in range(transformer.config.num_single_layers):
        b, d = f"single_blocks.{i}.", f"single_transformer_blocks.{i}."
        ren.update({b + "linear2": d + "proj_out", b + "modulation.lin": d + "norm.linear"})
        for p in ("weight", "bias"):
            qkv = [sd.pop(f"{d}attn.to_{x}.{p}") for x in "qkv"]
            o[f"{b}linear1.{p}"] = torch.cat(qkv + [sd.pop(f"{d}proj_mlp.{p}")])
        for x, n in (("q", "query"), ("k", "key")):
            o[f"{b}norm.{n}_norm.scale"] = sd.pop(f"{d}attn.norm_{x}.weight")
    _final_and_renamed(o, sd, ren, "flux_original_state_dict")
    return {k: v.contiguous() for k, v in o.items()}


# ----------------------------------------------------------------------------------------------
# SANA: linear-attention DiT, Gemma2 text encoder, DC-AE (the classes of SanaPipeline, tiny sizes)
# ----------------------------------------------------------------------------------------------
def build_gemma_tokenizer(directory: str | os.PathLike | None = None, words=DEFAULT_WORDS):
    """A transformers `GemmaTokenizer` (BPE with byte fallback, "▁" for spaces, <bos> prepended, as Gemma's)
    built offline: the special tokens, the 256 byte tokens, every character and word of `words` and of
    SanaPipeline's default `complex_human_instruction` (so that prefix is ~200 tokens, not ~1000 bytes),
    merges letter by letter. Saved to `directory` if given."""
    import re

    from transformers import GemmaTokenizer

    from ..families.sana import complex_human_instruction

    text = " ".join(list(words) + complex_human_instruction())
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4}
    vocab.update({f"<0x{b:02X}>": 5 + b for b in range(256)})
    for ch in sorted(set(text.replace(" ", "▁")) | {"▁"}):
        vocab.setdefault(ch, len(vocab))
    merges = []
    for w in sorted(set(re.findall(r"[A-Za-z']+", text))):
        for piece in (w, w.lower(), "▁" + w, "▁" + w.lower()):
            cur = piece[0]
            for ch in piece[1:]:
                if (cur, ch) not in merges:
                    merges.append((cur, ch))
                cur += ch
                vocab.setdefault(cur, len(vocab))
    tok = GemmaTokenizer(vocab=vocab, merges=merges, add_bos_token=True, add_eos_token=False)
    if directory is not None:
        tok.save_pretrained(str(directory))
    return tok


def sana_transformer_config(caption_channels: int = 16) -> dict:
    """SANA-shaped: linear self-attention + cross-attention blocks, GLUMBConv feed-forward, patch 1,
    caption projection from the Gemma2 width; no guidance embedding (SanaPipeline's models)."""
    return dict(patch_size=1, in_channels=4, out_channels=4, num_layers=2, num_attention_heads=2, attention_head_dim=8,
                num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16,
                caption_channels=caption_channels, sample_size=8)


def dc_ae_config() -> dict:
    """A tiny AutoencoderDC (diffusers' own SANA test config): 4 latent channels, 2x down-sampling."""
    return dict(in_channels=3, latent_channels=4, attention_head_dim=2,
                encoder_block_types=("ResBlock", "EfficientViTBlock"), decoder_block_types=("ResBlock", "EfficientViTBlock"),
                encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
                encoder_qkv_multiscales=((), (5,)), decoder_qkv_multiscales=((), (5,)),
                encoder_layers_per_block=(1, 1), decoder_layers_per_block=(1, 1), downsample_block_type="conv",
                upsample_block_type="interpolate", decoder_norm_types="rms_norm", decoder_act_fns="silu",
                scaling_factor=0.41407)


def sana_scheduler(flow_shift: float = 3.0):
    """The scheduler of the hub's SANA folders (Sana_1600M_1024px_diffusers): DPM-Solver++ on flow sigmas."""
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler(num_train_timesteps=1000, algorithm_type="dpmsolver++", solver_order=2,
                                       prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=flow_shift)


def sana_original_state_dict(transformer, max_tokens: int = 300) -> dict:
    """The NVlabs/Sana checkpoint names (`blocks.N.attn.qkv`, `cross_attn.kv_linear`, `mlp.*_conv.conv`, ...) of a
    diffusers SanaTransformer2DModel: the inverse of diffusers' `convert_sana_transformer_to_diffusers`, plus the
    two tensors that converter drops unread (`pos_embed`, `y_embedder.y_embedding`: zeros here)."""
    sd = {k: v.detach().clone() for k, v in transformer.state_dict().items()}
    c = transformer.config
    o = {"pos_embed": torch.zeros(1, 1, c.num_attention_heads * c.attention_head_dim),
         "y_embedder.y_embedding": torch.zeros(max_tokens, c.caption_channels),
         "attention_y_norm.weight": sd.pop("caption_norm.weight"),
         "final_layer.scale_shift_table": sd.pop("scale_shift_table")}
    ren = {"x_embedder.proj": "patch_embed.proj", "t_embedder.mlp.0": "time_embed.emb.timestep_embedder.linear_1",
           "t_embedder.mlp.2": "time_embed.emb.timestep_embedder.linear_2", "t_block.1": "time_embed.linear",
           "y_embedder.y_proj.fc1": "caption_projection.linear_1", "y_embedder.y_proj.fc2": "caption_projection.linear_2",
           "final_layer.linear": "proj_out"}
    for i in range(c.num_layers):
        b, d = f"blocks.{i}.", f"transformer_blocks.{i}."
        o[b + "scale_shift_table"] = sd.pop(d + "scale_shift_table")
        o[b + "attn.qkv.weight"] = torch.cat([sd.pop(f"{d}attn1.to_{x}.weight") for x in "qkv"])
        for p_ in ("weight", "bias"):
            o[f"{b}cross_attn.kv_linear.{p_}"] = torch.cat([sd.pop(f"{d}attn2.to_{x}.{p_}") for x in "kv"])
        o[b + "mlp.point_conv.conv.weight"] = sd.pop(d + "ff.conv_point.weight")
        ren.update({b + "attn.proj": d + "attn1.to_out.0", b + "cross_attn.q_linear": d + "attn2.to_q",
                    b + "cross_attn.proj": d + "attn2.to_out.0", b + "mlp.inverted_conv.conv": d + "ff.conv_inverted",
                    b + "mlp.depth_conv.conv": d + "ff.conv_depth"})
    for new, old in ren.items():
        for p_ in ("weight", "bias"):
            o[f"{new}.{p_}"] = sd.pop(f"{old}.{p_}")
    if sd:
        raise ValueError(f"sana_original_state_dict: diffusers keys without an original name: {sorted(sd)[:8]}")
    return {k: v.contiguous() for k, v in o.items()}


def build_sana(directory: str | os.PathLike | None = None, seed: int = 0, flow_shift: float = 3.0):
    """A tiny SanaPipeline (Gemma2 text encoder with a GemmaTokenizer built offline, SanaTransformer2DModel,
    AutoencoderDC, the hub's DPM-Solver flow scheduler at `flow_shift`), random weights (saved to `directory`
    if given)."""
    from diffusers import AutoencoderDC, SanaPipeline, SanaTransformer2DModel
    from transformers import Gemma2Config, Gemma2Model

    torch.manual_seed(seed)
    tok = build_gemma_tokenizer()
    te = Gemma2Model(Gemma2Config(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                  num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                                  max_position_embeddings=2048, pad_token_id=0, bos_token_id=2, eos_token_id=1,
                                  attn_implementation="eager")).eval()
    transformer = SanaTransformer2DModel(**sana_transformer_config(caption_channels=16)).eval()
    vae = AutoencoderDC(**dc_ae_config()).eval()
    pipe = SanaPipeline(tokenizer=tok, text_encoder=te, vae=vae, transformer=transformer,
                        scheduler=sana_scheduler(flow_shift))
    if directory is not None:
        pipe.save_pretrained(directory, safe_serialization=True)
    return pipe
