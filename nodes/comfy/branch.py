"""ComfyUI adapter: NPO offsets on ComfyUI MODEL objects (ModelPatcher).

Two ways to give the negative (unconditional) branch `θ + α·η + β·δ` (METHODS.md, seed 001 §3.2):
  * branch path (`apply_npo`): one batched forward; a `model_function_wrapper` reads
    `cond_or_uncond`, and forward hooks installed for that forward alone add each low-rank
    offset to the rows of its branch. Nothing in the weights changes, so it composes with
    LoRA weight patches, FreeU/transformer patches, low-VRAM casting and other wrappers.
  * merged path (`negative_model`): a ModelPatcher clone carrying ComfyUI weight patches
    (`add_patches`), used by the Dual-Model NPO guider for any second MODEL.
Offsets arrive keyed by diffusers module paths (core/offsets/types.py); ComfyUI's UNet uses LDM
names, mapped with `comfy.utils.unet_to_diffusers`.
"""
from __future__ import annotations

import logging
import math

import torch

import comfy.model_management
import comfy.model_patcher
import comfy.samplers
import comfy.utils

from ...core.npo import NPOSpec, match_deltas, npo_groups
from ...core.offsets.keys import ClipKeyMap, clip_coverage_line, comfy_clip_deltas, weight_module_map
from ...core.offsets.types import LowRankDelta, Offset, coverage_line
from .keymap import Mapped, comfy_family, map_file_keys
from .rows import NPOBranchWrapper


# ---------------------------------------------------------------------------------------------
# key mapping
# ---------------------------------------------------------------------------------------------
def diffusers_to_ldm_modules(model_patcher) -> dict[str, str]:
    """diffusers UNet module path -> LDM module path inside `diffusion_model`."""
    return weight_module_map(comfy.utils.unet_to_diffusers(model_patcher.model.model_config.unet_config))


def unet_deltas_ldm(offset: Offset | None, model_patcher) -> tuple[dict, list[str]]:
    """The offset's UNet deltas re-keyed to LDM module paths; also the keys that match nothing
    (diffusers-keyed SD1.x / SDXL offsets on an LDM UNet)."""
    if offset is None:
        return {}, []
    mapping = diffusers_to_ldm_modules(model_patcher)
    # already-LDM keys pass through
    return match_deltas(offset.unet, model_patcher.model.diffusion_model, lambda name: (mapping.get(name, name),))


def model_deltas(offset: Offset | None, model_patcher) -> Mapped:
    """The offset's diffusion-model deltas keyed by module paths inside `diffusion_model`.

    File-keyed offsets (any family) go through ComfyUI's own key map (keymap.py); offsets read with
    SD1.x / SDXL module names (the SD path, unchanged) through the diffusers -> LDM table. A model
    family this package does not know is a ValueError (`comfy_family`).
    """
    fam = comfy_family(model_patcher)
    if offset is None:
        return Mapped()
    if offset.file_keys:
        return map_file_keys(offset.unet, model_patcher)
    if not fam.unet:
        what = offset.report.family if offset.report is not None and offset.report.family else "SD1.x / SDXL"
        raise ValueError(f"this offset was read with {what} UNet module names, but the model is {fam.name}: load it "
                         f"with Load Weight Offset family 'model' (keys resolved by ComfyUI's key map of the model)")
    mapped, unmatched = unet_deltas_ldm(offset, model_patcher)
    return Mapped(mapped, len(mapped), unmatched)


def checked_deltas(offset: Offset | None, model_patcher, role: str, allow_partial: bool) -> Mapped:
    """`model_deltas`, refusing an offset none of whose keys apply, and a partial one unless `allow_partial`."""
    m = model_deltas(offset, model_patcher)
    if offset is None:
        return m
    if not m.modules:
        raise ValueError(f"{role} offset: none of its {len(offset.unet)} diffusion-model keys match this model"
                         + (f" (e.g. {m.unmatched[0]})" if m.unmatched else ""))
    if m.unmatched and not allow_partial:
        head = "; ".join(m.unmatched[:5]) + (f"; ... and {len(m.unmatched) - 5} more" if len(m.unmatched) > 5 else "")
        raise ValueError(f"{role} offset: {len(m.unmatched)} of its {len(offset.unet)} keys do not apply to this "
                         f"{comfy_family(model_patcher).name} model: {head}. Set allow_partial to apply the other "
                         f"{m.applied} anyway")
    return m


