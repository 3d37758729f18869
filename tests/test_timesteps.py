"""Timestep samplers and weights (core/schedule.py; seed 004 §3.2, METHODS.md)."""
import math

import pytest
import torch

from npo_suite.core.schedule import (TIMESTEP_SAMPLERS, TIMESTEP_WEIGHTS, gamma_bin_edges, gamma_bin_probs,
                                     timesteps_gamma_bins, timesteps_uniform)


def sd_abar(T=1000):
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, T, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0)


def test_registries():
    assert list(TIMESTEP_SAMPLERS) == ["uniform", "gamma_bins"]
    assert list(TIMESTEP_WEIGHTS) == ["none", "snr_reward_scale"]


def test_bin_probs_golden():
    # sum_{k<10} 0.9^k = (1 - 0.9^10) / 0.1 = (1 - 0.3486784401) / 0.1 = 6.513215599
    p = gamma_bin_probs(0.9, 10)
    assert math.isclose(p[0].item(), 1 / 6.513215599, rel_tol=1e-9)  # 0.153534...
    assert math.isclose(p[9].item(), 0.387420489 / 6.513215599, rel_tol=1e-9)  # 0.9^9 / sum
    assert torch.allclose(p[1:] / p[:-1], torch.full((9,), 0.9, dtype=torch.float64))
    assert gamma_bin_edges(1000, 10).tolist() == list(range(0, 1001, 100))
    assert torch.allclose(gamma_bin_probs(1.0, 4), torch.full((4,), 0.25, dtype=torch.float64))


def test_gamma_bins_empirical_frequencies():
    n = 40000
    tt = timesteps_gamma_bins(n, 1000, torch.Generator().manual_seed(0), gamma=0.9, bins=10)
    assert tt.dtype == torch.long and tt.min() >= 0 and tt.max() <= 999
    p = gamma_bin_probs(0.9, 10)
    for k in range(10):  # bin k = 0 is the noisiest: [900, 1000)
        lo, hi = 1000 - 100 * (k + 1), 1000 - 100 * k
        freq = ((tt >= lo) & (tt < hi)).double().mean().item()
        assert abs(freq - p[k].item()) < 0.01, (k, freq, p[k].item())  # sd <= 0.0018: > 5 sigma
    # uniform inside the bin: mean of bin 0 is 949.5 (sd of the mean ~ 29/sqrt(6100) = 0.37)
    top = tt[tt >= 900].double()
    assert abs(top.mean().item() - 949.5) < 2.0
    # reproducible with the same seed
    again = timesteps_gamma_bins(n, 1000, torch.Generator().manual_seed(0), gamma=0.9, bins=10)
    assert torch.equal(tt, again)


def test_uniform():
    tt = timesteps_uniform(40000, 1000, torch.Generator().manual_seed(1))
    assert tt.min() >= 0 and tt.max() <= 999
    assert abs(tt.double().mean().item() - 499.5) < 5  # sd of the mean 289/200 = 1.4
    assert torch.equal(tt, TIMESTEP_SAMPLERS["uniform"](40000, 1000, torch.Generator().manual_seed(1), gamma=0.5))


def test_gamma_bins_odd_sizes():
    tt = timesteps_gamma_bins(5000, 7, torch.Generator().manual_seed(0), gamma=0.5, bins=3)
    assert set(tt.tolist()) <= set(range(7))
    with pytest.raises(ValueError, match="bins"):
        timesteps_gamma_bins(1, 5, None, bins=6)
    with pytest.raises(ValueError, match="gamma"):
        gamma_bin_probs(0.0, 3)


def test_snr_reward_scale_golden():
    # abar = [0.8, 0.5, 0.2]: 1/sqrt(SNR) = sqrt((1-abar)/abar) = [0.5, 1, 2]
    # min-max -> [0, 1/3, 1] -> w = [1, 4/3, 2]
    w = TIMESTEP_WEIGHTS["snr_reward_scale"](torch.tensor([0, 1, 2]), torch.tensor([0.8, 0.5, 0.2], dtype=torch.float64))
    assert torch.allclose(w, torch.tensor([1.0, 4 / 3, 2.0], dtype=torch.float64))
    abar = sd_abar()
    w = TIMESTEP_WEIGHTS["snr_reward_scale"](torch.arange(1000), abar)
    assert w[0].item() == 1.0 and w[999].item() == 2.0
    assert (w[1:] >= w[:-1]).all()
    assert torch.equal(TIMESTEP_WEIGHTS["none"](torch.arange(5), abar), torch.ones(5, dtype=torch.float64))
