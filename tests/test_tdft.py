"""Self-NPO TDFT math (seed 002 eq. 12–17)."""
import math

import numpy as np

import pytest
import torch

from npo_suite.trainer.losses import TDFT_X0_LOSSES, pseudo_huber, tdft_x0_loss
from npo_suite.trainer.tdft import (grid_timesteps, renoise, rollout_timesteps, solver_grid, truncated_rollout,
                                    tweedie_x0)


def sd_abar(T=1000):
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, T, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0)


def test_renoise_golden():
    # abar_t = 0.64 (a_t = 0.8, sigma_t^2 = 0.36), abar_s = 0.16 (a_s = 0.4, sigma_s^2 = 0.84)
    # a_s/a_t = 0.5 ; var = 0.84 - 0.36 * 0.25 = 0.75 ; x_s = 0.5*2 + sqrt(0.75)*1 = 1.8660254
    abar = torch.tensor([0.64, 0.16], dtype=torch.float64)
    x_s = renoise(torch.full((1, 1, 1, 1), 2.0), torch.tensor([0]), torch.tensor([1]), abar, torch.ones(1, 1, 1, 1))
    assert math.isclose(x_s.item(), 1 + math.sqrt(0.75), rel_tol=1e-6)
    # s == t: identity
    same = renoise(torch.full((1, 1, 1, 1), 2.0), torch.tensor([1]), torch.tensor([1]), abar, torch.ones(1, 1, 1, 1))
    assert same.item() == pytest.approx(2.0)
    with pytest.raises(ValueError, match="s >= t"):
        renoise(torch.zeros(1, 1), torch.tensor([1]), torch.tensor([0]), abar, torch.zeros(1, 1))


def test_tweedie_golden():
    # (x_t - sqrt(1 - 0.64) * eps) / sqrt(0.64) = (2 - 0.6) / 0.8 = 1.75
    assert tweedie_x0(torch.tensor(2.0), torch.tensor(1.0), torch.tensor(0.64)).item() == pytest.approx(1.75)


def test_renoise_gives_forward_marginal_monte_carlo():
    """x0 ~ N(0.5, 0.3^2) per element; x_t from the forward process; renoise(t -> s) must have the
    forward marginal at s: mean a_s*0.5, variance abar_s*0.09 + 1 - abar_s (seed 002 Thm. 1)."""
    g = torch.Generator().manual_seed(0)
    abar = sd_abar()
    n = 200_000
    for t_, s_ in [(100, 600), (400, 999), (0, 1)]:
        x0 = 0.5 + 0.3 * torch.randn(n, 1, generator=g, dtype=torch.float64)
        t = torch.full((n,), t_)
        s = torch.full((n,), s_)
        x_t = abar[t_].sqrt() * x0 + (1 - abar[t_]).sqrt() * torch.randn(n, 1, generator=g, dtype=torch.float64)
        x_s = renoise(x_t, t, s, abar, torch.randn(n, 1, generator=g, dtype=torch.float64))
        mean, var = abar[s_].sqrt() * 0.5, abar[s_] * 0.09 + 1 - abar[s_]
        # sd of the sample mean <= sqrt(1/2e5) = 0.0022 -> tolerance 0.01 (> 4 sigma);
        # relative sd of the sample variance ~ sqrt(2/n) = 0.3% -> tolerance 2%
        assert abs(x_s.mean().item() - mean.item()) < 0.01
        assert abs(x_s.var().item() / var.item() - 1) < 0.02


