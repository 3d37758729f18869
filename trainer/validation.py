"""Metrics log, validation images and curves, and the final LoRA file of a training run.

Validation (every `validate_every` steps, main process): for each prompt x seed, one image of
the base model (plain CFG) and one with the trained LoRA, sampled the way the LoRA is meant to
be used (its role's row of `core.guidance.ROLE_SAMPLING`, as `ROLE_BRANCHES`):
  positive (dpo, bdpo, ddspo)  CFG, LoRA on both branches
  negative (npo, tdft)         NPO guidance (seed 001 §3.2): base on the conditional branch,
                               LoRA on the unconditional branch (prompt ∅)
  snpo                         SNPO sampling (seed 000 eq. 12-13): CFG of the LoRA model with ∅
The sampler is a deterministic DDIM (η = 0) on `backend.predict_eps`, so it runs on every backend
(diffusers, pixel-space world, ComfyUI) without a pipeline. Output: `validation/step_N.png`
(rows: prompts; columns: seeds, base | LoRA), `curves.png` + `curves.csv` (loss, implicit
accuracy, lr over steps).
"""
from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Any

import torch

from ..core.atomic import append_bytes, atomic_path
from ..core.guidance import GUIDANCE, ROLE_SAMPLING
from ..core.flow import FLOW, euler_timesteps, sample_euler
from ..core.sampling import ddim_timesteps, guided_denoiser, sample_ddim
from .stream import latent_shape

# role -> (adapter of the conditional branch, adapter of the unconditional branch ∅, combine): the trained
# adapter ("policy") on the branches core.guidance.ROLE_SAMPLING names; "base" is plain CFG of the base model
ROLE_BRANCHES: dict[str, tuple[str | None, str | None, str]] = {
    "base": (None, None, "cfg"),
    **{role: ("policy" if rs.cond else None, "policy" if rs.uncond else None, rs.mode)
       for role, rs in ROLE_SAMPLING.items()},
}


def method_role(method, cfg) -> str:
    """The LoRA's role (metadata + sampling): `Method.role`."""
    role = method.role
    if role not in ROLE_BRANCHES or role == "base":
        raise ValueError(f"method {cfg.method!r} declares no usable role ({role!r}); expected positive, negative or snpo")
    return role


# ---------------------------------------------------------------------------- metrics log
class MetricsLog:
    """`metrics.csv` (one row per logged step, columns = union of keys) + TensorBoard when installed."""

    def __init__(self, out: Path, enabled: bool = True, resume_step: int = 0):
        self.path, self.enabled = Path(out) / "metrics.csv", enabled
        self.rows: list[dict[str, Any]] = []
        self.tb = None
        if not enabled:
            return
        if self.path.is_file():  # resume: keep the rows up to the checkpoint, drop the rest
            with open(self.path, newline="") as f:
                self.rows = [r for r in csv.DictReader(f) if resume_step and int(r["step"]) <= resume_step]
        self._rewrite()
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(Path(out) / "tensorboard"))
        except ImportError:
            self.tb = None

    def _columns(self) -> list[str]:
        cols = ["step"]
        for r in self.rows:
            cols += [k for k in r if k not in cols]
        return cols

    def _rewrite(self) -> None:
        with atomic_path(self.path) as tmp, open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self._columns())
            w.writeheader()
            w.writerows(self.rows)

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": step, **metrics}
        grew = any(k not in self._columns() for k in row)
        self.rows.append(row)
        if grew:
            self._rewrite()
        else:  # a failed append (disk full) is cut back: no torn row for a resumed run to read
            line = io.StringIO(newline="")
            csv.DictWriter(line, fieldnames=self._columns()).writerow(row)
            append_bytes(self.path, line.getvalue().encode("utf-8"))
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, step)

    def series(self, key: str) -> tuple[list[int], list[float]]:
        pts = [(int(r["step"]), float(r[key])) for r in self.rows if r.get(key) not in (None, "")]
        return [s for s, _ in pts], [v for _, v in pts]

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


# ---------------------------------------------------------------------------- sampling
@torch.no_grad()
def ddim_sample(backend, cond, null, noise: torch.Tensor, steps: int, w: float, branches) -> torch.Tensor:
    """Deterministic DDIM (Song et al. 2021, eq. 12, η = 0) with guidance `branches` (ROLE_BRANCHES), to the clean
    sample; on a flow model the flow Euler solver with the same guidance on velocities."""
    a_cond, a_null, combine = branches[0], branches[1], GUIDANCE[branches[2]]
    if backend.prediction_type == FLOW:  # flow: the same guidance on velocities, flow Euler at the scheduler's static
        # shift (a preview: Flux's resolution-dependent mu, which `generate` applies, is not used here)
        model = guided_denoiser(lambda x, t: backend.predict_v(x, t, cond, a_cond),
                                lambda x, t: backend.predict_v(x, t, null, a_null), combine, w)
        shift = float(backend.scheduler.config.get("shift", 1.0) or 1.0)
        return sample_euler(model, noise, euler_timesteps(steps, shift))
    model = guided_denoiser(lambda x, t: backend.predict_eps(x, t, cond, a_cond),
                            lambda x, t: backend.predict_eps(x, t, null, a_null), combine, w)
    return sample_ddim(model, noise, ddim_timesteps(backend.num_train_timesteps, steps), backend.abar, to_clean=True)


