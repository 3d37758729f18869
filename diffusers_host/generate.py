"""`python -m npo_suite generate`: batch generation with cfg / npo / snpo guidance.

The sampling loop is ours (diffusers schedulers' `set_timesteps`, `scale_model_input`, `step`):
each step is ONE batched UNet forward (rows [0, B) conditional, [B, 2B) unconditional) in which
`core.branch_lora` gives each half its own weight offset, then `core.guidance.guide` combines
the halves (METHODS.md "NPO guidance at sampling time"). `sample()` is the library entry point
(the demo and the evaluation call it); `run_generate(GenerateJob)` is a batch run (cli/generate.py parses it).
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from ..core.atomic import atomic_path
from ..core.branch_lora import branch_offsets, component_deltas
from ..core.conditioning import vae_decode
from ..core.guidance import MODES, guide, offset_active
from ..core.npo import ALPHA_DEFAULT, BETA_DEFAULT, COND, UNCOND, NPOSpec, row_groups
from ..core.offsets.types import Offset
from ..core.flow import FLOW, euler_timesteps, sigma_of_t
from ..families.flow import FlowFamily
from ..core.sampling import sample_flow_euler, sample_scheduler
from ..core.cond import Cond
from ..core.prompts import read_prompts_file
from ..core.summary import DataSummary

SCHEDULERS = ("ddim", "euler", "dpmpp")  # SD1.x / SDXL (epsilon / v models)
# flow models: SD3 / Flux / SANA with FlowMatchEulerDiscreteScheduler from the model's config (SANA: at its flow_shift); a flow UNet (the
# digits world's) with core.flow's Euler solver on the same t grid
FLOW_SCHEDULERS = ("flow-euler",)
NPO_PATHS = ("fast", "two-model")


def build_scheduler(name: str, base):
    """A fresh diffusers scheduler of kind `name` built from the model's own scheduler config."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

    classes = {"ddim": DDIMScheduler, "euler": EulerDiscreteScheduler, "dpmpp": DPMSolverMultistepScheduler}
    if name not in classes:
        raise ValueError(f"unknown scheduler {name!r} (expected one of {SCHEDULERS})")
    extra = {"algorithm_type": "dpmsolver++"} if name == "dpmpp" else {}
    return classes[name].from_config(base.config, **extra)


def Offsets(pos: Offset | None = None, neg: Offset | None = None, snpo: Offset | None = None,  # noqa: N802
            alpha: float = ALPHA_DEFAULT, beta: float = BETA_DEFAULT) -> NPOSpec:
    """generate's names for `core.npo.NPOSpec`: pos = eta, neg = delta, snpo = the SNPO LoRA s; any may be None."""
    return NPOSpec(eta=pos, delta=neg, alpha=alpha, beta=beta, snpo=snpo)


@dataclass
class SampleResult:
    latents: torch.Tensor  # [N, C, h, w] final latents (pixels for pixel-space models)
    images: torch.Tensor | None  # [N, 3 or 1, H, W] in [0, 1], None when decode=False


# ----------------------------------------------------------------------------------------------
# Text conditioning
# ----------------------------------------------------------------------------------------------
def _run_te(te, i: int, ids: torch.Tensor, groups, rows, **kw):
    """Encoder i's forward with each prompt's offset group on its rows (core.conditioning `run`); kw go to
    the forward (SANA's attention_mask)."""
    comp = f"te{i + 1}"
    # an Offset's text-encoder part; a bare module -> Delta mapping is a UNet offset (nothing here)
    active = {g: [(o, w) for o, w in terms if isinstance(o, Offset) and component_deltas(o, comp)]
              for g, terms in (groups or {}).items()}
    if not any(active.values()):
        return te(ids, output_hidden_states=True, **kw)
    with branch_offsets(te, active, rows=[r if active.get(r) else None for r in rows], component=comp):
        return te(ids, output_hidden_states=True, **kw)


