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

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..core.schedule import TIMESTEP_SAMPLERS, TIMESTEP_WEIGHTS, add_noise, eps_to_x0, gather
from .backends.base import Backend
from .batches import Cond, PairBatch, PromptBatch
from .config import MethodConfig
from .ddspo import PromptRewriter, build_rewriter, ddspo_margins
from .losses import LossOut, bdpo_loss, ddspo_loss, dpo_loss, implicit_accuracy, per_sample_mse
from .tdft import FULL_SIM_STEPS, TDFT_TEACHERS, renoise, truncated_rollout, tweedie_x0, x0_distance


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


def pair_mses(backend: Backend, x0_w: torch.Tensor, x0_l: torch.Tensor, cond: Cond, t: torch.Tensor,
              eps: torch.Tensor, ref_adapter: str | None) -> PairMSE:
    """Noise both images with the SAME t and eps; one policy forward [2B], one no-grad reference forward [2B]."""
    B = x0_w.shape[0]
    x0 = torch.cat([x0_w, x0_l])  # [2B, C, h, w]
    eps2 = torch.cat([eps, eps])  # [2B, C, h, w]
    t2 = torch.cat([t, t])  # [2B]
    x_t = add_noise(x0, eps2, gather(backend.abar, t2, x0))  # [2B, C, h, w]
    c2 = cond.repeat(2)
    mse_pol = per_sample_mse(backend.predict_eps(x_t, t2, c2, "policy"), eps2)  # [2B]
    with torch.no_grad():
        mse_ref = per_sample_mse(backend.predict_eps(x_t, t2, c2, ref_adapter), eps2)  # [2B]
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
        "logit/mean": out.logit.detach().mean(),
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

    def extra_adapters(self, cfg: MethodConfig) -> tuple[str, ...]:
        """Adapters to create besides "policy": own ones, plus "ref" when reference update is on."""
        ref = ("ref",) if self.uses_reference and cfg.ref_update_every > 0 else ()
        return self.adapters + ref

    def reference_adapter(self, cfg: MethodConfig) -> str | None:
        """The frozen reference: the base network (None), or "ref" under reference update."""
        return "ref" if self.uses_reference and cfg.ref_update_every > 0 else None

    def setup(self, backend: Backend, cfg: MethodConfig) -> None:
        """Create the extra adapters as frozen copies of the (freshly initialised) policy."""
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
        t, w = sample_timesteps(backend, cfg, B, generator, device)  # [B], [B]
        eps = _randn(x_w.shape, generator, x_w)  # [B, C, h, w], shared by the pair
        null_row, cond, extra = self.route(backend, batch, cfg, generator)
        flip = (null_row ^ self.swap).reshape(-1, *([1] * (x_w.ndim - 1)))  # [B, 1, 1, 1]
        win, lose = torch.where(flip, x_l, x_w), torch.where(flip, x_w, x_l)
        m = pair_mses(backend, win, lose, cond, t, eps, self.reference_adapter(cfg))
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

    1. t ~ sampler over [0, T−1); from a real latent noised to t' = min(T−1, t + K·stride) — or
       pure noise at t' = T−1 (no latents, or the few_steps teacher) — K DDIM steps of the EMA
       teacher (weakened, TDFT_TEACHERS) reach x_t.
    2. Tweedie target x0_hat from the teacher at (x_t, t).
    3. s ~ U{t+1, ..., T−1}; x_s = renoise(x_t, t -> s) (eq. 16).
    4. loss = mean_B w(s)·dist(x0_θ(x_s, s, c), x0_hat) (eq. 17), dist = L2 or Huber.
    The teacher is the "ema" adapter; `after_step` moves it toward the policy by (1 − decay).
    """

    data_kind = "images_or_prompts"
    adapters = ("ema",)
    uses_reference = False
    role = "negative"  # Self-NPO: the TDFT offset is used as the negative model

    def __init__(self, name: str = "tdft"):
        self.name = name

    @staticmethod
    def teacher_fn(backend: Backend, cfg: MethodConfig, cond: Cond):
        """eps(x, t) of the EMA teacher, weakened as cfg.tdft_teacher says (no grad)."""
        spec = TDFT_TEACHERS[cfg.tdft_teacher]
        null = backend.null_cond(len(cond)).to(cond.hidden.device)
        if not spec.guided:
            return lambda x, t: backend.predict_eps(x, t, null, "ema")
        both = Cond.cat([null, cond])  # [2B]

        def guided(x, t):
            e = backend.predict_eps(torch.cat([x, x]), torch.cat([t, t]), both, "ema")  # [2B, C, h, w]
            e_u, e_c = e.chunk(2)
            return e_u + cfg.tdft_cfg * (e_c - e_u)
        return guided

    def compute(self, backend: Backend, batch: PromptBatch, cfg: MethodConfig, generator: torch.Generator | None = None) -> StepOut:
        _require(batch, PromptBatch, self.name)
        cond, T, abar = batch.cond, backend.num_train_timesteps, backend.abar
        B = len(cond)
        like = batch.latents if batch.latents is not None else cond.hidden
        device = like.device
        if batch.latents is None and batch.latent_shape is None:
            raise ValueError("tdft: a PromptBatch without latents needs latent_shape (C, h, w) to start from noise")
        shape = (B, *batch.latent_shape) if batch.latents is None else tuple(batch.latents.shape)
        t, _ = sample_timesteps(backend, cfg, B, generator, device, T=T - 1)  # [B] in [0, T-2]
        s = t + 1 + (_rand(B, generator, device) * (T - 1 - t)).long().clamp(max=T - 2 - t)  # [B] in [t+1, T-1]
        eps_start = _randn(shape, generator, like)  # [B, C, h, w]
        eps_s = _randn(shape, generator, like)  # [B, C, h, w]
        spec = TDFT_TEACHERS[cfg.tdft_teacher]
        with torch.no_grad():
            if spec.from_noise or batch.latents is None:
                t_start, x_start = torch.full_like(t, T - 1), eps_start
            else:
                stride = cfg.tdft_stride or max(1, T // FULL_SIM_STEPS)
                t_start = (t + cfg.tdft_k * stride).clamp(max=T - 1)
                x_start = add_noise(batch.latents, eps_start, gather(abar, t_start, batch.latents))
            teacher = self.teacher_fn(backend, cfg, cond)
            x_t = truncated_rollout(teacher, x_start, t_start, t, cfg.tdft_k, abar)  # [B, C, h, w]
            x0_hat = tweedie_x0(x_t, teacher(x_t, t), gather(abar, t, x_t))  # [B, C, h, w]
            x_s = renoise(x_t, t, s, abar, eps_s)  # [B, C, h, w]
        eps_student = backend.predict_eps(x_s, s, cond, "policy")  # [B, C, h, w]
        x0_student = eps_to_x0(eps_student, x_s, gather(abar, s, x_s))
        dist = x0_distance(x0_student, x0_hat, cfg.tdft_loss)  # [B]
        w = TIMESTEP_WEIGHTS[cfg.timestep_weight](s, abar).to(dist)  # [B]
        loss = (w * dist).mean()
        return StepOut(loss, {
            "loss": loss.detach(),
            "tdft/x0_loss": dist.detach().mean(),
            "tdft/t_mean": t.float().mean(),
            "tdft/s_mean": s.float().mean(),
            "tdft/target_std": x0_hat.float().std(),
        })

    def after_step(self, backend: Backend, cfg: MethodConfig) -> None:
        backend.ema_update("ema", "policy", cfg.ema_decay)


class DDSPOMethod(Method):
    """DDSPO, seed 003 eq. 4–5 (METHODS.md "DDSPO"): targets from the frozen reference under c
    (winner) and c⁻ (loser); logit = −(β/2)·w(t)·(m_w − m_l), β = cfg.ddspo_beta.

    c⁻ is batch.neg_cond when the data layer provides it, else the configured rewriter applied to
    batch.prompts (seeds drawn from the generator) and encoded with backend.encode_prompts. The
    loser image is batch.latents_l (efficient variant: another prompt's image), else the winner
    itself (then x_t^l = x_t^w and only the prompt differs). Forwards: policy [2B], reference [3B].
    """

    data_kind = "prompts_with_winners"

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

    def degraded_prompts(self, prompts: list[str], cfg: MethodConfig, generator: torch.Generator | None) -> list[str]:
        gen_device = _gdev(generator, torch.device("cpu"))
        seeds = torch.randint(0, 2 ** 62, (len(prompts),), generator=generator, device=gen_device).tolist()
        return self.rewriter(cfg)(prompts, seeds)

    def compute(self, backend: Backend, batch: PromptBatch, cfg: MethodConfig, generator: torch.Generator | None = None) -> StepOut:
        _require(batch, PromptBatch, self.name)
        if batch.latents is None:
            raise ValueError("ddspo needs winner latents (PromptBatch.latents): generate them with ddspo-prepare")
        x_w = batch.latents  # [B, C, h, w]
        x_l = batch.latents_l if batch.latents_l is not None else x_w  # [B, C, h, w]
        B, device = x_w.shape[0], x_w.device
        t, w = sample_timesteps(backend, cfg, B, generator, device)  # [B], [B]
        eps = _randn(x_w.shape, generator, x_w)  # [B, C, h, w]
        if batch.neg_cond is not None:
            neg = batch.neg_cond
        elif batch.prompts:
            neg = backend.encode_prompts(self.degraded_prompts(list(batch.prompts), cfg, generator))
        else:
            raise ValueError("ddspo needs prompts (to degrade) or a precomputed neg_cond in the batch")
        neg = neg.to(batch.cond.hidden.device)
        abar_t = gather(backend.abar, t, x_w)
        x_t = torch.cat([add_noise(x_w, eps, abar_t), add_noise(x_l, eps, abar_t)])  # [2B, C, h, w]
        t2 = torch.cat([t, t])  # [2B]
        eps_pol = backend.predict_eps(x_t, t2, batch.cond.repeat(2), "policy")  # [2B, C, h, w]
        with torch.no_grad():
            x_ref = torch.cat([x_t, x_t[B:]])  # [3B]: x_w, x_l, x_l
            c_ref = Cond.cat([batch.cond, neg, batch.cond])  # [3B]: c, c⁻, c
            eps_ref = backend.predict_eps(x_ref, torch.cat([t, t, t]), c_ref, self.reference_adapter(cfg))
        e_w_c, e_l_neg, e_l_c = eps_ref.chunk(3)  # [B, C, h, w] each
        mg = ddspo_margins(eps_pol[:B], eps_pol[B:], e_w_c, e_l_neg, e_l_c)
        out = ddspo_loss(mg.m_w, mg.m_l, beta=cfg.ddspo_beta, weight=w)
        m = PairMSE(pol_w=mg.m_w, pol_l=mg.mse_pol_l, ref_w=torch.zeros_like(mg.m_w), ref_l=mg.mse_ref_l)
        return StepOut(out.loss, {**preference_metrics(out, m, t),
                                  "ddspo/m_w": mg.m_w.detach().mean(), "ddspo/m_l": mg.m_l.detach().mean()})


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