TE_NOTE_DELTA = "apply to the negative prompt through NPO Negative CLIP (encode the negative prompt with it)"
TE_NOTE_ETA = ("apply to the positive prompt through LoraLoader (strength_clip 1) and, x α, to the negative "
               "prompt through NPO Negative CLIP")


def describe_coverage(offset: Offset | None, model_patcher, role: str, te_note: str = TE_NOTE_DELTA,
                      mapped: Mapped | None = None) -> str:
    """One line for logs / node reports: how much of the offset the model accepted (and where its
    text-encoder part goes: the UNet nodes never apply it, NPO Negative CLIP does)."""
    if offset is None:
        return coverage_line(None, 0, (), role)
    m = mapped if mapped is not None else model_deltas(offset, model_patcher)
    return coverage_line(offset, m.applied, m.unmatched, role, te_note=te_note)


CFG1_NOTE = ("δ acts on the unconditional rows, which ComfyUI computes only when cfg != 1: at cfg 1 NPO is inert "
             "(only η on the positive rows applies)")


def cfg1_note(model_patcher) -> str:
    """The cfg = 1 note of a report (stronger for guidance-distilled models, whose default is cfg 1)."""
    fam = comfy_family(model_patcher)
    if fam.guidance_distilled:
        return (f"{fam.name} with a guidance embedding is guidance-distilled and usually run at cfg 1: {CFG1_NOTE}. "
                "For NPO run real CFG (cfg > 1, e.g. 2-4) with the embedded guidance lowered (FluxGuidance 1-1.5)")
    return CFG1_NOTE


# ---------------------------------------------------------------------------------------------
# branch path: one batched forward, per-row offsets
# ---------------------------------------------------------------------------------------------
def apply_npo(model_patcher, spec: NPOSpec, allow_partial: bool = False):
    """A clone of `model_patcher` whose CFG forward does NPO on the negative rows.

    Returns (clone, report). With cfg = 1 ComfyUI runs no negative rows: only η applies (the
    report says so, and the wrapper logs a warning when a run has no unconditional rows).
    """
    eta = checked_deltas(spec.eta, model_patcher, "positive", allow_partial)
    delta = checked_deltas(spec.delta, model_patcher, "negative", allow_partial)
    m = model_patcher.clone()
    previous = m.model_options.get("model_function_wrapper")
    m.set_model_unet_function_wrapper(NPOBranchWrapper(eta.modules, delta.modules, spec, previous))
    if delta.modules or (eta.modules and spec.alpha != 1.0):  # something differs between the branches
        m.set_model_sampler_pre_cfg_function(Cfg1Warning(comfy_family(model_patcher).name))
    report = "; ".join([describe_coverage(spec.eta, model_patcher, "positive η", TE_NOTE_ETA, eta),
                        describe_coverage(spec.delta, model_patcher, "negative δ", mapped=delta)])
    return m, report + "\n" + cfg1_note(model_patcher)


class Cfg1Warning:
    """`sampler_pre_cfg_function` that logs a warning on the first step of a run sampled with cfg 1
    (ComfyUI then computes no unconditional rows, so δ has nothing to act on); changes nothing."""

    def __init__(self, family: str):
        self.family = family

    def __deepcopy__(self, memo):
        return self

    def __call__(self, args: dict):
        if math.isclose(float(args["cond_scale"]), 1.0):
            sigmas = args["model_options"].get("transformer_options", {}).get("sample_sigmas")
            first = sigmas is None or bool(torch.isclose(args["sigma"].flatten()[0].float().cpu(),
                                                         sigmas[0].float().cpu()))
            if first:
                logging.warning("NPO (%s): this run samples with cfg 1: ComfyUI computes no unconditional rows, so "
                                "the negative offset δ has nothing to act on. %s", self.family, CFG1_NOTE)
        return args["conds_out"]


