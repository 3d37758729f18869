"""Flux.1 (black-forest-labs/FLUX.1-dev, -schnell): a double/single-stream transformer on 2x2-packed
16-channel latents, as `FluxPipeline`:

  CLIP-L (`CLIPTextModel`): its pooled output [B, 768] is the pooled conditioning;
  T5-XXL: the last hidden state [B, 512, 4096] is the text sequence (txt_ids zeros [512, 3]);
  latents [B, 16, h, w] are packed to [B, h/2 * w/2, 64] tokens with img_ids (0, row, col);
  the transformer sees timestep t / 1000 and, for dev (`guidance_embeds`), the embedded guidance.

Flux-dev is guidance-distilled: the pipeline runs no unconditional pass unless `true_cfg_scale > 1`
with a negative prompt ("true CFG"). NPO needs that unconditional pass, so every guided mode here is
true CFG on velocities; the embedded guidance (`flux_guidance`, default 3.5 of the pipeline) should
then be lowered (1.0-2.0) since the CFG scale now does the guiding. Schedule: the scheduler's sigmas
linspace(1, 1/steps) shifted by mu(image tokens) (`use_dynamic_shifting`). 1024 px.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..core.conditioning import tokenize
from .base import RunEncoder, _run
from .flow import MMDIT_ATTN, MMDIT_FF, FlowFamily, OriginalModule, dynamic_mu, joint_block_modules, t5_ids

FLUX_SINGLE = ("proj_mlp", "proj_out")  # single-stream blocks: attn to_q/k/v + these two
FLUX_LORA_TARGETS = {
    "attn": MMDIT_ATTN,
    "attn_ff": MMDIT_ATTN + MMDIT_FF + FLUX_SINGLE,
}


FLUX_JOINT_NAMES = {  # the BFL names of a double block's roles (flow.MMDIT_JOINT_BLOCK)
    "img_qkv": "img_attn.qkv", "txt_qkv": "txt_attn.qkv", "img_proj": "img_attn.proj", "txt_proj": "txt_attn.proj",
    "img_fc1": "img_mlp.0", "img_fc2": "img_mlp.2", "txt_fc1": "txt_mlp.0", "txt_fc2": "txt_mlp.2",
    "img_mod": "img_mod.lin", "txt_mod": "txt_mod.lin",
}


@dataclass(frozen=True)
class FluxFamily(FlowFamily):
    default_flux_guidance: float = 3.5

    def encode_text(self, tokenizers: Sequence, text_encoders: Sequence, prompts: Sequence[str], device, *,
                    run: RunEncoder = _run, max_sequence_length: int | None = None, negative: bool = False):
        """(T5 hidden [B, L_t5, D_t5], CLIP pooled [B, D_clip]) of `prompts`, as the Flux pipeline (a negative
        prompt is encoded the same way: `negative` changes nothing)."""
        pooled = run(0, text_encoders[0], tokenize(tokenizers[0], prompts, device)).pooler_output
        n = max_sequence_length or self.t5_max_length
        t5 = run(1, text_encoders[1], t5_ids(tokenizers[1], prompts, n, device))[0]
        return t5.to(text_encoders[1].dtype), pooled.to(text_encoders[0].dtype)

    def original_modules(self, config) -> dict[str, OriginalModule]:
        """The BFL single-file module names of a Flux transformer with `config` (diffusers'), each with the
        diffusers modules it holds, in the order of its output rows: the module-level map of diffusers'
        `convert_flux_transformer_checkpoint_to_diffusers`, which kohya, ComfyUI and ai-toolkit's kohya export
        name Flux LoRAs by (`lora_unet_double_blocks_0_img_attn_qkv`, `diffusion_model.single_blocks.0.linear1`).
        A double block's fused qkv splits in three equal parts; a single block's `linear1` in q, k, v (the inner
        width num_attention_heads * attention_head_dim each) and the MLP input (4x that: the mlp_ratio of
        diffusers' FluxSingleTransformerBlock), from `config` where the converter fixes the released 3072. Only
        the final AdaLN modulation has its rows reordered (shift, scale) -> (scale, shift); the blocks'
        modulations (`img_mod`, `txt_mod`, `modulation`) keep their order, as in the converter. The guidance
        embedder is in the map only when `config` has `guidance_embeds` (Flux-dev, not schnell)."""
        inner = int(config["num_attention_heads"]) * int(config["attention_head_dim"])
        out: dict[str, OriginalModule] = {}

        def add(orig: str, *modules: str, swap: bool = False, rows: tuple[int, ...] | None = None) -> None:
            out[orig] = OriginalModule(modules, swap, rows)

        add("img_in", "x_embedder")
        add("txt_in", "context_embedder")
        embedders = [("time_in", "timestep"), ("vector_in", "text")] + \
            ([("guidance_in", "guidance")] if config.get("guidance_embeds") else [])
        for o, d in embedders:
            add(f"{o}.in_layer", f"time_text_embed.{d}_embedder.linear_1")
            add(f"{o}.out_layer", f"time_text_embed.{d}_embedder.linear_2")
        add("final_layer.linear", "proj_out")
        add("final_layer.adaLN_modulation.1", "norm_out.linear", swap=True)
        for i in range(int(config["num_layers"])):
            out.update(joint_block_modules(f"double_blocks.{i}.", f"transformer_blocks.{i}.", FLUX_JOINT_NAMES))
        for i in range(int(config["num_single_layers"])):
            b, d = f"single_blocks.{i}.", f"single_transformer_blocks.{i}."
            add(b + "linear1", *(d + f"attn.to_{x}" for x in "qkv"), d + "proj_mlp", rows=(inner,) * 3 + (4 * inner,))
            add(b + "linear2", d + "proj_out")
            add(b + "modulation.lin", d + "norm.linear")
        return out

    def pack(self, latents):
        b, c, h, w = latents.shape
        x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(b, (h // 2) * (w // 2), c * 4)

    def unpack(self, x, h, w):
        b, _, ch = x.shape
        x = x.view(b, h // 2, w // 2, ch // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
        return x.reshape(b, ch // 4, h, w)

    def latent_channels(self, model) -> int:
        return int(model.config.in_channels) // 4

    def latent_multiple(self, model) -> int:
        return 2  # 2x2 packing

    def image_seq_len(self, model, h: int, w: int) -> int:
        return (h // 2) * (w // 2)

    def set_timesteps(self, scheduler, steps, image_seq_len, device):
        sigmas = None if scheduler.config.get("use_flow_sigmas", False) else np.linspace(1.0, 1 / steps, steps)
        mu = dynamic_mu(scheduler.config, image_seq_len, max_shift_default=1.15)
        scheduler.set_timesteps(sigmas=sigmas, device=device, mu=mu)

    @staticmethod
    def image_ids(h: int, w: int, device, dtype) -> torch.Tensor:
        ids = torch.zeros(h // 2, w // 2, 3)
        ids[..., 1] = ids[..., 1] + torch.arange(h // 2)[:, None]
        ids[..., 2] = ids[..., 2] + torch.arange(w // 2)[None, :]
        return ids.reshape(-1, 3).to(device=device, dtype=dtype)

    def velocity(self, model, x, t, hidden, added, *, h, w, guidance=None):
        """The Flux transformer's velocity [B, h/2 * w/2, 4C] (packed) at scheduler timestep t (0..1000)."""
        b = x.shape[0]
        g = None
        if model.config.guidance_embeds:
            g = torch.full([1], self.default_flux_guidance if guidance is None else guidance,
                           device=x.device, dtype=torch.float32).expand(b)
        txt_ids = torch.zeros(hidden.shape[1], 3, device=x.device, dtype=hidden.dtype)
        return model(hidden_states=x, timestep=t.expand(b).to(x.dtype) / 1000, guidance=g,
                     pooled_projections=added["pooled_projections"], encoder_hidden_states=hidden, txt_ids=txt_ids,
                     img_ids=self.image_ids(h, w, x.device, x.dtype), return_dict=False)[0]


FLUX = FluxFamily(
    base_model_version="flux1",
    name="flux", display_name="Flux.1",
    text_encoders=2, hidden_layer="last", pooled=True,
    default_resolution=1024, default_cfg=3.5,
    lora_targets=dict(FLUX_LORA_TARGETS),
    schedule={"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True},
    pipeline_classes=("FluxPipeline",),
    t5_max_length=512,
    single_file_keys=("double_blocks.", "model.diffusion_model.double_blocks."),
    folder_components=("transformer", "text_encoder", "text_encoder_2", "vae", "scheduler"),
)
