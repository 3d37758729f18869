"""SANA (Efficient-Large-Model/Sana_*_diffusers): a linear-attention DiT on DC-AE latents (32 channels,
32x down-sampling) with one Gemma2 text encoder, as `SanaPipeline`:

  prompts are lower-cased and stripped (`_text_preprocessing`, clean_caption False);
  a positive prompt gets the pipeline's `complex_human_instruction` (its default list, joined by
    newlines) prepended, is tokenized to len(instruction tokens) + max_sequence_length - 2 tokens
    (padding right), encoded by Gemma2 with its attention mask, and the token at 0 plus the last
    max_sequence_length - 1 are kept (`select_index`): prompt embeds [B, 300, 2304] and mask [B, 300];
  a negative prompt (default "") is encoded WITHOUT the instruction and without the selection, to
    max_sequence_length tokens: the null conditioning is the encoded "", not zeros;
  the transformer gets the mask as `encoder_attention_mask` (`Cond.added["encoder_attention_mask"]`,
    cond and uncond rows concatenated like SD3's pooled projections) and the timestep t·timestep_scale.

Sampling: the hub folders ship a DPMSolverMultistepScheduler (`prediction_type` flow_prediction,
`use_flow_sigmas`, `flow_shift`). We sample with flow Euler (diffusers' FlowMatchEulerDiscreteScheduler)
at that `flow_shift`, not with SANA's DPM-Solver: `flow_scheduler` builds it and says so; a scheduler we
cannot read as a static-shift flow schedule is refused. 1024 px (sample_size 32 x DC-AE 32), CFG 4.5.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .base import RunEncoder, _run
from .flow import FlowFamily

SANA_ATTN = ("to_q", "to_k", "to_v", "to_out.0")  # attn1 (linear self-attention) and attn2 (cross) of each block
# GLUMBConv's two 1x1 convolutions; its depthwise 3x3 `conv_depth` (groups = channels) is left out
SANA_FF = ("ff.conv_inverted", "ff.conv_point")
SANA_LORA_TARGETS = {"attn": SANA_ATTN, "attn_ff": SANA_ATTN + SANA_FF}
OTHER_SANA_PIPELINES = {  # Sana folders whose sampling is not SanaPipeline's: refused with the reason
    "SanaSprintPipeline": "SANA-Sprint is a few-step consistency model (SCM scheduler, guidance embedding)",
    "SanaSprintImg2ImgPipeline": "SANA-Sprint is a few-step consistency model (SCM scheduler, guidance embedding)",
    "SanaControlNetPipeline": "a ControlNet pipeline (its control input is not wired here)",
    "SanaPAGPipeline": "perturbed-attention guidance is not one of our guidance modes",
    "SanaVideoPipeline": "a video model",
}


def complex_human_instruction() -> list[str]:
    """The default `complex_human_instruction` of the installed diffusers' `SanaPipeline.__call__`."""
    import inspect

    from diffusers import SanaPipeline

    return list(inspect.signature(SanaPipeline.__call__).parameters["complex_human_instruction"].default or [])


