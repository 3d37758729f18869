"""A tiny fake training backend implementing `trainer/backends/base.py`'s protocol, for method tests.

Network: eps = conv1x1(silu(conv3x3(x; W1 + Δ1) + time(t) + text(cond)); W2 + Δ2) on [N, 4, 8, 8].
Adapters are named LoRA-like deltas Δ = up @ down on W1 and W2 (one network, never a copy);
only "policy" has trainable tensors. Every `predict_eps` call is recorded in `calls`, every
prompt list given to `encode_prompts` in `encoded`.
"""
from __future__ import annotations

import hashlib
import math

import torch
import torch.nn.functional as F

from npo_suite.core.cond import Cond

C, H, HID, L, D, RANK = 4, 8, 8, 3, 8, 2


def sd_abar(T: int = 1000) -> torch.Tensor:
    """SD's scaled-linear schedule (beta 0.00085 .. 0.012), float64 [T]."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, T, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0)


def _word_vec(word: str) -> torch.Tensor:
    seed = int(hashlib.sha256(word.encode()).hexdigest()[:12], 16)
    return torch.randn(D, generator=torch.Generator().manual_seed(seed))


class FakeBackend:
    family = "world"
    prediction_type = "epsilon"

    def __init__(self, seed: int = 0, T: int = 1000, lora_init_scale: float = 0.0):
        g = torch.Generator().manual_seed(seed)
        self.abar = sd_abar(T)
        self.device = torch.device("cpu")
        self.W1 = torch.randn(HID, C, 3, 3, generator=g) * 0.3
        self.W2 = torch.randn(C, HID, 1, 1, generator=g) * 0.3
        self.Wt = torch.randn(HID, generator=g)
        self.Wc = torch.randn(HID, D, generator=g) * 0.3
        self.adapters: dict[str, dict[str, torch.Tensor]] = {}
        self.adapters["policy"] = {
            "down1": (torch.randn(RANK, C * 9, generator=g) * 0.3).requires_grad_(True),
            "up1": (torch.randn(HID, RANK, generator=g) * lora_init_scale).requires_grad_(True),
            "down2": (torch.randn(RANK, HID, generator=g) * 0.3).requires_grad_(True),
            "up2": (torch.randn(C, RANK, generator=g) * lora_init_scale).requires_grad_(True),
        }
        self.base_params = [self.W1, self.W2, self.Wt, self.Wc]
        self.calls: list[tuple[str | None, int, bool]] = []
        self.encoded: list[list[str]] = []

    @property
    def num_train_timesteps(self) -> int:
        return self.abar.shape[0]

    # ---- conditioning
    def encode_prompts(self, prompts: list[str]) -> Cond:
        self.encoded.append(list(prompts))
        rows = []
        for p in prompts:
            words = p.split()
            v = torch.stack([_word_vec(w) for w in words]).mean(0) if words else torch.zeros(D)
            rows.append(v.expand(L, D))
        return Cond(torch.stack(rows))  # [B, L, D]

    def null_cond(self, batch_size: int) -> Cond:
        return Cond(torch.zeros(batch_size, L, D))

    def encode_images(self, pixels):
        return pixels

    def decode_latents(self, latents):
        return latents

    # ---- network
    def _delta(self, name: str | None):
        if name is None:
            return 0.0, 0.0
        a = self.adapters[name]
        d1 = (a["up1"] @ a["down1"]).reshape(self.W1.shape)
        d2 = (a["up2"] @ a["down2"]).reshape(self.W2.shape)
        return d1, d2

    def predict_eps(self, x_t, t, cond: Cond, adapter: str | None = "policy"):
        assert x_t.shape[0] == t.shape[0] == len(cond), (x_t.shape, t.shape, len(cond))
        self.calls.append((adapter, x_t.shape[0], torch.is_grad_enabled()))
        if adapter is not None and adapter not in self.adapters:
            raise KeyError(f"no adapter {adapter!r}")
        d1, d2 = self._delta(adapter)
        if adapter != "policy":
            d1 = d1.detach() if torch.is_tensor(d1) else d1
            d2 = d2.detach() if torch.is_tensor(d2) else d2
        h = F.conv2d(x_t.float(), self.W1 + d1, padding=1)  # [N, HID, H, W]
        temb = torch.sin(t.float() / self.num_train_timesteps * math.pi)[:, None] * self.Wt  # [N, HID]
        cemb = cond.hidden.float().mean(1) @ self.Wc.T  # [N, HID]
        h = F.silu(h + (temb + cemb)[:, :, None, None])
        return F.conv2d(h, self.W2 + d2).to(x_t.dtype)  # [N, C, H, W]

    # ---- adapters
    def add_adapter(self, name: str, init_from: str | None = "policy") -> None:
        if init_from is None:
            src = {k: torch.zeros_like(v) for k, v in self.adapters["policy"].items()}
        else:
            src = self.adapters[init_from]
        self.adapters[name] = {k: v.detach().clone() for k, v in src.items()}

    def copy_adapter(self, src: str, dst: str) -> None:
        with torch.no_grad():
            for k, v in self.adapters[src].items():
                self.adapters[dst][k].copy_(v)

    def ema_update(self, dst: str, src: str, decay: float) -> None:
        with torch.no_grad():
            for k, v in self.adapters[src].items():
                self.adapters[dst][k].mul_(decay).add_(v.detach(), alpha=1 - decay)

    def reset_adapter(self, name: str) -> None:
        with torch.no_grad():
            for k in ("up1", "up2"):
                self.adapters[name][k].zero_()

    def trainable_parameters(self):
        return list(self.adapters["policy"].values())

    def policy_calls(self):
        return [c for c in self.calls if c[0] == "policy"]