def _to_uint8(px: torch.Tensor):
    import numpy as np

    img = ((px.clamp(-1, 1) + 1) * 127.5).round().byte().cpu()  # [B, C, H, W]
    if img.shape[1] == 1:
        img = img.repeat(1, 3, 1, 1)
    return np.ascontiguousarray(img[:, :3].permute(0, 2, 3, 1).numpy())


def validation_grid(cfg, backend, role: str):
    """rows = prompts, columns = seed x (base, LoRA)."""
    from PIL import Image

    shape = latent_shape(backend, cfg.resolution)  # (C, h, w)
    tiles = []
    for prompt in cfg.validation_prompts:
        cond, null = backend.encode_prompts([prompt]), backend.null_cond(1)
        for seed in cfg.validation_seeds:
            g = torch.Generator().manual_seed(int(seed))
            noise = torch.randn((1, *shape), generator=g).to(backend.device)  # [1, C, h, w]
            for branches in (ROLE_BRANCHES["base"], ROLE_BRANCHES[role]):
                x = ddim_sample(backend, cond, null, noise, cfg.validation_sample_steps, cfg.validation_guidance, branches)
                tiles.append(_to_uint8(backend.decode_latents(x))[0])
    h, w = tiles[0].shape[:2]
    cols = 2 * len(cfg.validation_seeds)
    grid = Image.new("RGB", (cols * w, len(cfg.validation_prompts) * h))
    for i, tile in enumerate(tiles):
        grid.paste(Image.fromarray(tile), ((i % cols) * w, (i // cols) * h))
    return grid


def plot_curves(log: MetricsLog, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in ("loss", "implicit_acc", "lr") if log.series(k)[0]]
    if not keys:
        return
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3), squeeze=False)
    for ax, k in zip(axes[0], keys):
        ax.plot(*log.series(k))
        ax.set_title(k)
        ax.set_xlabel("step")
    fig.tight_layout()
    with atomic_path(out / "curves.png") as tmp:
        fig.savefig(tmp, dpi=80)
    plt.close(fig)
    with atomic_path(out / "curves.csv") as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", *keys])
        series = {k: dict(zip(*log.series(k))) for k in keys}
        for s in sorted({s for k in keys for s in series[k]}):
            w.writerow([s, *[series[k].get(s, "") for k in keys]])


def validate(cfg, backend, method, step: int, out: Path, log: MetricsLog) -> Path:
    """Write validation/step_N.png and the curves; returns the grid path."""
    vdir = Path(out) / "validation"
    vdir.mkdir(parents=True, exist_ok=True)
    path = vdir / f"step_{step:06d}.png"
    with atomic_path(path) as tmp:
        validation_grid(cfg, backend, method_role(method, cfg)).save(tmp)
    plot_curves(log, Path(out))
    return path


# ---------------------------------------------------------------------------- final LoRA
def base_model_hash(cfg, backend) -> str:
    from ..core import offsets

    try:
        return str(offsets.model_hash(backend.unet))
    except Exception as e:  # noqa: BLE001 - metadata must not stop a finished run from saving
        return f"unknown ({type(e).__name__})"


def lora_metadata(cfg, backend, method, step: int) -> dict[str, str]:
    """Safetensors metadata of the trained LoRA: the `npo_*` fields of core/offsets/schema.py."""
    from ..core.offsets.schema import npo_metadata

    return npo_metadata(
        role=method_role(method, cfg), method=cfg.method, beta=getattr(cfg, getattr(method, "beta_key", None) or "beta", ""),
        **{"lambda": getattr(cfg, method.lambda_key) if getattr(method, "lambda_key", None) else None},  # None: not written
        base_model_hash=base_model_hash(cfg, backend),
        base_model=os.path.basename(str(cfg.model).rstrip("/")) if cfg.model else "",
        steps=step, effective_batch=cfg.effective_batch, lr=cfg.lr,
        **getattr(backend, "lora_metadata", dict)())


def save_lora(cfg, backend, method, step: int, out: Path) -> Path:
    """The policy LoRA via core.offsets (kohya format by default; save_offset writes atomically)."""
    from ..core.offsets.types import Offset
    from ..core.offsets import offset_from_peft, save_offset

    path = Path(out) / f"{cfg.lora_name}.safetensors"
    write_lora = getattr(backend, "write_lora", None)
    if write_lora is not None:  # a backend with its own file layout (ComfyUI's SD3 / Flux: ComfyUI's module names)
        return write_lora(path, lora_metadata(cfg, backend, method, step))
    offset = Offset(unet=offset_from_peft(backend.unet, "policy", "unet"))
    if getattr(backend, "is_transformer", False):  # SD3 / Flux: diffusers' transformer.* layout (no kohya form)
        from ..core.offsets import save_transformer_lora

        return save_transformer_lora(offset, path, family=backend.family, base_model_version=backend.spec.base_model_version,
                                     metadata=lora_metadata(cfg, backend, method, step))
    save_offset(offset, path, format=cfg.save_format, metadata=lora_metadata(cfg, backend, method, step),
                base=backend.unet)
    return path