def encode_prompts(bundle, prompts: list[str], groups=None, rows=None, *, negative: bool = False) -> Cond:
    """Text conditioning of `prompts` [B]; rows[i] names the offset group of prompt i's text encoder.

    SD1.x / world: last hidden state of the CLIP encoder. SDXL: penultimate hidden states of both
    encoders concatenated, pooled projection of the second; empty prompts give zeros when the
    pipeline says `force_zeros_for_empty_prompt` (what SDXL saw under dropout). SD3 / Flux: the
    family's `encode_text` (the pipeline's `encode_prompt`), pooled as `pooled_projections`; the T5
    length is the family's default or `bundle.extra["max_sequence_length"]`. SANA: Gemma2's hidden states
    with the attention mask as `encoder_attention_mask`. negative: these are negative / null prompts, encoded
    as the pipeline encodes those (SANA: without its instruction prefix; the same for the others).
    """
    rows = list(rows) if rows is not None else [None] * len(prompts)
    dev = bundle.device
    fam = bundle.family_spec
    if isinstance(fam, FlowFamily):  # SD3 / Flux / SANA: the pipeline's own encoding; the null conditioning is the encoded ""
        with torch.no_grad():
            hidden, second = fam.encode_text(bundle.tokenizers, bundle.text_encoders, prompts, dev,
                                             run=lambda i, te, ids, **kw: _run_te(te, i, ids, groups, rows, **kw),
                                             max_sequence_length=bundle.extra.get("max_sequence_length"),
                                             negative=negative)
        return Cond(hidden.to(bundle.dtype), {fam.text_added_key: second.to(bundle.dtype)})
    with torch.no_grad():
        hidden, pooled = bundle.family_spec.encode_text(bundle.tokenizers, bundle.text_encoders, prompts, dev,
                                                        run=lambda i, te, ids: _run_te(te, i, ids, groups, rows))
        if pooled is None:
            return Cond(hidden.to(bundle.dtype))  # [B, L, D]
        if bundle.force_zeros_for_empty_prompt:
            empty = torch.tensor([p == "" for p in prompts], device=dev)
            hidden = torch.where(empty[:, None, None], torch.zeros_like(hidden), hidden)
            pooled = torch.where(empty[:, None], torch.zeros_like(pooled), pooled)
        return Cond(hidden.to(bundle.dtype), {"text_embeds": pooled.to(bundle.dtype)})


# ----------------------------------------------------------------------------------------------
# Predictors: fast path (one forward, per-row offsets) and two-model path
# ----------------------------------------------------------------------------------------------
class _TwoModel:
    """The general path: one materialised copy of the UNet per distinct group, one forward per group."""

    def __init__(self, unet, groups):
        from ..core.offsets import materialize

        self.models = {g: (materialize(unet, [(o, w) for o, w in terms]) if terms else unet) for g, terms in groups.items()}
        self.rows = None

    def set_rows(self, rows):
        self.rows = list(rows)

    def __call__(self, x, t, hidden, added):
        out = torch.empty_like(x)
        for g in dict.fromkeys(self.rows):
            idx = torch.tensor([i for i, r in enumerate(self.rows) if r == g], device=x.device)
            sel = {k: v[idx] for k, v in added.items()}
            out[idx] = self.models[g](x[idx], t, encoder_hidden_states=hidden[idx], added_cond_kwargs=sel or None).sample
        return out