@dataclass(frozen=True)
class SanaFamily(FlowFamily):
    text_added_key: str = "encoder_attention_mask"
    vae_class: str = "AutoencoderDC"

    def encode_text(self, tokenizers: Sequence, text_encoders: Sequence, prompts: Sequence[str], device, *,
                    run: RunEncoder = _run, max_sequence_length: int | None = None, negative: bool = False):
        """(prompt embeds [B, L, D], attention mask [B, L] int64) of `prompts`, L = max_sequence_length (300), as
        `SanaPipeline.encode_prompt`: positive prompts with the complex human instruction and the token
        selection, negative ones (`negative=True`, the null conditioning "") without either."""
        tok, te = tokenizers[0], text_encoders[0]
        n = max_sequence_length or self.t5_max_length
        texts = [p.lower().strip() for p in prompts]
        chi = [] if negative else complex_human_instruction()
        total = n
        if chi:
            chi_prompt = "\n".join(chi)
            texts = [chi_prompt + p for p in texts]
            total = len(tok.encode(chi_prompt)) + n - 2
        tok.padding_side = "right"  # as the pipeline sets it (Gemma's tokenizers pad left by default)
        enc = tok(texts, padding="max_length", max_length=total, truncation=True, add_special_tokens=True,
                  return_tensors="pt")
        ids, mask = enc.input_ids.to(device), enc.attention_mask.to(device)
        hidden = run(0, te, ids, attention_mask=mask)[0].to(te.dtype)  # [B, total, D]
        if not negative:
            keep = [0] + list(range(-n + 1, 0))
            hidden, mask = hidden[:, keep], mask[:, keep]
        return hidden, mask

    def cache_tag(self) -> str:
        """The instruction prefix (the installed diffusers' default) and the token length: a cached encoding made
        with another prefix is not reused."""
        import hashlib

        chi = "\n".join(complex_human_instruction())
        return f":chi={hashlib.sha1(chi.encode('utf-8')).hexdigest()[:12]}:len={self.t5_max_length}"

    def flow_scheduler(self, scheduler):
        """(the FlowMatchEulerDiscreteScheduler generate and the trainer use, what was read) from a folder's
        scheduler: DPMSolverMultistep with flow_prediction and use_flow_sigmas -> flow Euler at its flow_shift;
        a FlowMatchEulerDiscreteScheduler with a static shift as it is; anything else refused."""
        from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler

        c = scheduler.config
        name = type(scheduler).__name__
        if isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
            if c.get("use_dynamic_shifting", False):
                raise ValueError(f"{self.display_name}: the folder's {name} asks for use_dynamic_shifting, which "
                                 f"SanaPipeline cannot sample (it passes no mu); refusing rather than guessing a shift")
            return scheduler, f"{name}, shift {c.get('shift')}"
        if isinstance(scheduler, DPMSolverMultistepScheduler):
            bad = [k for k in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas")
                   if c.get(k, False)]
            if c.get("prediction_type") != "flow_prediction" or not c.get("use_flow_sigmas", False) or bad:
                raise ValueError(f"{self.display_name}: the folder's {name} is not a flow schedule we can honour "
                                 f"(prediction_type {c.get('prediction_type')!r}, use_flow_sigmas "
                                 f"{c.get('use_flow_sigmas')}{', ' + ', '.join(bad) if bad else ''}); SANA folders "
                                 f"use flow_prediction with use_flow_sigmas")
            shift = float(c.get("flow_shift") or 1.0)
            euler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=int(c.get("num_train_timesteps", 1000)),
                                                    shift=shift)
            return euler, (f"FlowMatchEulerDiscreteScheduler, shift {shift} (the folder's {name} flow_shift; flow "
                           f"Euler, not SANA's DPM-Solver)")
        raise ValueError(f"{self.display_name}: the folder's scheduler {name} is not a flow schedule we can honour "
                         f"(expected DPMSolverMultistepScheduler with flow_prediction, or FlowMatchEulerDiscreteScheduler)")

    def refusal(self, pipeline_class: str) -> str | None:
        why = OTHER_SANA_PIPELINES.get(pipeline_class)
        return None if why is None else (f"a {pipeline_class} folder is not supported ({why}); {self.display_name} "
                                         f"folders of SanaPipeline are")

    def velocity(self, model, x, t, hidden, added, *, h, w, guidance=None):
        """The SANA transformer's velocity [B, C, h, w] at scheduler timestep t (0..1000), as SanaPipeline calls it:
        timestep t·timestep_scale, the text mask as encoder_attention_mask; a learned-sigma output (out_channels
        = 2 in_channels) keeps its first half."""
        cfg = model.config
        if cfg.get("guidance_embeds", False):
            raise ValueError(f"{self.display_name}: this transformer embeds guidance (SANA-Sprint); SanaPipeline "
                             f"models do not, and that call is not wired here")
        b = x.shape[0]
        out = model(hidden_states=x, encoder_hidden_states=hidden, encoder_attention_mask=added[self.text_added_key],
                    timestep=t.expand(b) * cfg.timestep_scale, return_dict=False)[0]
        if (cfg.out_channels or cfg.in_channels) // 2 == cfg.in_channels:
            out = out.chunk(2, dim=1)[0]
        return out


SANA = SanaFamily(
    base_model_version="sana",
    name="sana", display_name="SANA",
    text_encoders=1, hidden_layer="last", pooled=False,
    default_resolution=1024, default_cfg=4.5,
    lora_targets=dict(SANA_LORA_TARGETS),
    schedule={"num_train_timesteps": 1000, "shift": 3.0},
    pipeline_classes=("SanaPipeline",),
    t5_max_length=300,  # SanaPipeline's max_sequence_length (Gemma2 tokens)
    # the original (Efficient-Large-Model/Sana) checkpoints: GLUMBConv and the caption RMS norm
    single_file_keys=("blocks.0.mlp.inverted_conv.", "attention_y_norm."),
    folder_components=("transformer", "text_encoder", "tokenizer", "vae", "scheduler"),
)
