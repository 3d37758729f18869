"""Health of a training run: warnings while it runs (`RunHealth`), each kind once. The loop
(`trainer/loop.py`) observes every step's metrics; a host shows the warnings (CLI: stderr,
ComfyUI: under the node's progress text)."""
from __future__ import annotations

import math
from collections import deque


class RunHealth:
    """Watches the per-step metrics of a run and returns each kind of warning at most once.

    nonfinite  the first step skipped for a non-finite loss or gradient norm (trainer/loop.py)
    saturated  over the last `window` steps implicit accuracy >= `acc_saturated` with the mean loss
               below `loss_saturated`, or over the last `min_history` steps a mean `logit/saturated_frac`
               >= `frac_saturated` with the median loss below `loss_saturated` (a run that saturates
               late: the longer means still hold the steps before): the preference logits saturate,
               -log σ(logit) ≈ 0 and its gradient vanishes (Diffusion-DPO eq. 14 with β or lr too high)
    winner     `llr/winner` (policy − reference MSE of the winner; METHODS.md) rising: its mean over
               the last `window` steps is positive and `z_winner` standard errors above 0, i.e. the
               winner's likelihood falls with the loser's (the failure Diff-SNPO §3 describes)
    spike      a finite loss above `spike_factor` x the running median of the previous `window`
               finite losses (at least `min_history` of them)
    """

    def __init__(self, window: int = 50, min_history: int = 20, acc_saturated: float = 0.99,
                 loss_saturated: float = 0.01, z_winner: float = 3.0, spike_factor: float = 5.0,
                 frac_saturated: float = 0.9):
        self.window, self.min_history = window, min_history
        self.acc_saturated, self.loss_saturated, self.frac_saturated = acc_saturated, loss_saturated, frac_saturated
        self.z_winner, self.spike_factor = z_winner, spike_factor
        self.history: dict[str, deque[float]] = {}
        self.warned: set[str] = set()

    def _series(self, key: str) -> deque[float]:
        return self.history.setdefault(key, deque(maxlen=self.window))

    def observe(self, step: int, metrics: dict, skipped: bool = False, cfg=None) -> list[str]:
        """Warnings new at this step (each kind once per run)."""
        found = {}
        loss = float(metrics.get("loss", math.nan))
        if skipped:
            found["nonfinite"] = (f"step {step}: loss {loss:.4g}, grad norm {float(metrics.get('grad_norm', math.nan)):.4g}"
                                  " not finite: step skipped, nothing changed (counted in train/skipped_nonfinite)")
        else:
            found.update(self._spike(step, loss))
            for key in ("loss", "implicit_acc", "llr/winner", "logit/saturated_frac"):
                if key in metrics and math.isfinite(float(metrics[key])):
                    self._series(key).append(float(metrics[key]))
            found.update(self._saturated(step, cfg))
            found.update(self._winner(step))
        new = [msg for kind, msg in found.items() if kind not in self.warned]
        self.warned.update(found)
        return new

    def _spike(self, step: int, loss: float) -> dict[str, str]:
        past = sorted(self._series("loss"))
        if len(past) < self.min_history or not math.isfinite(loss):
            return {}
        median = past[len(past) // 2]
        if median > 0 and loss > self.spike_factor * median:
            return {"spike": f"step {step}: loss spike {loss:.4g} = {loss / median:.1f}x the running median "
                             f"{median:.4g} of the last {len(past)} steps"}
        return {}

    def _saturated(self, step: int, cfg) -> dict[str, str]:
        acc, loss = self._series("implicit_acc"), self._series("loss")
        frac = list(self._series("logit/saturated_frac"))[-self.min_history:]
        recent = sorted(list(loss)[-self.min_history:])
        if len(frac) >= self.min_history and sum(frac) / len(frac) >= self.frac_saturated \
                and recent[len(recent) // 2] < self.loss_saturated:
            return {"saturated": f"step {step}: {100 * sum(frac) / len(frac):.0f}% of the logits past |10| with median "
                                 f"loss {recent[len(recent) // 2]:.2g} over the last {len(frac)} steps: the preference "
                                 f"is saturated, gradients vanish; beta or lr is likely too high{_knobs(cfg)}"}
        if len(acc) < self.min_history:
            return {}
        mean_acc, mean_loss = sum(acc) / len(acc), sum(loss) / len(loss)
        if mean_acc >= self.acc_saturated and mean_loss < self.loss_saturated:
            knobs = _knobs(cfg)
            return {"saturated": f"step {step}: implicit accuracy {mean_acc:.3f} with loss {mean_loss:.2g} over the "
                                 f"last {len(acc)} steps: the preference is saturated, gradients vanish; beta or lr "
                                 f"is likely too high{knobs}"}
        return {}

    def _winner(self, step: int) -> dict[str, str]:
        llr = self._series("llr/winner")
        n = len(llr)
        if n < self.min_history:
            return {}
        mean = sum(llr) / n
        sd = math.sqrt(sum((v - mean) ** 2 for v in llr) / (n - 1))
        if mean > 0 and mean > self.z_winner * sd / math.sqrt(n):
            return {"winner": f"step {step}: the winner's likelihood is falling (llr/winner mean {mean:+.3g} over the "
                              f"last {n} steps, {mean / (sd / math.sqrt(n)) if sd > 0 else math.inf:.1f} standard "
                              "errors above 0): the policy moves away from the preferred images too"}
        return {}


def _knobs(cfg) -> str:
    """' (beta 5000, lr 0.001)', naming the β field the method reads (`Method.beta_key`: ddspo_beta for DDSPO)."""
    if cfg is None:
        return ""
    from .methods import METHODS

    key = getattr(METHODS.get(cfg.method), "beta_key", "beta") or "beta"
    return f" ({key} {getattr(cfg, key):g}, lr {cfg.lr:g})"