# ----------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------
def sample(bundle, prompts: list[str], seeds: list[int], mode: str = "cfg", *, negative_prompts: list[str] | None = None,
           offsets: NPOSpec | None = None, cfg_scale: float = 7.5, steps: int = 20, scheduler: str | None = None,
           sigma_min: float | None = None, sigma_max: float | None = None, height: int | None = None,
           width: int | None = None, rescale: float = 0.0, rescale_space: str = "x0", npo_path: str = "fast",
           decode: bool = True, progress=None, flux_guidance: float | None = None) -> SampleResult:
    """Generate one image per (prompts[i], seeds[i]) with guidance `mode` (a key of core.guidance.MODES).

    Same seed -> same initial noise in every mode, so modes compare image by image. The offset of
    the unconditional rows is on only while sigma_min <= sigma_t <= sigma_max (plain CFG elsewhere).
    progress: an optional callable called once per step (e.g. a tqdm bar's update).
    scheduler: None = the family's default ("ddim" for SD1.x/SDXL, "flow-euler" for SD3/Flux/SANA).
    flux_guidance: Flux-dev's embedded guidance (default 3.5, the pipeline's); lower it (1-2) when
      cfg_scale > 1 does the guiding. Refused for a model without a guidance embedding.
    """
    scheduler = scheduler or bundle.family_spec.default_scheduler
    if isinstance(bundle.family_spec, FlowFamily):  # a flow transformer (SD3, Flux, SANA)
        return _sample_flow(bundle, prompts, seeds, mode, negative_prompts=negative_prompts, offsets=offsets,
                            cfg_scale=cfg_scale, steps=steps, scheduler=scheduler, sigma_min=sigma_min,
                            sigma_max=sigma_max, height=height, width=width, rescale=rescale, npo_path=npo_path,
                            decode=decode, progress=progress, flux_guidance=flux_guidance)
    if scheduler not in SCHEDULERS + FLOW_SCHEDULERS:
        raise ValueError(f"unknown scheduler {scheduler!r} (expected one of {SCHEDULERS + FLOW_SCHEDULERS})")
    if flux_guidance is not None:
        raise ValueError("flux_guidance is Flux's embedded guidance; this model is "
                         f"{bundle.family_spec.display_name}")
    _check_request(mode, prompts, seeds, npo_path, steps)
    flow = bundle.prediction_type == FLOW
    if flow != (scheduler in FLOW_SCHEDULERS):
        raise ValueError(f"scheduler {scheduler!r} does not sample a {bundle.prediction_type} model (flow models: "
                         f"{FLOW_SCHEDULERS}; others: {SCHEDULERS})")
    if flow and rescale:
        raise ValueError("CFG rescale is not wired for flow models (its spaces are read through abar)")
    spec, offsets = MODES[mode], offsets or NPOSpec()
    groups = offsets.groups()
    b, dev, dt, unet = len(prompts), bundle.device, bundle.dtype, bundle.unet
    # 1. conditioning: cond rows, uncond rows (neg group), uncond rows with the pos group (outside the interval)
    negs, gate, cond, unc, unc_off = _encode_rows(bundle, prompts, negative_prompts, spec, groups)
    ls = bundle.latent_scale
    height = height or unet.config.sample_size * ls
    width = width or unet.config.sample_size * ls
    if height % ls or width % ls:
        raise ValueError(f"height/width must be multiples of {ls}, got {height}x{width}")
    time_ids = bundle.family_spec.size_ids(2 * b, (height, width), dtype=dt, device=dev)  # SDXL: [2B, 6]
    added_extra = {"time_ids": time_ids} if time_ids is not None else {}
    # 2. initial noise, one generator per seed
    shape = (unet.config.in_channels, height // ls, width // ls)
    latents = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])
    if flow:  # x_1 = ε; v-model timestep t·N; σ = t/(1 − t) for the gate
        n_train = bundle.scheduler.config.num_train_timesteps
        latents = latents.to(dev, dt)
        sigma_at = lambda t: float(sigma_of_t(float(t) / n_train))  # noqa: E731
    else:
        sched = build_scheduler(scheduler, bundle.scheduler)
        sched.set_timesteps(steps, device=dev)
        latents = (latents * sched.init_noise_sigma).to(dev, dt)  # [B, C, h, w]
        abar = sched.alphas_cumprod.to(torch.float64)
    predictor = _TwoModel(unet, groups) if npo_path == "two-model" else None
    with torch.no_grad(), (branch_offsets(unet, groups) if predictor is None else contextlib.nullcontext()) as br:
        predictor = predictor or _Fast(unet, br)

        def model(x_in: torch.Tensor, t) -> torch.Tensor:
            # 3. the unconditional rows' model for this step (sigma interval gate)
            a_t = None if flow else abar[int(round(float(t)))].clamp(1e-12, 1.0)
            sigma = sigma_at(t) if flow else float(((1 - a_t) / a_t).sqrt())
            active = not gate or offset_active(sigma, sigma_min, sigma_max)
            u = unc if active else unc_off
            predictor.set_rows(row_groups([COND] * b + [UNCOND] * b, mode, active))
            # 4. one batched forward: [2B, C, h, w]
            added = {**{k: torch.cat([cond.added[k], u.added[k]]) for k in cond.added}, **added_extra}
            pos, neg = predictor(torch.cat([x_in, x_in]), t, torch.cat([cond.hidden, u.hidden]), added).chunk(2)
            # 5. combine in the model's own output space (the scheduler steps on it)
            return guide(mode, pos, neg, cfg_scale, rescale=rescale, rescale_space=rescale_space, x_t=x_in,
                         abar_t=None if flow else a_t.to(dt), prediction_type=bundle.prediction_type)

        if flow:  # velocities combined like eps (guidance is linear), then core.flow's Euler step
            ts = euler_timesteps(steps, float(getattr(bundle.scheduler.config, "shift", 1.0)))
            latents = sample_flow_euler(model, latents, ts, n_train, progress)
        else:
            latents = sample_scheduler(model, latents, sched, progress)
    return SampleResult(latents, decode_latents(bundle, latents) if decode else None)


