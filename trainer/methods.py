"""Training methods: each composes backend forwards (the `Backend` protocol only) with a pure loss.

One registry, `METHODS` (name -> Method); the loop does, for any method,
    method.setup(backend, cfg)                       # extra adapters ("ema", "ref")
    out = method.compute(backend, batch, cfg, gen)   # StepOut(loss, metrics)
    out.loss.backward(); optimizer.step()
    method.after_step(backend, cfg)                  # EMA teacher update (no-op for most)
and never branches on a method's name. Conventions (METHODS.md): a pair shares one t and one
eps; the policy forward of winner + loser is ONE batched call [2B]; the reference forward is
no-grad, with adapter None (the base network) or "ref" when reference update is on.

RNG order inside `compute` (so that equal seeds give equal draws across methods): timesteps,
then noise, then method-specific draws (SNPO branch, prompt-perturbation seeds, ...).
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ..core import flow as fl
from ..core.schedule import TIMESTEP_SAMPLERS, TIMESTEP_WEIGHTS, add_noise, eps_to_x0, gather
from .backends.base import Backend
from ..core.cond import Cond
from .batches import PairBatch, PromptBatch
from .ddspo import DDSPO_LOSERS, PromptRewriter, build_rewriter, ddspo_margins, rewriter_names
from .losses import (LOSS_WEIGHTINGS, TDFT_X0_LOSSES, LossOut, bdpo_loss, ddspo_loss, dpo_loss, implicit_accuracy,
                     logit_metrics, loss_weight, per_sample_mse, tdft_x0_loss)
from .reference import ON_EXCEED
from .flow_tdft import draw_s, flow_grid_timesteps, flow_tdft_loss, flow_tdft_start, flow_tdft_target
from .tdft import FULL_SIM_STEPS, TDFT_STARTS, TDFT_TIMESTEPS, grid_timesteps, renoise, truncated_rollout, tweedie_x0


# ---------------------------------------------------------------- hyper-parameters

def _m(text: str, *, default: Any, **kw) -> Any:
    return field(default=default, metadata={"help": text, **kw})


def method_names() -> tuple[str, ...]:
    """The keys of the one method registry, `METHODS` (below)."""
    return tuple(METHODS)



@dataclass
class MethodConfig:
    """Every method hyper-parameter (the trainer's TrainConfig inherits from this), grouped by the
    method that reads it; a method ignores the other groups."""

    method: str = _m("training method (a key of trainer.methods.METHODS)", default="dpo", choices=method_names)
    # --- DPO family: dpo, npo, bdpo, snpo, snpo_naive (seeds 000, 001)
    beta: float = _m("DPO-family beta, Diffusion-DPO's own convention: logit = -(beta/2)*(m_w - m_l); paper "
                     "values 2000..5000 for SD1.5/SDXL (the diffusers example's beta' is beta/2)", default=5000.0,
                     min=1.0, max=100000.0, step=100.0)
    lam: float = _m("BDPO/SNPO mixing lambda in (0, 1]; the loser's pull is bounded by -log(1-lambda); "
                    "1 = plain DPO", default=0.9, min=0.01, max=1.0, step=0.01)
    snpo_p: float = _m("SNPO probability of the null branch (null cond, pair swapped) per pair", default=0.5,
                       min=0.0, max=1.0, step=0.05)
    # --- timesteps: every method except TDFT under tdft_timesteps=solver_grid
    timestep_sampler: str = _m("timestep sampler: " + ", ".join(TIMESTEP_SAMPLERS), default="uniform",
                               choices=tuple(TIMESTEP_SAMPLERS))
    timestep_gamma: float = _m("gamma_bins: P(bin k) ~ gamma^k, k=0 the noisiest bin", default=0.9)
    timestep_bins: int = _m("gamma_bins: number of bins over [0, T)", default=10)
    timestep_weight: str = _m("per-timestep loss scale w(t): " + ", ".join(TIMESTEP_WEIGHTS), default="none",
                              choices=tuple(TIMESTEP_WEIGHTS))
    # --- flow models (prediction_type "flow", core/flow.py): every method; ignored on eps/v models
    flow_t_sampler: str = _m("flow models: noise-level sampler u: " + ", ".join(fl.FLOW_T_SAMPLERS) + " (logit_normal "
                             "= SD3's default, u = sigmoid(m + s*z))", default="logit_normal",
                             choices=fl.FLOW_T_SAMPLERS)
    flow_shift: float = _m("flow models: timestep shift t = shift*u/(1 + (shift-1)*u) (1 = none; SD3 uses 3.0)",
                           default=1.0, min=0.01, max=100.0, step=0.1)
    flow_logit_mean: float = _m("flow models: logit_normal mean m (SD3 0)", default=0.0)
    flow_logit_std: float = _m("flow models: logit_normal std s (SD3 1)", default=1.0)
    flow_mode_scale: float = _m("flow models: the 'mode' sampler's scale (SD3 1.29)", default=1.29)
    flow_error: str = _m("flow models: the per-sample error: v = mse(v_theta, eps - x0) (flow_grpo, SANA), x0 = "
                         "mse(x_t - t*v_theta, x0) (KU-MIIL/DDSPO's SD3 preconditioning; = t^2 * the v error), eps = "
                         "mse(x_t + (1 - t)*v_theta, eps) (the eps-objective's weighting; = (1 - t)^2 * the v error)",
                         default="v", choices=fl.FLOW_ERROR_FORMS)
    # --- TDFT: Self-NPO truncated diffusion fine-tuning (seed 002); defaults = the authors' SD1.5 code
    tdft_timesteps: str = _m("TDFT timesteps: " + "; ".join(f"{k} = {v}" for k, v in TDFT_TIMESTEPS.items()),
                             default="solver_grid")
    tdft_solver_steps: int = _m("TDFT: solver grid size N (one teacher step spans T//N timesteps; authors 25)",
                                default=FULL_SIM_STEPS)
    tdft_k: int = _m("TDFT: teacher solver steps K of the truncated rollout (authors 5)", default=5)
    tdft_start: str = _m("TDFT rollout start: " + "; ".join(f"{k} = {v}" for k, v in TDFT_STARTS.items()),
                         default="auto")
    tdft_guidance: float = _m("TDFT teacher guidance w: eps = eps_c + w*(eps_c - eps_uncond), any sign (CFG scale "
                              "1 + w); -1 = the unconditional prediction (authors' SD1.5), -5 authors' SDXL",
                              default=-1.0)
    tdft_loss: str = _m("TDFT x0 distance: pseudo_huber = sqrt(r^2 + c^2) - c (authors), l2, huber = "
                        "F.huber_loss(delta=1)", default="pseudo_huber")
    tdft_huber_c: float = _m("TDFT pseudo_huber c (authors 1e-3)", default=1e-3)
    ema_decay: float = _m("TDFT: EMA decay of the teacher adapter, applied to each LoRA factor (authors 0.999 on "
                          "the full UNet)", default=0.999)
    # --- DDSPO: direct score-space preference optimization (seed 003)
    ddspo_beta: float = _m("DDSPO beta (same beta/2 convention); paper 16000 for SD1.x/SDXL; lr must shrink as "
                           "beta grows (docs/training.md)", default=16000.0)
    ddspo_loser: str = _m("DDSPO loser image x_l: " + "; ".join(f"{k} = {v}" for k, v in DDSPO_LOSERS.items()),
                          default="generated")
    ddspo_loss_weighting: str = _m("DDSPO per-pair weight outside the sigmoid: none, or linear = t/(T-1) (the "
                                   "authors' SDXL script)", default="none")
    ddspo_min_frac: float = _m("DDSPO: minimum fraction of words removed from the prompt", default=0.4)
    ddspo_max_frac: float = _m("DDSPO: maximum fraction of words removed from the prompt", default=0.7)
    ddspo_rewriter: str = _m("DDSPO degraded-prompt rewriter (a key of trainer.ddspo.REWRITERS)", default="drop_words",
                             choices=rewriter_names)
    ddspo_rewriter_path: str | None = _m("DDSPO local_lm rewriter: local transformers causal-LM folder", default=None)
    # --- reference update: every method with a reference (seed 004)
    ref_update_every: int = _m("reference update period tau in optimizer steps (16/32/64 in seed 004); 0 = off",
                               default=0, min=0, max=100000)
    ref_bound: float = _m("reference divergence bound delta (per-element mse scale, see trainer/reference.py); "
                          "0.005 SD1.5, 0.002 SDXL", default=0.005, min=1e-6, max=10.0, step=0.001)
    ref_on_exceed: str = _m("when the bound is exceeded: freeze (keep the last reference) or reinit (reset it to "
                            "the base model)", default="freeze", choices=ON_EXCEED)
    ref_probe_size: int = _m("reference update: winners of the batch used to estimate the divergence", default=4)
    ref_probe_timesteps: int = _m("reference update: timesteps per winner in the divergence estimate", default=4)

    def __post_init__(self) -> None:
        errors = []

        def check(ok: bool, msg: str) -> None:
            if not ok:
                errors.append(msg)

        def one_of(name: str, allowed) -> None:
            check(getattr(self, name) in allowed, f"{name} {getattr(self, name)!r} is not one of {list(allowed)}")

        check(self.method in METHODS, f"method {self.method!r} is not one of {list(METHODS)}")
        check(self.beta > 0, f"beta must be > 0, got {self.beta}")
        check(0 < self.lam <= 1, f"lam must be in (0, 1], got {self.lam}")
        check(0 <= self.snpo_p <= 1, f"snpo_p must be in [0, 1], got {self.snpo_p}")
        one_of("timestep_sampler", TIMESTEP_SAMPLERS)
        check(0 < self.timestep_gamma <= 1, f"timestep_gamma must be in (0, 1], got {self.timestep_gamma}")
        check(self.timestep_bins >= 1, f"timestep_bins must be >= 1, got {self.timestep_bins}")
        one_of("timestep_weight", TIMESTEP_WEIGHTS)
        one_of("flow_t_sampler", fl.FLOW_T_SAMPLERS)
        check(self.flow_shift > 0, f"flow_shift must be > 0, got {self.flow_shift}")
        check(self.flow_logit_std > 0, f"flow_logit_std must be > 0, got {self.flow_logit_std}")
        one_of("flow_error", fl.FLOW_ERROR_FORMS)
        one_of("tdft_timesteps", TDFT_TIMESTEPS)
        check(self.tdft_solver_steps >= 1, f"tdft_solver_steps must be >= 1, got {self.tdft_solver_steps}")
        check(self.tdft_k >= 1, f"tdft_k must be >= 1, got {self.tdft_k}")
        one_of("tdft_start", TDFT_STARTS)
        check(math.isfinite(self.tdft_guidance), f"tdft_guidance must be finite, got {self.tdft_guidance}")
        one_of("tdft_loss", TDFT_X0_LOSSES)
        check(self.tdft_huber_c > 0, f"tdft_huber_c must be > 0, got {self.tdft_huber_c}")
        check(0 <= self.ema_decay < 1, f"ema_decay must be in [0, 1), got {self.ema_decay}")
        check(self.ddspo_beta > 0, f"ddspo_beta must be > 0, got {self.ddspo_beta}")
        one_of("ddspo_loser", DDSPO_LOSERS)
        one_of("ddspo_loss_weighting", LOSS_WEIGHTINGS)
        check(0 <= self.ddspo_min_frac <= self.ddspo_max_frac <= 1,
              f"need 0 <= ddspo_min_frac <= ddspo_max_frac <= 1, got {self.ddspo_min_frac}, {self.ddspo_max_frac}")
        one_of("ddspo_rewriter", rewriter_names())
        check(self.ddspo_rewriter != "local_lm" or bool(self.ddspo_rewriter_path),
              "ddspo_rewriter 'local_lm' needs ddspo_rewriter_path (a local model folder)")
        check(self.ref_update_every >= 0, f"ref_update_every must be >= 0 (0 = off), got {self.ref_update_every}")
        check(self.ref_bound > 0, f"ref_bound must be > 0, got {self.ref_bound}")
        one_of("ref_on_exceed", ON_EXCEED)
        check(self.ref_probe_size >= 1, f"ref_probe_size must be >= 1, got {self.ref_probe_size}")
        check(self.ref_probe_timesteps >= 1, f"ref_probe_timesteps must be >= 1, got {self.ref_probe_timesteps}")
        if errors:
            raise ValueError("invalid method config: " + "; ".join(errors))


def method_config_help() -> dict[str, str]:
    """field name -> help text (for the CLI generator and docs)."""
    return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(MethodConfig)}


# ---------------------------------------------------------------- outputs

@dataclass
class StepOut:
    """loss: scalar with grad (policy adapter only); metrics: detached scalars under namespaced keys."""

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor]


# ---------------------------------------------------------------- shared helpers

def _gdev(generator: torch.Generator | None, fallback: torch.device) -> torch.device:
    return generator.device if generator is not None else fallback


def _randn(shape, generator: torch.Generator | None, like: torch.Tensor) -> torch.Tensor:
    """N(0, I) of `shape` drawn from `generator` (on its device), returned on like's device/dtype."""
    return torch.randn(tuple(shape), generator=generator, device=_gdev(generator, like.device)).to(like)


def _rand(n: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    return torch.rand(n, generator=generator, device=_gdev(generator, device), dtype=torch.float64).to(device)


def sample_timesteps(backend: Backend, cfg: MethodConfig, n: int, generator: torch.Generator | None,
                     device: torch.device, T: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """t [n] (long) from TIMESTEP_SAMPLERS[cfg.timestep_sampler] over [0, T) and w(t) [n] (float32)."""
    T = backend.num_train_timesteps if T is None else T
    t = TIMESTEP_SAMPLERS[cfg.timestep_sampler](n, T, generator, gamma=cfg.timestep_gamma, bins=cfg.timestep_bins)
    w = TIMESTEP_WEIGHTS[cfg.timestep_weight](t, backend.abar)
    return t.to(device), w.to(device=device, dtype=torch.float32)


@dataclass
class PairMSE:
    """Per-sample mse [B] of the policy and the reference on the (effective) winner and loser."""

    pol_w: torch.Tensor
    pol_l: torch.Tensor
    ref_w: torch.Tensor
    ref_l: torch.Tensor


class Noising:
    """The model's forward process, read from `backend.prediction_type` (never from a method's name).

    eps / v models (DDPM schedule): t integer in [0, T), x_t = sqrt(abar)·x0 + sqrt(1 − abar)·ε, the
    prediction compared is ε (`predict_eps`), error = mse(ε_θ, ε).
    flow models (core/flow.py): t float in (0, 1) from `cfg.flow_t_sampler` (+ `flow_shift`),
    x_t = (1 − t)·x0 + t·ε, the prediction is v (`predict_v`), error = `flow_mse` in `cfg.flow_error`'s form
    (v: against ε − x0; x0: x_t − t·v_θ against x0; eps: x_t + (1 − t)·v_θ against ε). The pure losses are the
    same on any of these errors.
    """

    def __init__(self, backend: Backend, cfg: MethodConfig):
        self.backend, self.cfg = backend, cfg
        self.flow = backend.prediction_type == fl.FLOW

    def check(self) -> None:
        """Settings that have no meaning on a flow model are refused (not ignored)."""
        if self.flow and self.cfg.timestep_weight != "none":
            raise ValueError(f"timestep_weight={self.cfg.timestep_weight!r} is defined on the DDPM schedule (abar); "
                             f"a flow model takes timestep_weight='none' (use flow_error='x0' for the t^2 weighting)")
        if self.flow and self.cfg.ref_update_every > 0:
            raise ValueError("reference update (ref_update_every > 0) is not wired for flow models yet")

    def timesteps(self, n: int, generator, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(t [n], w(t) [n] float32): `sample_timesteps` on eps/v models; flow: t float32 in (0, 1), w = 1."""
        if not self.flow:
            return sample_timesteps(self.backend, self.cfg, n, generator, device)
        c = self.cfg
        t = fl.sample_t(n, c.flow_t_sampler, generator, shift=c.flow_shift, logit_mean=c.flow_logit_mean,
                        logit_std=c.flow_logit_std, mode_scale=c.flow_mode_scale)
        return t.to(device=device, dtype=torch.float32), torch.ones(n, device=device)

    def noise(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.flow:
            return fl.interpolate(x0, eps, t)
        return add_noise(x0, eps, gather(self.backend.abar, t, x0))

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond, adapter: str | None) -> torch.Tensor:
        """The prediction the errors compare: ε (eps/v models) or the error form's space (flow: v, x0 or ε)."""
        if not self.flow:
            return self.backend.predict_eps(x_t, t, cond, adapter)
        v = self.backend.predict_v(x_t, t, cond, adapter)
        if self.cfg.flow_error == "eps":
            return fl.v_to_eps(v, x_t, t)
        return v if self.cfg.flow_error == "v" else fl.v_to_x0(v, x_t, t)

    def target(self, x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """What `predict` is regressed on: ε; flow: v = ε − x0, x0, or ε (the form's space)."""
        if not self.flow:
            return eps
        if self.cfg.flow_error == "eps":
            return eps
        return fl.velocity_target(x0, eps) if self.cfg.flow_error == "v" else x0


def pair_mses(backend: Backend, x0_w: torch.Tensor, x0_l: torch.Tensor, cond: Cond, t: torch.Tensor,
              eps: torch.Tensor, ref_adapter: str | None, noising: Noising | None = None) -> PairMSE:
    """Noise both images with the SAME t and eps; one policy forward [2B], one no-grad reference forward [2B].
    `noising` (default: eps/v models' DDPM process) says how; a flow backend needs one (`Noising(backend, cfg)`)."""
    B = x0_w.shape[0]
    x0 = torch.cat([x0_w, x0_l])  # [2B, C, h, w]
    eps2 = torch.cat([eps, eps])  # [2B, C, h, w]
    t2 = torch.cat([t, t])  # [2B]
    c2 = cond.repeat(2)
    if noising is None or not noising.flow:
        x_t = add_noise(x0, eps2, gather(backend.abar, t2, x0))  # [2B, C, h, w]
        mse_pol = per_sample_mse(backend.predict_eps(x_t, t2, c2, "policy"), eps2)  # [2B]
        with torch.no_grad():
            mse_ref = per_sample_mse(backend.predict_eps(x_t, t2, c2, ref_adapter), eps2)  # [2B]
        return PairMSE(mse_pol[:B], mse_pol[B:], mse_ref[:B], mse_ref[B:])
    x_t = noising.noise(x0, eps2, t2)  # [2B, C, h, w]: (1 − t)·x0 + t·ε
    form = noising.cfg.flow_error
    mse_pol = fl.flow_mse(backend.predict_v(x_t, t2, c2, "policy"), x0, eps2, x_t, t2, form)  # [2B]
    with torch.no_grad():
        mse_ref = fl.flow_mse(backend.predict_v(x_t, t2, c2, ref_adapter), x0, eps2, x_t, t2, form)  # [2B]
    return PairMSE(mse_pol[:B], mse_pol[B:], mse_ref[:B], mse_ref[B:])


def preference_metrics(out: LossOut, m: PairMSE, t: torch.Tensor) -> dict[str, torch.Tensor]:
    """The metrics every preference method logs (METHODS.md "Log every step")."""
    return {
        "loss": out.loss.detach(),
        "implicit_acc": implicit_accuracy(out.logit),
        "mse/policy_w": m.pol_w.detach().mean(),
        "mse/policy_l": m.pol_l.detach().mean(),
        "mse/ref_w": m.ref_w.detach().mean(),
        "mse/ref_l": m.ref_l.detach().mean(),
        "llr/winner": (m.pol_w - m.ref_w).detach().mean(),
        **logit_metrics(out.logit),
        "t/mean": t.float().mean(),
    }


def _require(batch, kind: type, method: str):
    if not isinstance(batch, kind):
        raise TypeError(f"method {method!r} expects a {kind.__name__}, got {type(batch).__name__}")
    return batch


# ---------------------------------------------------------------- methods

class Method:
    """Base: a name, the data it needs, the adapters it adds, and `compute` (see module docstring)."""

    name: str = ""
    data_kind: ClassVar[str] = "pairs"  # "pairs" | "images_or_prompts" | "prompts_with_winners"
    adapters: tuple[str, ...] = ()  # extra adapters this method always needs
    uses_reference: bool = True  # runs a frozen reference forward (reference update applies to it)
    swap: bool = False  # train on the pair swapped (NPO)
    role: str = "positive"  # what the trained LoRA is: "positive" | "negative" | "snpo" (metadata, sampling)
    beta_key: str | None = "beta"  # the MethodConfig field holding this method's β (None: it has no β)
    lambda_key: str | None = None  # the MethodConfig field holding its λ (None: it has no λ)
    encodes_text_in_training: bool = False  # calls backend.encode_prompts during steps (not only ∅ and the cache)

    def extra_adapters(self, cfg: MethodConfig) -> tuple[str, ...]:
        """Adapters to create besides "policy": own ones, plus "ref" when reference update is on."""
        ref = ("ref",) if self.uses_reference and cfg.ref_update_every > 0 else ()
        return self.adapters + ref

    def reference_adapter(self, cfg: MethodConfig) -> str | None:
        """The frozen reference: the base network (None), or "ref" under reference update."""
        return "ref" if self.uses_reference and cfg.ref_update_every > 0 else None

    def setup(self, backend: Backend, cfg: MethodConfig) -> None:
        """Create the extra adapters as frozen copies of the (freshly initialised) policy."""
        Noising(backend, cfg).check()
        for name in self.extra_adapters(cfg):
            backend.add_adapter(name, init_from="policy")

    def after_step(self, backend: Backend, cfg: MethodConfig) -> None:
        """Called by the loop after every optimizer step."""

    def compute(self, backend: Backend, batch, cfg: MethodConfig, generator: torch.Generator | None = None) -> StepOut:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


class PairMethod(Method):
    """Diffusion-DPO (seed 000 §3.3), NPO = DPO on swapped pairs (seed 001 §3), and the Diff-BDPO
    upper bound (seed 000 eq. 18–21) when `bounded`; `lam` overrides cfg.lam (1.0: naive)."""

    data_kind = "pairs"

    def __init__(self, name: str, *, swap: bool = False, bounded: bool = False, lam: float | None = None):
        self.name, self.swap, self.bounded, self.lam = name, swap, bounded, lam
        self.lambda_key = "lam" if bounded and lam is None else None  # a fixed lam (snpo_naive) is not a setting
        self.role = "negative" if swap else "positive"  # NPO's swapped pairs give a negative offset

    def route(self, backend: Backend, batch: PairBatch, cfg: MethodConfig, generator) -> tuple[torch.Tensor, Cond, dict]:
        """Per-row branch: (null_row [B] bool, cond [B], extra metrics). Plain methods: all conditional."""
        B = batch.latents_w.shape[0]
        return torch.zeros(B, dtype=torch.bool, device=batch.latents_w.device), batch.cond, {}

    def loss(self, m: PairMSE, cfg: MethodConfig, w: torch.Tensor) -> LossOut:
        if not self.bounded:
            return dpo_loss(m.pol_w, m.pol_l, m.ref_w, m.ref_l, beta=cfg.beta, weight=w)
        lam = cfg.lam if self.lam is None else self.lam
        return bdpo_loss(m.pol_w, m.pol_l, m.ref_w, m.ref_l, beta=cfg.beta, lam=lam, weight=w)

    def compute(self, backend: Backend, batch: PairBatch, cfg: MethodConfig, generator: torch.Generator | None = None) -> StepOut:
        _require(batch, PairBatch, self.name)
        x_w, x_l = batch.latents_w, batch.latents_l  # [B, C, h, w] each
        B, device = x_w.shape[0], x_w.device
        noising = Noising(backend, cfg)
        t, w = noising.timesteps(B, generator, device)  # [B], [B]
        eps = _randn(x_w.shape, generator, x_w)  # [B, C, h, w], shared by the pair
        null_row, cond, extra = self.route(backend, batch, cfg, generator)
        flip = (null_row ^ self.swap).reshape(-1, *([1] * (x_w.ndim - 1)))  # [B, 1, 1, 1]
        win, lose = torch.where(flip, x_l, x_w), torch.where(flip, x_w, x_l)
        m = pair_mses(backend, win, lose, cond, t, eps, self.reference_adapter(cfg), noising)
        out = self.loss(m, cfg, w)
        return StepOut(out.loss, {**preference_metrics(out, m, t), **extra})


class SNPOMethod(PairMethod):
    """Diff-SNPO, seed 000 eq. 22–23: per pair Y ~ Bernoulli(p); Y = 1 -> null cond and the pair
    swapped, else cond and the labelled pair; BDPO bound on the drawn branch; both branches of a
    batch in one forward (row-wise Cond.where)."""

    def __init__(self, name: str, *, lam: float | None = None):
        super().__init__(name, swap=False, bounded=True, lam=lam)
        self.role = "snpo"  # one LoRA for both CFG branches

    def route(self, backend, batch, cfg, generator):
        B = batch.latents_w.shape[0]
        null_row = _rand(B, generator, batch.latents_w.device) < cfg.snpo_p  # [B] bool, Y = 1
        null = backend.null_cond(B).to(batch.cond.hidden.device)
        cond = Cond.where(null_row, null, batch.cond)  # [B] rows
        return null_row, cond, {"snpo/null_frac": null_row.float().mean()}


class TDFTMethod(Method):
    """Self-NPO truncated diffusion fine-tuning, seed 002 eq. 14–17 (METHODS.md "Self-NPO").

    1. Timesteps (`tdft_timesteps`): "solver_grid" (the authors' code) draws t' uniformly on the
       N-step solver grid and t = max(t' − K·T//N, 0); "uniform" draws t with `timestep_sampler`
       and t' = min(T−1, t + K·T//N).
    2. Start (`tdft_start`): a real latent noised to t' (the paper), or pure noise at t' = T−1
       (prompts only: this project's variant); K DDIM steps of the EMA teacher with guidance w
       (`teacher_fn`) reach x_t, and its Tweedie estimate at (x_t, t) is the target x0_hat.
    3. s ~ U{t+1, ..., T−1}; x_s = renoise(x_t, t -> s) (eq. 16).
    4. loss = mean_B w(s)·d(x0_θ(x_s, s, c), x0_hat) (eq. 17; `losses.tdft_x0_loss`, default the
       authors' pseudo-Huber).
    The teacher is the "ema" adapter; `after_step` moves it toward the policy by (1 − decay). The
    EMA is taken of each LoRA factor (down A, up B) separately, so the teacher's weight offset is
    EMA(B)·EMA(A), not EMA(B·A) as an EMA of the full UNet (the authors') would be: equal at the
    start (B = 0 in both) and up to second order in the factors' drift (docs/methods.md).
    """

    data_kind = "images_or_prompts"
    adapters = ("ema",)
    uses_reference = False
    role = "negative"  # Self-NPO: the TDFT offset is used as the negative model
    beta_key = None  # TDFT has no preference β

    def __init__(self, name: str = "tdft"):
        self.name = name

    @staticmethod
    def teacher_fn(backend: Backend, cfg: MethodConfig, cond: Cond, predict=None):
        """eps(x, t) of the EMA teacher: eps_c + w·(eps_c − eps_∅), w = cfg.tdft_guidance (no grad).

        The authors' form (`Self-NPO/train.py`: w = −1, `train_xl.py`: w = −5); w = −1 is eps_∅
        and w = 0 is eps_c, each computed with one forward (the formula's value, not rounded twice).
        `predict`: the backend's prediction (default `predict_eps`; a flow model's `predict_v`).
        """
        predict = predict or backend.predict_eps
        w = cfg.tdft_guidance
        null = backend.null_cond(len(cond)).to(cond.hidden.device)
        if w in (-1.0, 0.0):
            only = null if w == -1.0 else cond
            return lambda x, t: predict(x, t, only, "ema")
        both = Cond.cat([cond, null])  # [2B]

        def guided(x, t):
            e = predict(torch.cat([x, x]), torch.cat([t, t]), both, "ema")  # [2B, C, h, w]
            e_c, e_u = e.chunk(2)
            return e_c + w * (e_c - e_u)
        return guided

    @staticmethod
    def timesteps(backend: Backend, cfg: MethodConfig, B: int, generator, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(t' [B], t_end [B]) as `cfg.tdft_timesteps` says; t_end < 0 means "stop at 0" (solver grid)."""
        T, n, K = backend.num_train_timesteps, cfg.tdft_solver_steps, cfg.tdft_k
        if cfg.tdft_timesteps == "solver_grid":
            index = (_rand(B, generator, device) * n).long().clamp(max=n - 1)  # [B] uniform on {0..n-1}
            return grid_timesteps(index, T, n, K)
        t, _ = sample_timesteps(backend, cfg, B, generator, device, T=T - 1)  # [B] in [0, T-2]
        return (t + K * (T // n)).clamp(max=T - 1), t

    @staticmethod
    def real_start(batch: PromptBatch, cfg: MethodConfig) -> bool:
        """True: noise the batch's real latents to t'; False: start from pure noise at T−1."""
        if cfg.tdft_start == "images" and batch.latents is None:
            raise ValueError("tdft: tdft_start='images' needs images (a prompts file with images, or a captioned "
                             "image folder); use tdft_start='noise' or 'auto' to train from prompts alone")
        return batch.latents is not None and cfg.tdft_start != "noise"

    @staticmethod
    def flow_teacher(backend: Backend, cfg: MethodConfig, cond: Cond):
        """v(x, t) of the EMA teacher on a flow model: v_c + w·(v_c − v_∅) (`teacher_fn` on velocities)."""
        return TDFTMethod.teacher_fn(backend, cfg, cond, backend.predict_v)

    def compute_flow(self, backend: Backend, batch: PromptBatch, cfg: MethodConfig, generator, shape, real: bool
                     ) -> StepOut:
        """TDFT on a flow model: trainer/flow_tdft.py (our extension, docs/methods.md), same RNG order as
        `compute`: timesteps, s, ε_start, ε_s. solver_grid: t' = k/N, t = max(t' − K/N, 0); uniform: t from
        the flow sampler, t' = min(1, t + K/N). A prompts-only start is pure noise at t' = 1."""
        cond = batch.cond
        B, n, K = len(cond), cfg.tdft_solver_steps, cfg.tdft_k
        like = batch.latents if batch.latents is not None else cond.hidden
        device = like.device
        if cfg.tdft_timesteps == "solver_grid":
            index = (_rand(B, generator, device) * n).long().clamp(max=n - 1)  # [B] uniform on {0..n-1}
            t_start, t_end = flow_grid_timesteps(index, n, K)  # [B] float64 each
        else:
            t_end, _ = Noising(backend, cfg).timesteps(B, generator, device)
            t_end = t_end.double()
            t_start = (t_end + K / n).clamp(max=1.0)
        s = draw_s(t_end, generator).to(device)  # [B] in (t, 1]
        eps_start = _randn(shape, generator, like)  # [B, C, h, w]
        eps_s = _randn(shape, generator, like)  # [B, C, h, w]
        x_start, t_start = flow_tdft_start(batch.latents if real else None, eps_start, t_start.to(device))
        teacher = self.flow_teacher(backend, cfg, cond)
        target = flow_tdft_target(teacher, x_start, t_start.to(device), t_end.to(device), K, s, eps_s)
        loss, dist = flow_tdft_loss(lambda x, t: backend.predict_v(x, t, cond, "policy"), target, cfg.tdft_loss,
                                    cfg.tdft_huber_c)
        return StepOut(loss, {
            "loss": loss.detach(),
            "tdft/x0_loss": dist.detach().mean(),
            "tdft/t_mean": target.t.float().mean(),
            "tdft/t_start_mean": t_start.float().mean(),
            "tdft/s_mean": target.s.float().mean(),
            "tdft/real_start": torch.tensor(float(real)),
            "tdft/target_std": target.x0_hat.float().std(),
        })

    def compute(self, backend: Backend, batch: PromptBatch, cfg: MethodConfig, generator: torch.Generator | None = None) -> StepOut:
        _require(batch, PromptBatch, self.name)
        cond, T, abar = batch.cond, backend.num_train_timesteps, backend.abar
        B = len(cond)
        like = batch.latents if batch.latents is not None else cond.hidden
        device = like.device
        if batch.latents is None and batch.latent_shape is None:
            raise ValueError("tdft: a PromptBatch without latents needs latent_shape (C, h, w) to start from noise")
        shape = (B, *batch.latent_shape) if batch.latents is None else tuple(batch.latents.shape)
        real = self.real_start(batch, cfg)
        if backend.prediction_type == fl.FLOW:
            return self.compute_flow(backend, batch, cfg, generator, shape, real)
        t_start, t_end = self.timesteps(backend, cfg, B, generator, device)  # [B] each
        t = t_end.clamp(min=0)  # [B] where the rollout ends
        s = t + 1 + (_rand(B, generator, device) * (T - 1 - t)).long().clamp(max=T - 2 - t)  # [B] in [t+1, T-1]
        eps_start = _randn(shape, generator, like)  # [B, C, h, w]
        eps_s = _randn(shape, generator, like)  # [B, C, h, w]
        with torch.no_grad():
            if real:
                x_start = add_noise(batch.latents, eps_start, gather(abar, t_start, batch.latents))
            else:
                t_start, t_end, x_start = torch.full_like(t, T - 1), t, eps_start
            teacher = self.teacher_fn(backend, cfg, cond)
            x_t = truncated_rollout(teacher, x_start, t_start, t_end, cfg.tdft_k, abar)  # [B, C, h, w]
            x0_hat = tweedie_x0(x_t, teacher(x_t, t), gather(abar, t, x_t))  # [B, C, h, w]
            x_s = renoise(x_t, t, s, abar, eps_s)  # [B, C, h, w]
        eps_student = backend.predict_eps(x_s, s, cond, "policy")  # [B, C, h, w]
        x0_student = eps_to_x0(eps_student, x_s, gather(abar, s, x_s))
        dist = tdft_x0_loss(x0_student, x0_hat, cfg.tdft_loss, cfg.tdft_huber_c)  # [B]
        w = TIMESTEP_WEIGHTS[cfg.timestep_weight](s, abar).to(dist)  # [B]
        loss = (w * dist).mean()
        return StepOut(loss, {
            "loss": loss.detach(),
            "tdft/x0_loss": dist.detach().mean(),
            "tdft/t_mean": t.float().mean(),
            "tdft/t_start_mean": t_start.float().mean(),
            "tdft/s_mean": s.float().mean(),
            "tdft/real_start": torch.tensor(float(real)),
            "tdft/target_std": x0_hat.float().std(),
        })

    def after_step(self, backend: Backend, cfg: MethodConfig) -> None:
        backend.ema_update("ema", "policy", cfg.ema_decay)


class DDSPOMethod(Method):
    """DDSPO, seed 003 eq. 4–5 (METHODS.md "DDSPO"): targets from the frozen reference under c
    (winner) and c⁻ (loser); logit = −(β/2)·w(t)·(m_w − m_l), β = cfg.ddspo_beta; with
    `ddspo_loss_weighting` "linear" each pair's −log σ is multiplied by t/(T−1) (the authors' SDXL).

    c⁻ is batch.neg_cond when the data layer provides it, else the configured rewriter applied to
    batch.prompts (seeds drawn from the generator) and encoded with backend.encode_prompts. The
    loser image follows `ddspo_loser` (DDSPO_LOSERS): "generated" and "other" take batch.latents_l,
    which the data layer fills (a batch without it is an error, never a silent x_l = x_w);
    "same" trains with x_l = x_w (only when asked; `setup` warns). Forwards: policy [2B], reference [3B].
    """

    data_kind = "prompts_with_winners"
    encodes_text_in_training = True  # c⁻: the rewritten prompts are encoded per step
    beta_key = "ddspo_beta"  # its own β (paper 16000), not the DPO family's `beta`

    def __init__(self, name: str = "ddspo"):
        self.name = name
        self._rewriters: dict[tuple, PromptRewriter] = {}

    def rewriter(self, cfg: MethodConfig) -> PromptRewriter:
        key = (cfg.ddspo_rewriter, cfg.ddspo_min_frac, cfg.ddspo_max_frac, cfg.ddspo_rewriter_path)
        if key not in self._rewriters:
            self._rewriters[key] = build_rewriter(cfg.ddspo_rewriter, cfg.ddspo_min_frac, cfg.ddspo_max_frac,
                                                  cfg.ddspo_rewriter_path)
        return self._rewriters[key]

    def setup(self, backend: Backend, cfg: MethodConfig) -> None:
        super().setup(backend, cfg)
        self.rewriter(cfg)  # load a local LM now, not at the first step
        if cfg.ddspo_loser == "same":
            warnings.warn("ddspo: ddspo_loser='same' trains with the loser image equal to the winner (x_l = x_w, "
                          "only the prompt differs); this is not the paper's DDSPO: with shared noise the loss is "
                          "linear in the policy's deviation and nothing holds it near the reference", stacklevel=2)

    def degraded_prompts(self, prompts: list[str], cfg: MethodConfig, generator: torch.Generator | None) -> list[str]:
        gen_device = _gdev(generator, torch.device("cpu"))
        seeds = torch.randint(0, 2 ** 62, (len(prompts),), generator=generator, device=gen_device).tolist()
        return self.rewriter(cfg)(prompts, seeds)

    @staticmethod
    def loser_latents(batch: PromptBatch, cfg: MethodConfig) -> torch.Tensor:
        """x_l [B, C, h, w] as cfg.ddspo_loser says (class docstring); a missing loser is an error."""
        if cfg.ddspo_loser == "same":
            return batch.latents
        if batch.latents_l is None:
            raise ValueError(f"ddspo: ddspo_loser={cfg.ddspo_loser!r} ({DDSPO_LOSERS[cfg.ddspo_loser]}), but the "
                             f"batch has winner images only; give loser images, or set ddspo_loser to 'other' "
                             f"(another prompt's image) or 'same' (x_l = x_w, not the paper)")
        return batch.latents_l

    def compute(self, backend: Backend, batch: PromptBatch, cfg: MethodConfig, generator: torch.Generator | None = None) -> StepOut:
        _require(batch, PromptBatch, self.name)
        if batch.latents is None:
            raise ValueError("ddspo needs winner latents (PromptBatch.latents): generate them with ddspo-prepare")
        x_w = batch.latents  # [B, C, h, w]
        x_l = self.loser_latents(batch, cfg)  # [B, C, h, w]
        B, device = x_w.shape[0], x_w.device
        noising = Noising(backend, cfg)
        t, w = noising.timesteps(B, generator, device)  # [B], [B]
        eps = _randn(x_w.shape, generator, x_w)  # [B, C, h, w]
        if batch.neg_cond is not None:
            neg = batch.neg_cond
        elif batch.prompts:
            neg = backend.encode_prompts(self.degraded_prompts(list(batch.prompts), cfg, generator))
        else:
            raise ValueError("ddspo needs prompts (to degrade) or a precomputed neg_cond in the batch")
        neg = neg.to(batch.cond.hidden.device)
        # eps/v models: everything in ε; flow models: in the flow_error form's space (v, or x0), where the
        # reference's predictions are the targets exactly as ε_ref are (the margins are mse's of predictions)
        x_t = torch.cat([noising.noise(x_w, eps, t), noising.noise(x_l, eps, t)])  # [2B, C, h, w]
        t2 = torch.cat([t, t])  # [2B]
        eps_pol = noising.predict(x_t, t2, batch.cond.repeat(2), "policy")  # [2B, C, h, w]
        with torch.no_grad():
            x_ref = torch.cat([x_t, x_t[B:]])  # [3B]: x_w, x_l, x_l
            c_ref = Cond.cat([batch.cond, neg, batch.cond])  # [3B]: c, c⁻, c
            eps_ref = noising.predict(x_ref, torch.cat([t, t, t]), c_ref, self.reference_adapter(cfg))
        e_w_c, e_l_neg, e_l_c = eps_ref.chunk(3)  # [B, C, h, w] each
        mg = ddspo_margins(eps_pol[:B], eps_pol[B:], e_w_c, e_l_neg, e_l_c)
        # "linear": t/(T−1) on the DDPM grid; a flow t is already in [0, 1] (t/(2 − 1) = t)
        outer = loss_weight(cfg.ddspo_loss_weighting, t, 2 if noising.flow else backend.num_train_timesteps)
        out = ddspo_loss(mg.m_w, mg.m_l, beta=cfg.ddspo_beta, weight=w, outer_weight=outer)
        return StepOut(out.loss, {
            "loss": out.loss.detach(),
            "implicit_acc": implicit_accuracy(out.logit),
            **logit_metrics(out.logit),
            "t/mean": t.float().mean(),
            "ddspo/m_w": mg.m_w.detach().mean(),  # mse(eps_w*, eps_θ(x_w, c)): the policy's distance to the winner target
            "ddspo/m_l": mg.m_l.detach().mean(),  # mse_policy_l − mse_ref_l: the loser margin
            "ddspo/mse_policy_l": mg.mse_pol_l.detach().mean(),  # mse(eps_l*, eps_θ(x_l, c))
            "ddspo/mse_ref_l": mg.mse_ref_l.detach().mean(),  # mse(eps_l*, eps_ref(x_l, c))
        })


# The one registry of methods: CLI choices, node dropdowns and tests read its keys.
METHODS: dict[str, Method] = {
    "dpo": PairMethod("dpo"),
    "npo": PairMethod("npo", swap=True),
    "bdpo": PairMethod("bdpo", bounded=True),
    "snpo": SNPOMethod("snpo"),
    "snpo_naive": SNPOMethod("snpo_naive", lam=1.0),
    "tdft": TDFTMethod("tdft"),
    "ddspo": DDSPOMethod("ddspo"),
}
