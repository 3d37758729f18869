"""SD3 / SD3.5 (stabilityai/stable-diffusion-3.5-*): an MMDiT on 16-channel latents with three text
encoders, as `StableDiffusion3Pipeline.encode_prompt`:

  CLIP-L and CLIP-G (both `CLIPTextModelWithProjection`): penultimate hidden states concatenated
    [B, 77, 768 + 1280], zero-padded to the T5 width and followed along the sequence by the T5-XXL
    last hidden state [B, 256, 4096] -> prompt embeds [B, 77 + 256, 4096];
  pooled = the two CLIP projections concatenated [B, 768 + 1280].

The negative prompt (default "") is encoded the same way: the null conditioning is the encoding of
the empty string, not zeros. Flow-match Euler with shift 3.0, 1024 px, CFG 7.0 (SD3.5 large: 3.5-4.5).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..core.conditioning import tokenize
from .base import RunEncoder, _run
from .flow import MMDIT_ATTN, MMDIT_FF, FlowFamily, OriginalModule, joint_block_modules, t5_ids

SD3_LORA_TARGETS = {
    "attn": MMDIT_ATTN,
    "attn_ff": MMDIT_ATTN + MMDIT_FF,
}


SD3_JOINT_NAMES = {  # the SAI names of a joint block's roles (flow.MMDIT_JOINT_BLOCK)
    "img_qkv": "x_block.attn.qkv", "txt_qkv": "context_block.attn.qkv",
    "img_proj": "x_block.attn.proj", "txt_proj": "context_block.attn.proj",
    "img_fc1": "x_block.mlp.fc1", "img_fc2": "x_block.mlp.fc2",
    "txt_fc1": "context_block.mlp.fc1", "txt_fc2": "context_block.mlp.fc2",
    "img_mod": "x_block.adaLN_modulation.1", "txt_mod": "context_block.adaLN_modulation.1",
}


@dataclass(frozen=True)
class SD3Family(FlowFamily):
    def encode_text(self, tokenizers: Sequence, text_encoders: Sequence, prompts: Sequence[str], device, *,
                    run: RunEncoder = _run, max_sequence_length: int | None = None, negative: bool = False):
        """(prompt embeds [B, 77 + L_t5, D_t5], pooled [B, P1 + P2]) of `prompts`, as the SD3 pipeline (a
        negative prompt is encoded the same way: `negative` changes nothing)."""
        hidden, pooled = [], []
        for i in (0, 1):
            out = run(i, text_encoders[i], tokenize(tokenizers[i], prompts, device))
            pooled.append(out[0])  # text_embeds: the projection
            hidden.append(out.hidden_states[-2].to(text_encoders[0].dtype))
        clip = torch.cat(hidden, dim=-1)  # [B, 77, D1 + D2]
        n = max_sequence_length or self.t5_max_length
        t5 = run(2, text_encoders[2], t5_ids(tokenizers[2], prompts, n, device))[0].to(text_encoders[2].dtype)
        clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return torch.cat([clip, t5], dim=-2), torch.cat(pooled, dim=-1)

    def original_modules(self, config) -> dict[str, OriginalModule]:
        """The SAI single-file module names of an SD3 transformer with `config` (diffusers'), each with the
        diffusers modules it holds (a fused qkv: three, its output rows split in equal parts, in order) and
        whether its output rows are (shift, scale) where diffusers has (scale, shift) (`swap_scale_shift`):
        the module-level map of diffusers' `convert_sd3_transformer_checkpoint_to_diffusers`, which kohya and
        ComfyUI name SD3 LoRAs by (`lora_unet_joint_blocks_0_x_block_attn_qkv`, `diffusion_model.…`)."""
        n = int(config["num_layers"])
        dual = set(config.get("dual_attention_layers") or ())
        out: dict[str, OriginalModule] = {}

        def add(orig: str, *modules: str, swap: bool = False) -> None:
            out[orig] = OriginalModule(modules, swap)

        add("x_embedder.proj", "pos_embed.proj")
        add("context_embedder", "context_embedder")
        for o, d in (("t", "timestep"), ("y", "text")):
            add(f"{o}_embedder.mlp.0", f"time_text_embed.{d}_embedder.linear_1")
            add(f"{o}_embedder.mlp.2", f"time_text_embed.{d}_embedder.linear_2")
        add("final_layer.linear", "proj_out")
        add("final_layer.adaLN_modulation.1", "norm_out.linear", swap=True)
        for i in range(n):
            b, d, last = f"joint_blocks.{i}.", f"transformer_blocks.{i}.", i == n - 1
            # the last block's context stream is pre-only (no output projection, no MLP) and its modulation is
            # AdaLN-continuous, rows (shift, scale)
            out.update(joint_block_modules(b, d, SD3_JOINT_NAMES, omit=("txt_proj", "txt_fc1", "txt_fc2") if last else (),
                                           swap=("txt_mod",) if last else ()))
            if i in dual:  # SD3.5's second image attention (MMDiT-X)
                add(b + "x_block.attn2.qkv", *(d + f"attn2.to_{x}" for x in "qkv"))
                add(b + "x_block.attn2.proj", d + "attn2.to_out.0")
        return out

    def velocity(self, model, x, t, hidden, added, *, h, w, guidance=None):
        """The SD3 transformer's velocity [B, C, h, w] at scheduler timestep t (0..1000)."""
        return model(hidden_states=x, timestep=t.expand(x.shape[0]), encoder_hidden_states=hidden,
                     pooled_projections=added["pooled_projections"], return_dict=False)[0]


SD3 = SD3Family(
    base_model_version="sd3",
    name="sd3", display_name="SD3/SD3.5",
    text_encoders=3, hidden_layer="penultimate", pooled=True,
    default_resolution=1024, default_cfg=7.0,
    lora_targets=dict(SD3_LORA_TARGETS),
    schedule={"num_train_timesteps": 1000, "shift": 3.0},
    pipeline_classes=("StableDiffusion3Pipeline",),
    t5_max_length=256,
    single_file_keys=("model.diffusion_model.joint_blocks.", "joint_blocks."),
    folder_components=("transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "vae", "scheduler"),
)