class _Fast:
    """The fast path: per-row offsets via branch_offsets hooks, one forward."""

    def __init__(self, unet, br):
        self.unet, self.br = unet, br

    def set_rows(self, rows):
        self.br.set_rows(rows)

    def __call__(self, x, t, hidden, added):
        return self.unet(x, t, encoder_hidden_states=hidden, added_cond_kwargs=added or None).sample


# ----------------------------------------------------------------------------------------------
# Flow families (SD3, Flux, SANA): velocity prediction, FlowMatchEulerDiscreteScheduler
# ----------------------------------------------------------------------------------------------
class _FlowPredictor:
    """One batched transformer forward with per-row offsets (fast) or one materialised copy per group
    (two-model, the reference): velocities in the family's layout."""

    def __init__(self, fam, model, groups, br=None, *, h: int, w: int, guidance: float | None):
        from ..core.offsets import materialize

        self.fam, self.br, self.h, self.w, self.guidance = fam, br, h, w, guidance
        self.models = None if br is not None else \
            {g: (materialize(model, list(terms)) if terms else model) for g, terms in groups.items()}
        self.model, self.rows = model, None

    def set_rows(self, rows):
        self.rows = list(rows)
        if self.br is not None:
            self.br.set_rows(self.rows)

    def _v(self, model, x, t, hidden, added):
        return self.fam.velocity(model, x, t, hidden, added, h=self.h, w=self.w, guidance=self.guidance)

    def __call__(self, x, t, hidden, added):
        if self.models is None:
            return self._v(self.model, x, t, hidden, added)
        out = torch.empty_like(x)
        for g in dict.fromkeys(self.rows):
            idx = torch.tensor([i for i, r in enumerate(self.rows) if r == g], device=x.device)
            out[idx] = self._v(self.models[g], x[idx], t, hidden[idx], {k: v[idx] for k, v in added.items()})
        return out


def _encode_rows(bundle, prompts, negative_prompts, spec, groups):
    """(negative prompts, gate, cond rows, uncond rows with the negative group, uncond rows with the positive
    group — used outside the sigma interval, the same as `unc` when both groups are one) of a request."""
    b = len(prompts)
    negs = [""] * b if spec.uncond == "null" or negative_prompts is None else list(negative_prompts)
    gate = spec.neg_group != spec.pos_group
    cond = encode_prompts(bundle, prompts, groups, [spec.pos_group] * b)
    unc = encode_prompts(bundle, negs, groups, [spec.neg_group] * b, negative=True)
    unc_off = encode_prompts(bundle, negs, groups, [spec.pos_group] * b, negative=True) if gate else unc
    return negs, gate, cond, unc, unc_off