def test_rollout_grid_and_oracle_teacher_is_exact():
    assert rollout_timesteps(torch.tensor([900]), torch.tensor([100]), 4)[:, 0].tolist() == [900, 700, 500, 300, 100]
    # for a point mass at x0*, the oracle eps(x, t) = (x - a_t x0*) / sigma_t makes DDIM exact:
    # x_{t'} = a_t' x0* + sigma_t' z  ->  x_t = a_t x0* + sigma_t z (the same z)
    abar = sd_abar()
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 4, 2, 2, generator=g, dtype=torch.float64)
    z = torch.randn(3, 4, 2, 2, generator=g, dtype=torch.float64)
    t_start, t_end = torch.tensor([999, 700, 300]), torch.tensor([10, 650, 300])
    a = lambda tt: abar[tt].sqrt().reshape(-1, 1, 1, 1)  # noqa: E731
    sg = lambda tt: (1 - abar[tt]).sqrt().reshape(-1, 1, 1, 1)  # noqa: E731
    calls = []

    def teacher(x, tt):
        calls.append(tt.clone())
        return (x - a(tt) * x0) / sg(tt)

    x_t = truncated_rollout(teacher, a(t_start) * x0 + sg(t_start) * z, t_start, t_end, 5, abar)
    assert len(calls) == 5
    assert torch.allclose(x_t, a(t_end) * x0 + sg(t_end) * z, atol=1e-9)
    assert torch.allclose(tweedie_x0(x_t, teacher(x_t, t_end), abar[t_end].reshape(-1, 1, 1, 1)), x0, atol=1e-9)


def test_tdft_x0_loss_golden():
    pred, target = torch.zeros(1, 2), torch.tensor([[1.0, 3.0]])
    assert tdft_x0_loss(pred, target, "l2").item() == pytest.approx((1 + 9) / 2)  # 5
    # F.huber_loss(delta=1): |1| -> 0.5*1^2 = 0.5 ; |3| -> 1*(3 - 0.5) = 2.5 ; mean 1.5
    assert tdft_x0_loss(pred, target, "huber").item() == pytest.approx(1.5)
    # pseudo-Huber c = 1e-3: sqrt(1 + 1e-6) - 1e-3 = 0.9990005 ; sqrt(9 + 1e-6) - 1e-3 = 2.9990002 ; mean 1.99900035
    assert tdft_x0_loss(pred, target, "pseudo_huber", c=1e-3).item() == pytest.approx(
        ((math.sqrt(1 + 1e-6) - 1e-3) + (math.sqrt(9 + 1e-6) - 1e-3)) / 2, rel=1e-6)
    # small residuals: sqrt(r^2 + c^2) - c ~ r^2 / (2c): r = 1e-4, c = 1e-3 -> 4.98756e-6 (exact sqrt(1.01e-6) - 1e-3)
    assert pseudo_huber(torch.tensor(1e-4, dtype=torch.float64), 1e-3).item() == pytest.approx(
        math.sqrt(1.01e-6) - 1e-3, rel=1e-12)
    assert pseudo_huber(torch.tensor(0.0), 1e-3).item() == 0.0
    with pytest.raises(ValueError, match="x0 loss"):
        tdft_x0_loss(pred, target, "l1")
    with pytest.raises(ValueError, match="c must be > 0"):
        tdft_x0_loss(pred, target, "pseudo_huber", c=0.0)
    assert TDFT_X0_LOSSES == ("pseudo_huber", "l2", "huber")


def test_pseudo_huber_equals_the_authors_expression():
    """G-U-N/Diffusion-NPO Self-NPO/train.py, --loss_type huber: a transcription on the same tensors."""
    g = torch.Generator().manual_seed(0)
    model_pred, target = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    huber_c = 0.001
    theirs = torch.mean(torch.sqrt((model_pred.float() - target.float()) ** 2 + huber_c ** 2) - huber_c)
    ours = tdft_x0_loss(model_pred, target, "pseudo_huber", c=huber_c).mean()
    assert torch.allclose(ours, theirs, rtol=1e-6, atol=0)


