"""Self-NPO TDFT math (seed 002 eq. 12–17)."""
import math

import pytest
import torch

from npo_suite.trainer.tdft import (TDFT_TEACHERS, renoise, rollout_timesteps, truncated_rollout, tweedie_x0,
                                    x0_distance)


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


def test_x0_distance_golden():
    pred, target = torch.zeros(1, 2), torch.tensor([[1.0, 3.0]])
    assert x0_distance(pred, target, "l2").item() == pytest.approx((1 + 9) / 2)  # 5
    # huber(delta=1): |1| -> 0.5*1^2 = 0.5 ; |3| -> 1*(3 - 0.5) = 2.5 ; mean 1.5
    assert x0_distance(pred, target, "huber").item() == pytest.approx(1.5)
    with pytest.raises(ValueError, match="x0 loss"):
        x0_distance(pred, target, "l1")
    assert set(TDFT_TEACHERS) == {"uncond", "low_cfg", "few_steps"}