def _check_request(mode, prompts, seeds, npo_path, steps) -> None:
    """The checks every `sample` request gets, whatever the family."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r} (expected one of {sorted(MODES)})")
    if len(prompts) != len(seeds) or not prompts:
        raise ValueError(f"sample: need one seed per prompt, got {len(prompts)} prompts and {len(seeds)} seeds")
    if npo_path not in NPO_PATHS:
        raise ValueError(f"unknown npo_path {npo_path!r} (expected one of {NPO_PATHS})")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")


def _sample_flow(bundle, prompts, seeds, mode, *, negative_prompts, offsets, cfg_scale, steps, scheduler, sigma_min,
                 sigma_max, height, width, rescale, npo_path, decode, progress, flux_guidance) -> SampleResult:
    """`sample` for a flow family: the family's diffusers pipeline loop (its scheduler timesteps, shift or
    dynamic shift, latent layout and transformer call) with the guidance of `mode` on velocities,
    v = v_uncond + w (v_cond - v_uncond), the two halves in ONE forward (rows [0, B) cond, [B, 2B) uncond)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    fam, model = bundle.family_spec, bundle.unet
    _check_request(mode, prompts, seeds, npo_path, steps)
    if scheduler not in FLOW_SCHEDULERS:
        raise ValueError(f"scheduler {scheduler!r}: a {fam.display_name} model samples with {FLOW_SCHEDULERS} "
                         f"(diffusers' FlowMatchEulerDiscreteScheduler from the model's own config and shift)")
    if rescale:
        raise ValueError(f"CFG rescale is defined on a DDPM model's eps/x0; it is not implemented for "
                         f"{fam.display_name} (flow) models: pass rescale 0")
    if flux_guidance is not None and not getattr(model.config, "guidance_embeds", False):
        raise ValueError(f"flux_guidance: this {fam.display_name} transformer has no guidance embedding "
                         f"(guidance_embeds false: e.g. Flux schnell, SD3)")
    spec, offsets = MODES[mode], offsets or NPOSpec()
    groups = offsets.groups()
    b, dev, dt = len(prompts), bundle.device, bundle.dtype
    negs, gate, cond, unc, unc_off = _encode_rows(bundle, prompts, negative_prompts, spec, groups)
    ls = bundle.latent_scale
    size = getattr(model.config, "sample_size", None)
    height = height or (size * ls if size else fam.default_resolution)
    width = width or (size * ls if size else fam.default_resolution)
    mult = ls * fam.latent_multiple(model)
    if height % mult or width % mult:
        raise ValueError(f"height/width must be multiples of {mult} for this {fam.display_name} model, "
                         f"got {height}x{width}")
    h, w = height // ls, width // ls
    sched = FlowMatchEulerDiscreteScheduler.from_config(bundle.scheduler.config)
    fam.set_timesteps(sched, steps, fam.image_seq_len(model, h, w), dev)
    sched.set_begin_index(0)
    shape = (fam.latent_channels(model), h, w)
    noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])
    x = fam.pack(noise.to(dev, dt))
    sigmas = sched.sigmas.tolist()
    with torch.no_grad(), (branch_offsets(model, groups) if npo_path == "fast" else contextlib.nullcontext()) as br:
        predictor = _FlowPredictor(fam, model, groups, br, h=h, w=w, guidance=flux_guidance)
        for i, t in enumerate(sched.timesteps):
            active = not gate or offset_active(float(sigma_of_t(sigmas[i])), sigma_min, sigma_max)
            u = unc if active else unc_off
            predictor.set_rows(row_groups([COND] * b + [UNCOND] * b, mode, active))
            added = {k: torch.cat([cond.added[k], u.added[k]]) for k in cond.added}
            pos, neg = predictor(torch.cat([x, x]), t, torch.cat([cond.hidden, u.hidden]), added).chunk(2)
            x = sched.step(guide(mode, pos, neg, cfg_scale), t, x, return_dict=False)[0]
            if progress is not None:
                progress(1)
    latents = fam.unpack(x, h, w)
    return SampleResult(latents, decode_latents(bundle, latents) if decode else None)