def test_solver_grid_and_its_timestep_distribution_hand_computed():
    # the authors' DDIMSolver(timesteps=1000, ddim_timesteps=25): (arange(1, 26) * 40).round() - 1
    assert solver_grid(1000, 25).tolist() == [40 * k - 1 for k in range(1, 26)]
    t_start, t_raw = grid_timesteps(torch.arange(25), 1000, 25, 5)
    t = t_raw.clamp(min=0)
    assert t_start.tolist() == [39, 79, 119, 159, 199] + [40 * k - 1 for k in range(6, 26)]
    # t = max(t' - 200, 0): indices 0..4 reach 0, the others t' - 200 = 39, 79, ..., 799
    assert t.tolist() == [0] * 5 + [40 * k - 1 for k in range(1, 21)]
    assert (t == 0).float().mean().item() == pytest.approx(0.2)  # P(t = 0) = 5/25, the index being uniform
    assert t.max().item() == 799  # t never >= 800
    with pytest.raises(ValueError, match="solver grid"):
        solver_grid(10, 11)


def _authors_solver_loop(teacher, x, index, abar, n=25, K=5, T=1000):
    """A transcription of the rollout loop of G-U-N/Diffusion-NPO Self-NPO/train.py (DDIMSolver with
    ddim_alpha_cumprods_prev, the index / mask_solver / tmp_timesteps bookkeeping), K solver steps."""
    topk = T // n
    ddim_timesteps = torch.from_numpy((np.arange(1, n + 1) * topk).round().astype(np.int64) - 1)
    prev = torch.cat([abar[:1], abar[ddim_timesteps[:-1]]])  # ddim_alpha_cumprods_prev
    tmp_t = ddim_timesteps[index]
    mask = torch.ones(len(index), dtype=torch.float64)
    for _ in range(K):
        eps = teacher(x, tmp_t)
        a, s = abar[tmp_t].sqrt().reshape(-1, 1, 1, 1), (1 - abar[tmp_t]).sqrt().reshape(-1, 1, 1, 1)
        pred_x0 = (x - s * eps) / a
        ap = prev[index].reshape(-1, 1, 1, 1)
        x_new = ap.sqrt() * pred_x0 + (1 - ap).sqrt() * eps
        x = x_new * mask.reshape(-1, 1, 1, 1) + x * (1 - mask).reshape(-1, 1, 1, 1)
        index = index - 1
        mask = torch.where(index < 0, 0.0, mask)
        index = torch.where(index < 0, torch.zeros_like(index), index)
        tmp_t = torch.where(tmp_t - topk < 0, torch.zeros_like(tmp_t), tmp_t - topk)
    return x, tmp_t


def test_grid_rollout_equals_the_authors_solver_loop():
    abar = sd_abar()
    g = torch.Generator().manual_seed(1)
    W = torch.randn(4, 4, generator=g, dtype=torch.float64) * 0.3

    def teacher(x, tt):  # any smooth deterministic eps(x, t)
        return torch.einsum("oc,bchw->bohw", W, x) * (1 + tt.double() / 1000).reshape(-1, 1, 1, 1)

    index = torch.tensor([0, 1, 4, 5, 6, 13, 24])
    x0 = torch.randn(len(index), 4, 2, 2, generator=g, dtype=torch.float64)
    t_start, t_raw = grid_timesteps(index, 1000, 25, 5)
    x_start = abar[t_start].sqrt().reshape(-1, 1, 1, 1) * x0 + (1 - abar[t_start]).sqrt().reshape(-1, 1, 1, 1) * W[0, 0]
    theirs, their_t = _authors_solver_loop(teacher, x_start.clone(), index.clone(), abar)
    ours = truncated_rollout(teacher, x_start, t_start, t_raw, 5, abar)
    assert their_t.tolist() == t_raw.clamp(min=0).tolist()
    assert torch.allclose(ours, theirs, rtol=0, atol=1e-12)


def test_rollout_clamps_below_zero():
    # t' = 39, five steps of 40 towards -161: 39 -> 0, then identity steps at 0
    assert rollout_timesteps(torch.tensor([39]), torch.tensor([-161]), 5)[:, 0].tolist() == [39, 0, 0, 0, 0, 0]
