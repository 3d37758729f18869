"""Reference-model update with a divergence bound ("Rethinking DPO", seed 004 §3.1, eq. 7–8).

The reference is a LoRA adapter "ref" on the one network (never a second copy); the initial
model p_init is the base network (adapter None). Every `every` optimizer steps the policy is
copied into "ref", unless that would move the reference too far from p_init.

Divergence scale (METHODS.md decision). Eq. 8 writes
    D(p_ref, p_init) ≈ E_t[ T·ω(t)·( ‖eps − eps_ref‖² − ‖eps − eps_init‖² ) ].
We use the scale of our own training losses: Diffusion-DPO's constant weighting T·ω(t) ≡ 1
(folded into β, exactly as in the loss) and the per-element MEAN squared error (METHODS.md
`mse`), averaged over the probe winners and `n_t` uniform timesteps:
    D = mean_{x_w, t} [ mse(eps, eps_ref(x_t, t)) − mse(eps, eps_init(x_t, t)) ].
It reads as "how much worse (per latent element) the reference denoises the winners than the
initial model does". The paper's δ = 0.005 (SD1.5) / 0.002 (SDXL) are taken on this scale: for
SD-sized models mse(eps, eps_init) is about 0.1–0.2 at uniform t, so δ = 0.005 allows a few
percent of extra denoising error. The same eps and t are used for both adapters (common random
numbers) and, through a fixed probe seed, for every check, so successive estimates are comparable.

Exceed policy (seed 004 §3.1 and Table 3): the candidate (the current policy) is measured BEFORE
it is copied. Within the bound -> copy ("updated"). Beyond it:
  "freeze": keep the last accepted reference (which lies inside the δ-boundary) and stop
            updating for the rest of the run ("froze"; the paper's default).
  "reinit": reset the reference to p_init (zero LoRA, "reinitialised"; the paper's
            re-initialisation option) and keep checking every `every` steps.
"""
from __future__ import annotations

from typing import Any

import torch

from ..core.schedule import add_noise, gather, timesteps_uniform
from .backends.base import Backend
from ..core.cond import Cond
from .losses import per_sample_mse

ON_EXCEED = ("freeze", "reinit")


@torch.no_grad()
def divergence_estimate(backend: Backend, latents: torch.Tensor, cond: Cond, generator: torch.Generator | None = None,
                        n_t: int = 4, adapter: str | None = "ref") -> torch.Tensor:
    """Seed 004 eq. 8 on our scale (module docstring): mean[mse(eps, eps_adapter) − mse(eps, eps_init)]. scalar

    latents [B, C, h, w] clean winners, cond [B] their conditioning. All n_t·B noised rows run in
    one forward per adapter; eps and t are shared between `adapter` and the base network (None).
    """
    if n_t < 1:
        raise ValueError(f"divergence_estimate needs n_t >= 1, got {n_t}")
    B, T = latents.shape[0], backend.num_train_timesteps
    t = timesteps_uniform(n_t * B, T, generator).to(latents.device)  # [n_t*B]
    gdev = generator.device if generator is not None else latents.device
    eps = torch.randn((n_t * B, *latents.shape[1:]), generator=generator, device=gdev).to(latents)  # [n_t*B, C, h, w]
    x0 = latents.repeat(n_t, *([1] * (latents.ndim - 1)))  # [n_t*B, C, h, w]
    x_t = add_noise(x0, eps, gather(backend.abar, t, x0))
    c = cond.repeat(n_t)
    mse_adapter = per_sample_mse(eps, backend.predict_eps(x_t, t, c, adapter))  # [n_t*B]
    mse_init = per_sample_mse(eps, backend.predict_eps(x_t, t, c, None))  # [n_t*B]
    return (mse_adapter - mse_init).mean()


def _probe(batch, size: int) -> tuple[torch.Tensor, Cond]:
    """The first `size` winners of a PairBatch (latents_w) or PromptBatch (latents) and their cond."""
    latents = getattr(batch, "latents_w", None)
    if latents is None:
        latents = getattr(batch, "latents", None)
    if latents is None:
        raise ValueError("reference update: the probe batch has no clean latents (latents_w / latents) to probe with")
    n = min(size, latents.shape[0])
    return latents[:n], batch.cond.index(slice(0, n))


class ReferenceUpdater:
    """Copies "policy" into "ref" every `every` steps while D(policy, init) <= `bound` (module docstring).

    The loop calls `maybe_update(step, backend, batch)` after each optimizer step (step counted
    from 1); it returns an event dict to log when it acted, else None. Save `state_dict()` with
    the checkpoint.
    """

    def __init__(self, every: int, bound: float, on_exceed: str = "freeze", probe_size: int = 4,
                 n_t: int = 4, seed: int = 0, adapter: str = "ref"):
        if every < 1:
            raise ValueError(f"reference update period must be >= 1 step, got {every}")
        if not bound > 0:
            raise ValueError(f"reference divergence bound must be > 0, got {bound}")
        if on_exceed not in ON_EXCEED:
            raise ValueError(f"ref_on_exceed must be one of {ON_EXCEED}, got {on_exceed!r}")
        self.every, self.bound, self.on_exceed = every, bound, on_exceed
        self.probe_size, self.n_t, self.seed, self.adapter = probe_size, n_t, seed, adapter
        self.frozen = False

    @classmethod
    def from_config(cls, cfg) -> "ReferenceUpdater | None":
        """From a MethodConfig-like object; None when `ref_update_every` is 0 (off)."""
        if cfg.ref_update_every <= 0:
            return None
        return cls(cfg.ref_update_every, cfg.ref_bound, cfg.ref_on_exceed,
                   probe_size=getattr(cfg, "ref_probe_size", 4), n_t=getattr(cfg, "ref_probe_timesteps", 4),
                   seed=getattr(cfg, "seed", 0) or 0)

    def _generator(self, device: torch.device) -> torch.Generator:
        g = torch.Generator(device=device if device.type == "cuda" else "cpu")
        return g.manual_seed(self.seed)

    def maybe_update(self, step: int, backend: Backend, probe_batch) -> dict[str, Any] | None:
        if self.frozen or step <= 0 or step % self.every:
            return None
        latents, cond = _probe(probe_batch, self.probe_size)
        div = float(divergence_estimate(backend, latents, cond, self._generator(latents.device), self.n_t, "policy"))
        event = {"step": step, "ref/divergence": div, "ref/bound": self.bound}
        if div <= self.bound:
            backend.copy_adapter("policy", self.adapter)
            return {**event, "ref/event": "updated"}
        if self.on_exceed == "freeze":
            self.frozen = True
            return {**event, "ref/event": "froze"}
        backend.reset_adapter(self.adapter)
        return {**event, "ref/event": "reinitialised"}

    def state_dict(self) -> dict[str, Any]:
        return {"frozen": self.frozen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.frozen = bool(state["frozen"])