def decode_latents(bundle, latents: torch.Tensor) -> torch.Tensor:
    """Latents -> images [N, C, H, W] in [0, 1] (pixel space: the latents are pixels in [-1, 1])."""
    with torch.no_grad():
        x = vae_decode(bundle.vae, latents)  # [N, C, H, W] in [-1, 1]
    return ((x + 1) / 2).clamp(0, 1).cpu()


# ----------------------------------------------------------------------------------------------
# Batch runs (`python -m npo_suite generate`, cli/generate.py)
# ----------------------------------------------------------------------------------------------
@dataclass
class GenerateJob:
    """One `generate` run: every prompt x seed sampled in every mode, written to `out` (PNGs, grid, manifest)."""

    model: str  # diffusers folder, single-file .safetensors, or pixel-space world folder
    out: str  # output folder: images, grid.png, manifest.json
    prompt: tuple[str, ...] = ()  # prompts given one by one
    prompts: str | None = None  # a .txt (one prompt a line) or .jsonl file
    negative_prompt: str = ""  # of every `prompt` / .txt prompt (cfg, npo)
    modes: tuple[str, ...] = ("cfg", "npo")
    pos_offset: str | None = None  # eta, conditional rows
    neg_offset: str | None = None  # delta, unconditional rows
    snpo_offset: str | None = None  # SNPO LoRA s
    alpha: float = ALPHA_DEFAULT
    beta: float = BETA_DEFAULT
    cfg: float = 7.5
    rescale: float = 0.0
    rescale_space: str = "x0"
    steps: int = 20
    scheduler: str | None = None  # None: the family's default (ddim; flow-euler for SD3/Flux)
    flux_guidance: float | None = None  # Flux-dev's embedded guidance (None: the pipeline's 3.5)
    sigma_min: float | None = None
    sigma_max: float | None = None
    height: int | None = None
    width: int | None = None
    seeds: tuple[int, ...] = (0,)  # seeds of every prompt without its own
    batch_size: int = 4
    npo_path: str = "fast"
    tokenizer: str | None = None  # default: the folder's own / the shipped CLIP tokenizer (single files)
    vae: str | None = None  # a VAE folder or .safetensors (single files without one)
    model_config: str | None = None  # a single file's diffusers folder (SD3/Flux: required; see cli/model_flags.py)
    prediction_type: str | None = None  # epsilon | v_prediction over what was detected
    family: str | None = None
    allow_pickle: bool = False
    dtype: str = "float32"
    device: str = "cpu"


def read_prompts(prompt: Sequence[str] = (), prompts: str | os.PathLike | None = None, negative_prompt: str = "",
                 seeds: Sequence[int] = ()) -> list[dict]:
    """[{prompt, negative_prompt, seeds}] from prompts given one by one and a prompts file (.txt or .jsonl),
    the file read by the trainer's rules (core/prompts.py: prompt/caption/text, negative_prompt alias
    neg_prompt; bad lines are skipped and counted). `negative_prompt` and `seeds` apply to every prompt
    without its own (a .jsonl line may carry both: its own `seed` replaces `seeds`)."""
    items = [{"prompt": p, "negative_prompt": negative_prompt, "seeds": list(seeds)} for p in prompt]
    if prompts:
        path = Path(prompts)
        if not path.is_file():
            raise FileNotFoundError(f"prompts file {str(path)!r} does not exist")
        summary = DataSummary("prompts")
        for rec, obj in read_prompts_file(path, summary):
            own = [int(obj["seed"])] if "seed" in obj else list(seeds)
            items.append({"prompt": rec.prompt,
                          "negative_prompt": negative_prompt if rec.neg_prompt is None else rec.neg_prompt,
                          "seeds": own})
        summary.print()
    if not items:
        raise ValueError("no prompts: pass --prompt TEXT or --prompts FILE")
    return items


