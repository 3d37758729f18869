"""Extraction: SVD of a weight difference into a rank-r LoRA."""
from __future__ import annotations

import math

import torch

from .types import DenseDelta, LowRankDelta, Offset


# Extraction
# ----------------------------------------------------------------------------------------------
def extract_lora(offset_or_dense, rank: int, *, conv_rank: int | None = None, keep_dense: bool = False) -> tuple[Offset, dict]:
    """Truncated-SVD LoRA of every DenseDelta (Eckart-Young: the best rank-r approximation in
    Frobenius norm).

    Linear: SVD of W [out, in] -> down = sqrt(S_r) Vh_r [r, in], up = U_r sqrt(S_r) [out, r].
    Conv2d: SVD of W reshaped [out, in*kh*kw] -> down [r, in, kh, kw], up [out, r, 1, 1]
    (`conv_rank` for kernels larger than 1x1, default `rank`). LowRankDeltas pass through.
    Deltas that are not matrices (norm weights) are kept dense with `keep_dense`, otherwise
    dropped; bias deltas cannot be expressed by a LoRA and are dropped. Both are reported.

    Report: {"modules": {"comp:path": rel_err}, "overall": rel_err, "rank": ..., "dropped": [...],
    "dropped_bias": [...]}, rel_err = sqrt(sum ||W - W_r||^2 / sum ||W||^2) over the SVD'd weights.
    """
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    conv_rank = conv_rank or rank
    src = offset_or_dense
    if isinstance(src, DenseDelta):
        src = Offset(unet={"": src})
    elif isinstance(src, dict):
        src = Offset(unet=dict(src))
    out = Offset(metadata=dict(src.metadata))
    report = {"modules": {}, "overall": 0.0, "rank": rank, "conv_rank": conv_rank, "dropped": [], "dropped_bias": []}
    err2 = tot2 = 0.0
    for comp, mods in src.components().items():
        dst = out.unet if comp == "unet" else out.text_encoders.setdefault(comp, {})
        for path, d in mods.items():
            key = f"{comp}:{path}"
            if isinstance(d, LowRankDelta):
                dst[path] = d
                continue
            w = d.dense(torch.float32)
            if d.bias is not None and d.bias.any():
                report["dropped_bias"].append(key)
            if w.ndim not in (2, 4):
                report["dropped"].append(key)
                if keep_dense:
                    dst[path] = d
                continue
            r = rank if w.ndim == 2 or tuple(w.shape[2:]) == (1, 1) else conv_rank
            lr, e2 = _svd_lora(w, r)
            n2 = float(w.double().pow(2).sum())
            dst[path] = lr
            err2, tot2 = err2 + e2, tot2 + n2
            report["modules"][key] = math.sqrt(e2 / n2) if n2 > 0 else 0.0
    if not out.text_encoders:
        out.text_encoders = {}
    out.text_encoders = {k: v for k, v in out.text_encoders.items() if v}
    report["overall"] = math.sqrt(err2 / tot2) if tot2 > 0 else 0.0
    return out, report


def _svd_lora(w: torch.Tensor, rank: int) -> tuple[LowRankDelta, float]:
    """Rank-`rank` factorisation of w ([out, in] or [out, in, kh, kw]) and its squared error."""
    out_ch = w.shape[0]
    mat = w.reshape(out_ch, -1).double()  # [out, in*kh*kw]
    u, s, vh = torch.linalg.svd(mat, full_matrices=False)
    r = min(rank, s.numel())
    root = s[:r].sqrt()
    up = (u[:, :r] * root).float()  # [out, r]
    down = (root[:, None] * vh[:r]).float()  # [r, in*kh*kw]
    err2 = float((mat - (u[:, :r] * s[:r]) @ vh[:r]).pow(2).sum())
    if w.ndim == 4:
        down = down.reshape(r, *w.shape[1:])  # [r, in, kh, kw]
        up = up.reshape(out_ch, r, 1, 1)
    return LowRankDelta(down=down.contiguous(), up=up.contiguous(), scale=1.0), err2
