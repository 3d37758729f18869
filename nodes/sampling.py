"""NPO / SNPO sampling nodes: thin V3 shells over `comfy.branch` (behaviour lives there)."""
from __future__ import annotations

import logging
import math

from comfy_api.latest import io

from ..core.npo import ALPHA_DEFAULT, BETA_DEFAULT, NPOSpec, sigma_bound
from .comfy.branch import (
    Guider_DualModelNPO,
    Guider_NPO,
    Guider_SNPO,
    apply_npo,
    blend_conditioning,
    encode_empty,
    negative_clip,
    negative_model,
    with_embedded_guidance,
)

NPOOffset = io.Custom("NPO_OFFSET")
CATEGORY = "sampling/npo"


def _offset_inputs() -> list:
    return [
        NPOOffset.Input("negative_offset", optional=True, tooltip="δ: the NPO (negative preference) offset"),
        io.Float.Input("beta", default=BETA_DEFAULT, min=-2.0, max=2.0, step=0.05, tooltip="β: weight of δ on the negative branch"),
        NPOOffset.Input("positive_offset", optional=True, tooltip="η: the positive offset (a regular preference LoRA)"),
        io.Float.Input("alpha", default=ALPHA_DEFAULT, min=-2.0, max=2.0, step=0.05, tooltip="α: weight of η on the negative branch"),
        io.Float.Input("sigma_min", default=0.0, min=0.0, max=1000.0, step=0.01, tooltip="δ acts only for sigma >= this"),
        io.Float.Input("sigma_max", default=0.0, min=0.0, max=1000.0, step=0.01, tooltip="δ acts only for sigma <= this (0: no bound)"),
        _allow_partial_input(),
    ]


def _allow_partial_input():
    return io.Boolean.Input("allow_partial", default=False, optional=True,
                            tooltip="apply an offset even when some of its keys match no module of this model "
                                    "(they are named in the report); off: such an offset is refused")


def cfg1_warning(cfg: float, report: str) -> str:
    """With cfg 1 ComfyUI runs no unconditional rows: δ is inert. Returns the report with the note
    first, and logs a warning (never silent)."""
    if not math.isclose(float(cfg), 1.0):
        return report
    note = ("cfg = 1: ComfyUI runs no unconditional pass, so the negative offset δ has nothing to act on "
            "(this run is the positive model alone). Use cfg > 1 (for guidance-distilled models such as Flux dev, "
            "with the embedded guidance lowered, e.g. FluxGuidance 1-1.5), see docs/comfyui.md")
    logging.warning("NPO: %s", note)
    return note + "\n" + report


def _spec(negative_offset, beta, positive_offset, alpha, sigma_min, sigma_max) -> NPOSpec:
    if negative_offset is None and positive_offset is None:
        raise ValueError("connect at least one offset (negative_offset δ or positive_offset η)")
    return NPOSpec(eta=positive_offset, delta=negative_offset, alpha=alpha, beta=beta,
                   sigma_min=sigma_bound(sigma_min), sigma_max=sigma_bound(sigma_max))


class NPOGuider(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="NPOSuite_NPOGuider", display_name="NPO Guider", category=CATEGORY,
            description="CFG whose negative prediction runs θ+α·η+β·δ on the negative rows of the same batched forward (Diffusion-NPO).",
            inputs=[io.Model.Input("model"), io.Conditioning.Input("positive"), io.Conditioning.Input("negative"),
                    io.Float.Input("cfg", default=7.0, min=0.0, max=100.0, step=0.1, round=0.01), *_offset_inputs()],
            outputs=[io.Guider.Output(), io.String.Output(display_name="report")],
        )

    @classmethod
    def execute(cls, model, positive, negative, cfg, negative_offset=None, beta=BETA_DEFAULT, positive_offset=None,
                alpha=ALPHA_DEFAULT, sigma_min=0.0, sigma_max=0.0, allow_partial=False) -> io.NodeOutput:
        guider = Guider_NPO(model, _spec(negative_offset, beta, positive_offset, alpha, sigma_min, sigma_max),
                            allow_partial)
        guider.set_conds(positive, negative)
        guider.set_cfg(cfg)
        return io.NodeOutput(guider, cfg1_warning(cfg, guider.report))


class ApplyNPO(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="NPOSuite_ApplyNPO", display_name="Apply NPO", category=CATEGORY,
            description="Patch a MODEL so that any sampler's CFG uses θ+α·η+β·δ for the unconditional rows (one batched forward).",
            inputs=[io.Model.Input("model"), *_offset_inputs()],
            outputs=[io.Model.Output(), io.String.Output(display_name="report")],
        )

    @classmethod
    def execute(cls, model, negative_offset=None, beta=BETA_DEFAULT, positive_offset=None, alpha=ALPHA_DEFAULT, sigma_min=0.0,
                sigma_max=0.0, allow_partial=False) -> io.NodeOutput:
        m, report = apply_npo(model, _spec(negative_offset, beta, positive_offset, alpha, sigma_min, sigma_max),
                              allow_partial)
        return io.NodeOutput(m, report)