def load_offsets(bundle, *, pos: str | os.PathLike | None = None, neg: str | os.PathLike | None = None,
                 snpo: str | os.PathLike | None = None, alpha: float = ALPHA_DEFAULT, beta: float = BETA_DEFAULT,
                 allow_pickle: bool = False) -> tuple[NPOSpec, dict]:
    """The offset files eta (`pos`), delta (`neg`) and the SNPO LoRA (`snpo`) read against `bundle`'s modules,
    as one NPOSpec with weights alpha, beta; plus {key: {path, report, notes, metadata}} of each file read (notes:
    the load report's, e.g. the conversion of original module names)."""
    from ..core.offsets import load_offset

    base = {"unet": bundle.unet, **{f"te{i + 1}": te for i, te in enumerate(bundle.text_encoders)}}
    fam = bundle.family if bundle.family_spec.offsets is not None else None  # families with offset files
    loaded, info = {}, {}
    for key, path in (("pos", pos), ("neg", neg), ("snpo", snpo)):
        if path:
            off = _original_named_offset(bundle, path, base, allow_pickle)
            if off is None:
                off = load_offset(path, base, family=fam, allow_pickle=allow_pickle)
            if off.report is not None and off.report.family is None:
                off.report.family = bundle.family  # matched against this model's own modules (SD3, Flux)
            loaded[key] = off
            info[key] = {"path": str(path), "report": off.report.summary() if off.report else None,
                         "notes": list(off.report.notes) if off.report else [], "metadata": dict(off.metadata)}
    return Offsets(loaded.get("pos"), loaded.get("neg"), loaded.get("snpo"), alpha, beta), info


def _original_named_offset(bundle, path, base, allow_pickle: bool):
    """A LoRA named by the transformer's original modules (kohya `lora_unet_joint_blocks_…` /
    `lora_unet_double_blocks_…`, ComfyUI's `diffusion_model.…`), converted to diffusers/PEFT names by the family's
    map (`original_modules`: SD3, Flux) and read against the model; None when the family has no such map or the
    file uses none of its names."""
    table_of = getattr(bundle.family_spec, "original_modules", None)
    if table_of is None:
        return None
    from ..core.offsets import offset_from_state_dict, read_tensors
    from ..families.flow import has_original_names, original_lora_to_peft

    sd, meta = read_tensors(path, allow_pickle=allow_pickle)
    table = table_of(bundle.unet.config)
    if not has_original_names(sd, table):
        return None
    peft, n = original_lora_to_peft(sd, table, name=str(path))
    off = offset_from_state_dict(peft, base, name=str(path), metadata=meta)
    off.report.format = "original module names, converted to peft"
    off.report.notes.append(f"converted from the original module names: {n['modules']} modules ({n['split']} fused "
                            f"projections split into their diffusers parts, {n['swapped']} with (shift, scale) rows "
                            f"reordered)")
    return off


def _atomic_write(path: Path, write) -> None:
    with atomic_path(path) as tmp:
        write(tmp)


