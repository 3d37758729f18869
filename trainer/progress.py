"""Progress of a run for a person: text (step, loss, speed, ETA), a live loss-curve preview,
rate-limited; the run's health (warnings while it runs, `RunHealth`); and the run's outputs as
images (loss curve, validation grid)."""
from __future__ import annotations

import csv
import io
import math
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .data.records import load_image


def read_losses(path: Path) -> list[tuple[int, float]]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [(int(r["step"]), float(r["loss"])) for r in csv.DictReader(f) if r.get("loss") not in (None, "")]


def image_tensor(path: Path) -> torch.Tensor:
    """An image file as IMAGE [1, H, W, 3] in [0, 1]."""
    import numpy as np

    arr = np.asarray(load_image(path), dtype=np.float32) / 255.0
    return torch.from_numpy(arr)[None]  # [1, H, W, 3]


def blank_image(size: int = 64) -> torch.Tensor:
    """IMAGE [1, size, size, 3] of zeros: the `validation` output of a run without validation."""
    return torch.zeros(1, size, size, 3)


def loss_curve_image(losses: list[tuple[int, float]], title: str = "loss") -> torch.Tensor:
    """IMAGE [1, H, W, 3] in [0, 1]: the per-step loss (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from PIL import Image

    fig, ax = plt.subplots(figsize=(5, 3), dpi=100)
    if losses:
        ax.plot([s for s, _ in losses], [v for _, v in losses], marker="o" if len(losses) < 30 else None)
    ax.set_xlabel("step")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    img = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(img)[None]  # [1, H, W, 3]


# ---------------------------------------------------------------------------------------------
# live progress: text and loss-curve preview, rate-limited
# ---------------------------------------------------------------------------------------------
def format_duration(seconds: float) -> str:
    """ETA text: 42s, 3m05s, 2h07m ('?' when unknown)."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def format_rate(steps_per_s: float | None) -> str:
    """'2.35 it/s', or seconds per step when slower than one step a second ('61.2 s/it')."""
    if steps_per_s is None or not math.isfinite(steps_per_s) or steps_per_s <= 0:
        return "? it/s"
    return f"{steps_per_s:.2f} it/s" if steps_per_s >= 1 else f"{1 / steps_per_s:.1f} s/it"


@dataclass
class ProgressUpdate:
    """What the UI should show after one step: `text` (None: not yet) and whether to redraw the curve."""

    text: str | None
    image: bool


class ProgressDisplay:
    """Step, loss, running mean, speed and ETA of a run, for a UI that must not slow the run down.

    `update(step, total, loss)` after every optimizer step returns what to emit. Text goes out at
    most every `text_every` s, the curve image at most every `image_every` s (and only with 2+
    points); both always at the last step. Each kind also waits `cost / max_overhead` s after an
    emission that took `cost` s (`spent(kind, cost)`), so drawing and sending stay under
    `max_overhead` of the run's wall time however slow the UI side is. Speed is measured over the
    last `rate_window` steps of this session (a resumed run does not count the steps it skipped)."""

    def __init__(self, total: int, *, text_every: float = 0.5, image_every: float = 5.0, mean_window: int = 20,
                 rate_window: int = 20, max_overhead: float = 0.02, clock: Callable[[], float] = time.monotonic):
        self.total, self.text_every, self.image_every = total, text_every, image_every
        self.mean_window, self.max_overhead, self.clock = mean_window, max_overhead, clock
        self.losses: list[tuple[int, float]] = []
        self._times: deque[tuple[float, int]] = deque(maxlen=rate_window + 1)  # (time, step)
        self._last = {"text": -math.inf, "image": -math.inf}
        self._cost = {"text": 0.0, "image": 0.0}
        self.warnings: list[str] = []

    def start(self, step: int | None = None) -> None:
        """Anchor the speed now, right before a step (optional). `step` None: the step before the
        first update's (a resumed run learns its first step only from the loop)."""
        self._times.clear()
        self._times.append((self.clock(), step))

    def running_mean(self) -> float:
        tail = [v for _, v in self.losses[-self.mean_window:] if math.isfinite(v)]
        return sum(tail) / len(tail) if tail else math.nan

    def steps_per_s(self) -> float | None:
        if len(self._times) < 2:
            return None
        (t0, s0), (t1, s1) = self._times[0], self._times[-1]
        return (s1 - s0) / (t1 - t0) if t1 > t0 and s1 > s0 else None

    def eta(self, step: int, total: int) -> float:
        rate = self.steps_per_s()
        return (total - step) / rate if rate else math.nan

    def text(self, step: int, total: int, loss: float) -> str:
        """One status line, then one line per health warning of the run so far (they stay shown)."""
        n = min(self.mean_window, len(self.losses))
        line = (f"step {step}/{total} | loss {loss:.5f} | mean({n}) {self.running_mean():.5f} | "
                f"{format_rate(self.steps_per_s())} | ETA {format_duration(self.eta(step, total))}")
        return "\n".join([line, *(f"warning: {w}" for w in self.warnings)])

    def warn(self, message: str) -> None:
        """A health warning (`RunHealth`): shown under every later text line, the next one sent at once."""
        self.warnings.append(message)
        self._last["text"] = -math.inf

    def _due(self, kind: str, every: float, now: float, last_step: bool) -> bool:
        wait = max(every, self._cost[kind] / self.max_overhead if self.max_overhead > 0 else 0.0)
        return last_step or now - self._last[kind] >= wait

    def update(self, step: int, total: int, loss: float) -> ProgressUpdate:
        now = self.clock()
        self.total = total
        self.losses.append((step, float(loss)))
        if self._times and self._times[0][1] is None:
            self._times[0] = (self._times[0][0], step - 1)
        self._times.append((now, step))
        last = step >= total
        text = self.text(step, total, loss) if self._due("text", self.text_every, now, last) else None
        image = len(self.losses) >= 2 and self._due("image", self.image_every, now, last)
        if text is not None:
            self._last["text"] = now
        if image:
            self._last["image"] = now
        return ProgressUpdate(text, image)

    def spent(self, kind: str, seconds: float) -> None:
        """Record how long emitting `kind` ("text" | "image") took (it spaces the next ones)."""
        self._cost[kind] = max(0.0, float(seconds))