class NPONegativeModel(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="NPOSuite_NegativeModel", display_name="NPO Negative Model", category=CATEGORY,
            description="θ+α·η+β·δ as a MODEL with ComfyUI weight patches (for the Dual-Model NPO Guider).",
            inputs=[io.Model.Input("model"), NPOOffset.Input("negative_offset"),
                    io.Float.Input("beta", default=BETA_DEFAULT, min=-2.0, max=2.0, step=0.05),
                    NPOOffset.Input("positive_offset", optional=True),
                    io.Float.Input("alpha", default=ALPHA_DEFAULT, min=-2.0, max=2.0, step=0.05),
                    _allow_partial_input()],
            outputs=[io.Model.Output(display_name="negative_model"), io.String.Output(display_name="report")],
        )

    @classmethod
    def execute(cls, model, negative_offset, beta, positive_offset=None, alpha=ALPHA_DEFAULT,
                allow_partial=False) -> io.NodeOutput:
        m, report = negative_model(model, positive_offset, negative_offset, alpha, beta, allow_partial)
        return io.NodeOutput(m, report)


class NPONegativeCLIP(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="NPOSuite_NegativeCLIP", display_name="NPO Negative CLIP", category=CATEGORY,
            description="The text encoder of θ+α·η+β·δ: a CLIP with the offsets' text-encoder parts as ComfyUI weight "
                        "patches. Encode the NEGATIVE prompt with it (the positive prompt with the plain / η CLIP).",
            inputs=[io.Clip.Input("clip"), NPOOffset.Input("negative_offset"),
                    io.Float.Input("beta", default=BETA_DEFAULT, min=-2.0, max=2.0, step=0.05, tooltip="β: weight of δ's text-encoder part"),
                    NPOOffset.Input("positive_offset", optional=True),
                    io.Float.Input("alpha", default=ALPHA_DEFAULT, min=-2.0, max=2.0, step=0.05, tooltip="α: weight of η's text-encoder part")],
            outputs=[io.Clip.Output(display_name="negative_clip"), io.String.Output(display_name="report")],
        )

    @classmethod
    def execute(cls, clip, negative_offset, beta, positive_offset=None, alpha=ALPHA_DEFAULT) -> io.NodeOutput:
        c, report = negative_clip(clip, positive_offset, negative_offset, alpha, beta)
        return io.NodeOutput(c, report)


class DualModelNPOGuider(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="NPOSuite_DualModelNPOGuider", display_name="Dual-Model NPO Guider", category=CATEGORY,
            description="General NPO: positive prediction from `model`, negative prediction from `negative_model` (any second MODEL of the same family).",
            inputs=[io.Model.Input("model"), io.Model.Input("negative_model"), io.Conditioning.Input("positive"),
                    io.Conditioning.Input("negative"), io.Float.Input("cfg", default=7.0, min=0.0, max=100.0, step=0.1, round=0.01)],
            outputs=[io.Guider.Output()],
        )

    @classmethod
    def execute(cls, model, negative_model, positive, negative, cfg) -> io.NodeOutput:
        if type(model.model.model_config) is not type(negative_model.model.model_config):
            raise ValueError(f"negative_model is a {type(negative_model.model.model_config).__name__} model, "
                             f"model is {type(model.model.model_config).__name__}: both must be the same family")
        guider = Guider_DualModelNPO(model, negative_model)
        guider.set_conds(positive, negative)
        guider.set_cfg(cfg)
        return io.NodeOutput(guider)


class SNPOGuider(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="NPOSuite_SNPOGuider", display_name="SNPO Guider", category=CATEGORY,
            description="Diff-SNPO sampling: CFG whose unconditional input is the encoded empty prompt ∅, optionally blended with a negative prompt. ∅ takes the positive's embedded guidance (FluxGuidance) if it has one.",
            inputs=[io.Model.Input("model"), io.Clip.Input("clip"), io.Conditioning.Input("positive"),
                    io.Float.Input("cfg", default=7.0, min=0.0, max=100.0, step=0.1, round=0.01),
                    io.Conditioning.Input("negative", optional=True),
                    io.Float.Input("negative_weight", default=0.0, min=0.0, max=1.0, step=0.05,
                                   tooltip="uncond = (1−w)·∅ + w·negative")],
            outputs=[io.Guider.Output()],
        )

    @classmethod
    def execute(cls, model, clip, positive, cfg, negative=None, negative_weight=0.0) -> io.NodeOutput:
        guider = Guider_SNPO(model)
        guider.set_conds(positive, blend_conditioning(with_embedded_guidance(encode_empty(clip), positive), negative,
                                                      negative_weight))
        guider.set_cfg(cfg)
        return io.NodeOutput(guider)


NODES = [NPOGuider, ApplyNPO, NPONegativeModel, NPONegativeCLIP, DualModelNPOGuider, SNPOGuider]