def to_pil(img: torch.Tensor):
    """[C, H, W] in [0, 1] -> PIL image (L for 1 channel, RGB for 3)."""
    from PIL import Image

    arr = (img * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(arr[..., 0], "L") if arr.shape[2] == 1 else Image.fromarray(arr[..., :3], "RGB")


def make_grid(cells: list[list], pad: int = 2):
    """Rows x columns of equally sized PIL images -> one PIL image."""
    from PIL import Image

    w, h = cells[0][0].size
    grid = Image.new("RGB", (len(cells[0]) * (w + pad) + pad, len(cells) * (h + pad) + pad), "white")
    for r, row in enumerate(cells):
        for c, im in enumerate(row):
            grid.paste(im.convert("RGB"), (pad + c * (w + pad), pad + r * (h + pad)))
    return grid


def run_generate(job: GenerateJob, log=print, progress: bool = True) -> dict:
    """Sample every prompt x seed of `job` in each of its modes; write the PNGs, grid.png and manifest.json
    into job.out. Returns the manifest. `log` gets the notes for a person; `progress`: a tqdm bar (stderr)."""
    from tqdm import tqdm

    from .. import __version__
    from ..families.loading import load_model, model_fingerprint

    if job.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {job.batch_size}")
    items = read_prompts(job.prompt, job.prompts, job.negative_prompt, job.seeds)
    bundle = load_model(job.model, family=job.family, dtype=getattr(torch, job.dtype), device=job.device,
                        tokenizer=job.tokenizer, vae=job.vae, prediction_type=job.prediction_type,
                        allow_pickle=job.allow_pickle, config=job.model_config)
    offsets, offset_info = load_offsets(bundle, pos=job.pos_offset, neg=job.neg_offset, snpo=job.snpo_offset,
                                        alpha=job.alpha, beta=job.beta, allow_pickle=job.allow_pickle)
    if "npo" in job.modes and offsets.delta is None:
        log("note: --modes npo without --neg-offset: the negative model is theta + alpha*eta")
    out = Path(job.out)
    out.mkdir(parents=True, exist_ok=True)
    modes = list(job.modes)
    scheduler = job.scheduler or bundle.family_spec.default_scheduler
    jobs = [(i, it["prompt"], it["negative_prompt"], s) for i, it in enumerate(items) for s in it["seeds"]]
    total = len(modes) * -(-len(jobs) // job.batch_size) * job.steps
    records, cells = [], [[None] * len(modes) for _ in jobs]
    t0 = time.time()
    with tqdm(total=total, desc="generate", unit="step", disable=not progress) as bar:
        for m, mode in enumerate(modes):
            for start in range(0, len(jobs), job.batch_size):
                chunk = jobs[start:start + job.batch_size]
                res = sample(bundle, [j[1] for j in chunk], [j[3] for j in chunk], mode,
                             negative_prompts=[j[2] for j in chunk], offsets=offsets, cfg_scale=job.cfg, steps=job.steps,
                             scheduler=scheduler, flux_guidance=job.flux_guidance, sigma_min=job.sigma_min, sigma_max=job.sigma_max,
                             height=job.height, width=job.width, rescale=job.rescale, rescale_space=job.rescale_space,
                             npo_path=job.npo_path, progress=bar.update)
                for k, (pi, prompt, neg, seed) in enumerate(chunk):
                    name = f"p{pi:03d}_s{seed}_{mode}.png"
                    im = to_pil(res.images[k])
                    _atomic_write(out / name, lambda tmp, im=im: im.save(tmp, format="PNG"))
                    cells[start + k][m] = im
                    records.append({"prompt_index": pi, "prompt": prompt, "negative_prompt": "" if MODES[mode].uncond == "null" else neg,
                                    "seed": seed, "mode": mode, "file": name})
    grid = make_grid(cells)
    _atomic_write(out / "grid.png", lambda tmp: grid.save(tmp, format="PNG"))
    import diffusers

    manifest = {
        "command": "generate", "npo_suite_version": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
        "model": str(job.model), "model_hash": model_fingerprint(bundle), "family": bundle.family,
        "prediction_type": bundle.prediction_type, "detected": bundle.detected, "offsets": offset_info, "alpha": job.alpha, "beta": job.beta,
        "cfg": job.cfg, "rescale": job.rescale, "rescale_space": job.rescale_space, "scheduler": scheduler,
        "flux_guidance": job.flux_guidance,
        "steps": job.steps, "sigma_min": job.sigma_min, "sigma_max": job.sigma_max, "modes": modes,
        "npo_path": job.npo_path, "height": job.height, "width": job.width, "dtype": job.dtype, "device": str(job.device),
        "seeds": sorted({j[3] for j in jobs}), "grid": {"file": "grid.png", "rows": "prompt x seed (order of images)",
                                                       "columns": modes},
        "images": records, "seconds": round(time.time() - t0, 3),
    }
    _atomic_write(out / "manifest.json", lambda tmp: Path(tmp).write_text(json.dumps(manifest, indent=2), encoding="utf-8"))
    return manifest
