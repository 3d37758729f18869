"""Progress of a run for a person at the ComfyUI training node: text (step, loss, speed, ETA), a live
loss-curve preview, rate-limited; and the run's outputs as ComfyUI IMAGE tensors [1, H, W, 3] (loss
curve, validation grid). The run's health warnings are the trainer's (`trainer/health.py`)."""
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

from ...trainer.data.records import load_image


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
