"""Tiny SD1.x- and SDXL-shaped models with random weights, built locally (no downloads).

Used by the test-suite fixtures, the benchmarks and the embedded default world. Every
component has the same class as its full-size counterpart (UNet2DConditionModel,
CLIPTextModel / CLIPTextModelWithProjection, AutoencoderKL, CLIPTokenizer), so the code under
test cannot tell the difference except by size.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

# Words that get a single BPE token each; every other word falls back to byte-level characters.
DEFAULT_WORDS = (
    "a photo of the an and with in on at blurry ugly low quality high detailed sharp cat dog "
    "handwritten zero one two three four five six seven eight nine digit thin thick bold "
    "neat messy painting red blue green tree house car person"
).split()


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte-to-unicode table (the base alphabet of byte-level BPE)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def write_tokenizer_files(directory: str | os.PathLike, words=DEFAULT_WORDS) -> Path:
    """Write `vocab.json` + `merges.txt` of a small CLIP BPE vocabulary into `directory`.

    The vocabulary holds the byte alphabet (with and without the `</w>` end-of-word mark), the
    special tokens, and one token per word of `words` (merges built letter by letter).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    alphabet = list(_bytes_to_unicode().values())
    vocab: list[str] = ["<|startoftext|>", "<|endoftext|>"]
    vocab += alphabet + [c + "</w>" for c in alphabet]
    merges: list[str] = []
    seen = set(vocab)
    for word in sorted(set(w.lower() for w in words)):
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        cur = pieces[0]
        for nxt in pieces[1:]:
            merged = cur + nxt
            if merged not in seen:
                merges.append(f"{cur} {nxt}")
                vocab.append(merged)
                seen.add(merged)
            cur = merged
    (directory / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}), encoding="utf-8")
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return directory


def build_tokenizer(directory: str | os.PathLike, words=DEFAULT_WORDS, max_length: int = 77):
    from transformers import CLIPTokenizer

    write_tokenizer_files(directory, words)
    # from_pretrained reads vocab.json + merges.txt in transformers 4.x and 5.x alike.
    return CLIPTokenizer.from_pretrained(str(directory), pad_token="<|endoftext|>", model_max_length=max_length)


def text_encoder_config(vocab_size: int, hidden: int = 32, layers: int = 2, projection_dim: int = 32, max_pos: int = 77):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, max_position_embeddings=max_pos, projection_dim=projection_dim,
        bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_act="quick_gelu",
    )


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