# ---------------------------------------------------------------------------------------------
# merged path: ComfyUI weight patches
# ---------------------------------------------------------------------------------------------
def comfy_patches(deltas_ldm: dict, prefix: str = "diffusion_model.") -> dict:
    """ComfyUI `add_patches` dict {state-dict key: patch} for LDM-keyed deltas."""
    try:  # ComfyUI >= 0.3.3x: weight adapters
        from comfy.weight_adapter.lora import LoRAAdapter
    except ImportError:  # older ComfyUI: tuple patches
        LoRAAdapter = None
    patches = {}
    for name, d in deltas_ldm.items():
        key = f"{prefix}{name}.weight"
        if isinstance(d, LowRankDelta) and d.mid is None:
            rank = d.rank
            weights = (d.up, d.down, float(d.scale) * rank, None, None, None)  # ComfyUI: alpha / rank
            patches[key] = LoRAAdapter(set(), weights) if LoRAAdapter is not None else ("lora", weights[:5])
        else:
            patches[key] = ("diff", (d.dense(torch.float32),))
            if getattr(d, "bias", None) is not None:
                patches[f"{prefix}{name}.bias"] = ("diff", (d.scale * d.bias.float(),))
    return patches


def negative_model(model_patcher, eta: Offset | None, delta: Offset | None, alpha: float, beta: float,
                   allow_partial: bool = False):
    """`θ + α·η + β·δ` as a ModelPatcher clone with ComfyUI weight patches (loads/offloads normally)."""
    m = model_patcher.clone()
    eta_m = checked_deltas(eta, model_patcher, "positive", allow_partial)
    delta_m = checked_deltas(delta, model_patcher, "negative", allow_partial)
    for deltas, w in npo_groups(eta_m.modules, delta_m.modules, alpha, beta)["neg"]:  # η first, then δ
        m.add_patches(comfy_patches(deltas), strength_patch=w)
    report = "; ".join([describe_coverage(eta, model_patcher, f"η x {alpha:g}", TE_NOTE_ETA, eta_m),
                        describe_coverage(delta, model_patcher, f"δ x {beta:g}", mapped=delta_m)])
    return m, report


# ---------------------------------------------------------------------------------------------
# text-encoder part of the negative model: ComfyUI weight patches on a CLIP clone
# ---------------------------------------------------------------------------------------------
def clip_shapes(clip) -> dict[str, tuple]:
    """{module path: weight shape} of a ComfyUI CLIP's text encoders (`cond_stage_model`)."""
    return {k[: -len(".weight")]: tuple(v.shape) for k, v in clip.cond_stage_model.state_dict().items()
            if k.endswith(".weight")}


def negative_clip(clip, eta: Offset | None, delta: Offset | None, alpha: float, beta: float):
    """The text encoder of the NPO negative model `θ+α·η+β·δ` (METHODS.md "NPO guidance at sampling
    time": the negative branch is that model as a whole, so the negative prompt c' is encoded by its
    text encoder): a CLIP clone with the offsets' text-encoder parts as ComfyUI weight patches.

    Returns (clip, report). Every offset is mapped and checked before anything is patched; when no
    text-encoder module applies the input CLIP is returned unchanged (and the report says why).
    """
    shapes = clip_shapes(clip)
    planned = []  # (keymap, weight)
    lines = []
    for off, w, role in ((eta, alpha, "positive η"), (delta, beta, "negative δ")):
        km = comfy_clip_deltas(off.text_encoders, shapes) if off is not None else ClipKeyMap()
        lines.append(clip_coverage_line(off, km, role, w))
        if km.modules and w != 0.0:
            planned.append((km, float(w)))
    if not planned:
        return clip, "; ".join(lines + ["CLIP unchanged: nothing to apply to the negative prompt's text encoder"])
    out = clip.clone()
    for km, w in reversed(planned):  # δ first, then η: the order of LoraLoader(δ) -> LoraLoader(η) (same float sums)
        out.add_patches(comfy_patches(km.modules, prefix=""), strength_patch=w)
    return out, "; ".join(lines)


# ---------------------------------------------------------------------------------------------
# guiders
# ---------------------------------------------------------------------------------------------
class Guider_NPO(comfy.samplers.CFGGuider):
    """CFG whose negative prediction comes from `θ+α·η+β·δ` in the same batched forward.

    eps = eps_neg + w·(eps_pos − eps_neg) (seed 001 §3.2) is ComfyUI's own CFG combine, so
    `predict_noise` is inherited: `cfg_function` runs the sampler_cfg / post-cfg hooks.
    """

    def __init__(self, model_patcher, spec: NPOSpec, allow_partial: bool = False):
        patched, self.report = apply_npo(model_patcher, spec, allow_partial)
        super().__init__(patched)
        self.spec = spec


