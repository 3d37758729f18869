"""core.sampling: DDIM step golden values, the oracle denoiser, per-row grids, the scheduler loop."""
import math

import pytest
import torch

from npo_suite.core.guidance import cfg
from npo_suite.core.sampling import ddim_step, ddim_timesteps, guided_denoiser, sample_ddim, sample_scheduler


def sd_abar(T=1000):
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, T, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0)


def oracle(x0: torch.Tensor, abar: torch.Tensor):
    """eps of a point mass at x0: eps(x, t) = (x - a_t x0) / sigma_t (makes DDIM exact)."""

    def model(x, t):
        a = abar[t].reshape(-1, *[1] * (x.ndim - 1))
        return (x - a.sqrt() * x0) / (1 - a).sqrt()

    return model


def test_ddim_step_golden():
    # x0 = (2 - sqrt(0.36) * 1) / sqrt(0.64) = 1.75 ; x_to = sqrt(0.81) * 1.75 + sqrt(0.19) * 1
    out = ddim_step(torch.tensor(2.0), torch.tensor(1.0), torch.tensor(0.64), torch.tensor(0.81))
    assert out.item() == pytest.approx(0.9 * 1.75 + math.sqrt(0.19))
    # to abar = 1: the clean estimate itself
    assert ddim_step(torch.tensor(2.0), torch.tensor(1.0), torch.tensor(0.64), torch.tensor(1.0)).item() == pytest.approx(1.75)


def test_ddim_timesteps_grid():
    assert ddim_timesteps(1000, 4).tolist() == [999, 666, 333, 0]
    assert ddim_timesteps(1000, 1).tolist() == [999]
    with pytest.raises(ValueError, match="steps >= 1"):
        ddim_timesteps(1000, 0)


def test_sample_ddim_to_clean_recovers_x0_with_the_oracle():
    abar = sd_abar()
    g = torch.Generator().manual_seed(0)
    x0, z = torch.randn(2, 3, 2, 2, generator=g, dtype=torch.float64), torch.randn(2, 3, 2, 2, generator=g, dtype=torch.float64)
    x_T = abar[999].sqrt() * x0 + (1 - abar[999]).sqrt() * z
    out = sample_ddim(oracle(x0, abar), x_T, ddim_timesteps(1000, 5), abar, to_clean=True)
    assert torch.allclose(out, x0, atol=1e-8)
    # without to_clean the loop stops at grid[-1] = 0: x = a_0 x0 + sigma_0 z
    out0 = sample_ddim(oracle(x0, abar), x_T, ddim_timesteps(1000, 5), abar)
    assert torch.allclose(out0, abar[0].sqrt() * x0 + (1 - abar[0]).sqrt() * z, atol=1e-8)


def test_sample_ddim_per_row_grid_and_identity_rows():
    abar = sd_abar()
    x = torch.randn(2, 1, 2, 2, dtype=torch.float64)
    grid = torch.tensor([[500, 400], [300, 400], [100, 400]])  # row 1 repeats its timestep: identity
    calls = []

    def model(x_, t):
        calls.append(t.tolist())
        return torch.ones_like(x_)

    out = sample_ddim(model, x, grid, abar)
    assert calls == [[500, 400], [300, 400]]
    assert torch.allclose(out[1], x[1], atol=1e-12)
    assert not torch.allclose(out[0], x[0])


def test_sample_scheduler_ddim_matches_sample_ddim_on_the_same_grid():
    """diffusers' DDIMScheduler (eta 0, set_alpha_to_one) is the same update on its own timesteps."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, set_alpha_to_one=True,
                          clip_sample=False)
    sched.set_timesteps(4)
    abar = torch.as_tensor(sched.alphas_cumprod, dtype=torch.float64)
    x0 = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x_T = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    steps = []
    a = sample_scheduler(oracle(x0, abar), x_T, sched, progress=steps.append)
    b = sample_ddim(oracle(x0, abar), x_T, sched.timesteps.clone(), abar, to_clean=True)
    assert steps == [1, 1, 1, 1]
    assert torch.allclose(a, b, atol=1e-6)


def test_guided_denoiser_wraps_the_two_branches():
    x, t = torch.zeros(1, 1), torch.zeros(1, dtype=torch.long)
    model = guided_denoiser(lambda x_, t_: x_ + 3.0, lambda x_, t_: x_ + 1.0, cfg, 2.0)
    assert model(x, t).item() == pytest.approx(1.0 + 2.0 * (3.0 - 1.0))