def loss_curve_preview(losses: list[tuple[int, float]], mean_window: int = 20, size: tuple[int, int] = (320, 180)):
    """PIL RGB image of the loss (light) and its running mean (dark) over steps; PIL only (~1 ms)."""
    from PIL import Image, ImageDraw

    w, h = size
    img = Image.new("RGB", size, (250, 250, 250))
    draw = ImageDraw.Draw(img)
    pts = [(s, v) for s, v in losses if math.isfinite(v)]
    left, right, top, bottom = 56, w - 8, 16, h - 20
    draw.rectangle([left, top, right, bottom], outline=(160, 160, 160))
    if not pts:
        draw.text((left + 6, top + 6), "loss: no finite value yet", fill=(60, 60, 60))
        return img
    vals = [v for _, v in pts]
    lo, hi = min(vals), max(vals)
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5 * max(abs(lo), 1e-6), hi + 0.5 * max(abs(hi), 1e-6)
    s0, s1 = pts[0][0], max(pts[-1][0], pts[0][0] + 1)

    def xy(s, v):
        return (left + (s - s0) / (s1 - s0) * (right - left), bottom - (v - lo) / (hi - lo) * (bottom - top))

    mean, acc = [], deque(maxlen=mean_window)
    for s, v in pts:
        acc.append(v)
        mean.append((s, sum(acc) / len(acc)))
    stride = max(1, len(pts) // (2 * w))  # a long run: at most ~2 points per pixel column (always the last)

    def thin(series):
        return series[::stride] + ([series[-1]] if (len(series) - 1) % stride else [])
    for series, colour, width in ((pts, (150, 180, 230), 1), (mean, (20, 70, 170), 2)):
        line = [xy(s, v) for s, v in thin(series)]
        if len(line) == 1:
            x, y = line[0]
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
        else:
            draw.line(line, fill=colour, width=width)
    draw.text((4, top - 2), f"{hi:.4g}", fill=(60, 60, 60))
    draw.text((4, bottom - 10), f"{lo:.4g}", fill=(60, 60, 60))
    draw.text((left, bottom + 4), f"step {s0}", fill=(60, 60, 60))
    draw.text((right - 70, bottom + 4), f"step {pts[-1][0]}", fill=(60, 60, 60))
    draw.text((left + 4, 2), f"loss {vals[-1]:.5f}  mean({len(acc)}) {mean[-1][1]:.5f}", fill=(20, 20, 20))
    return img




# ---------------------------------------------------------------------------------------------
# health of a run: warnings while it runs, each kind once
# ---------------------------------------------------------------------------------------------
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