class Guider_DualModelNPO(comfy.samplers.CFGGuider):
    """General path: positive prediction from `model`, negative from a second MODEL.

    When both are clones of one network (e.g. the NPO Negative Model of the same checkpoint),
    ComfyUI can hold only one set of weight patches at a time, so each step re-loads the patcher
    it is about to run (slower, but the negative patches really apply).
    """

    def __init__(self, model_patcher, negative_patcher):
        m = model_patcher.clone()
        super().__init__(m)
        self.negative_patcher = negative_patcher
        self.shared = negative_patcher.is_clone(model_patcher)
        if not self.shared:
            m.set_additional_models("npo_negative_model", [negative_patcher])

    def predict_noise(self, x, timestep, model_options={}, seed=None):
        cond, uncond = self.conds.get("positive"), self.conds.get("negative")
        no_uncond = math.isclose(self.cfg, 1.0) and not model_options.get("disable_cfg1_optimization", False)
        if self.shared and not no_uncond:
            comfy.model_management.load_models_gpu([self.model_patcher])
        cond_pred = comfy.samplers.calc_cond_batch(self.inner_model, [cond], x, timestep, model_options)[0]
        if no_uncond:
            uncond, uncond_pred = None, cond_pred
        else:
            if self.shared:
                comfy.model_management.load_models_gpu([self.negative_patcher])
            neg_options = comfy.model_patcher.create_model_options_clone(self.negative_patcher.model_options)
            neg_options.setdefault("transformer_options", {})["sample_sigmas"] = \
                model_options.get("transformer_options", {}).get("sample_sigmas")
            uncond_pred = comfy.samplers.calc_cond_batch(self.negative_patcher.model, [uncond], x, timestep,
                                                        neg_options)[0]
        return comfy.samplers.cfg_function(self.inner_model, cond_pred, uncond_pred, self.cfg, x, timestep,
                                           model_options=model_options, cond=cond, uncond=uncond)


class Guider_SNPO(comfy.samplers.CFGGuider):
    """SNPO sampling (seed 000 §4.3): plain CFG whose unconditional input is ∅ (the encoded
    empty prompt), optionally blended with the user's negative prompt: (1−w)·∅ + w·c⁻."""


def blend_conditioning(null_cond: list, negative: list | None, weight: float) -> list:
    """(1−w)·∅ + w·c⁻ per entry (ConditioningAverage semantics: the token axis is padded/cut
    to ∅'s length; pooled outputs are blended too)."""
    if negative is None or weight == 0.0:
        return null_cond
    base_t, base_d = null_cond[0][0], null_cond[0][1]
    neg_t, neg_d = negative[0][0], negative[0][1]
    if neg_t.shape[1] < base_t.shape[1]:
        neg_t = torch.cat([neg_t, torch.zeros_like(base_t[:, : base_t.shape[1] - neg_t.shape[1]])], dim=1)
    neg_t = neg_t[:, : base_t.shape[1]].to(base_t)
    t = base_t * (1.0 - weight) + neg_t * weight  # [1, tokens, dim]
    d = dict(base_d)
    if base_d.get("pooled_output") is not None and neg_d.get("pooled_output") is not None:
        d["pooled_output"] = base_d["pooled_output"] * (1.0 - weight) + neg_d["pooled_output"].to(
            base_d["pooled_output"]) * weight
    return [[t, d]]


def encode_empty(clip) -> list:
    """∅: the encoded empty prompt, exactly what the model saw under CFG dropout."""
    tokens = clip.tokenize("")
    return clip.encode_from_tokens_scheduled(tokens)


EMBEDDED_GUIDANCE = "guidance"  # FluxGuidance's key (Flux dev, HunyuanVideo): a model control, not text


def with_embedded_guidance(null_cond: list, positive: list) -> list:
    """∅ carrying the positive's embedded guidance (FluxGuidance), so the unconditional row differs from
    the conditional one in its text only; without it the model's default (Flux: 3.5) would apply to ∅
    while the positive runs at the lowered guidance of real CFG (docs/comfyui.md, cfg = 1)."""
    values = {e[1][EMBEDDED_GUIDANCE] for e in positive if e[1].get(EMBEDDED_GUIDANCE) is not None}
    if not values:
        return null_cond
    if len(values) > 1:
        raise ValueError(f"SNPO: the positive conditioning has several embedded guidance values {sorted(values)}; "
                         "set one with FluxGuidance")
    g = values.pop()
    return [[t, {**d, EMBEDDED_GUIDANCE: g}] for t, d in null_cond]
