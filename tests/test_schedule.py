import math

import torch

from npo_suite.core import schedule


def test_v_eps_roundtrip_and_golden():
    abar = torch.tensor([0.25]).reshape(1, 1, 1, 1)
    x_t = torch.tensor([2.0]).reshape(1, 1, 1, 1)
    v = torch.tensor([1.0]).reshape(1, 1, 1, 1)
    # eps = sqrt(.25)*1 + sqrt(.75)*2
    eps = schedule.v_to_eps(v, x_t, abar)
    assert math.isclose(eps.item(), 0.5 + math.sqrt(0.75) * 2, rel_tol=1e-6)
    assert torch.allclose(schedule.eps_to_v(eps, x_t, abar), v)
    # x0 from eps: (2 - sqrt(.75)*eps)/0.5
    x0 = schedule.eps_to_x0(eps, x_t, abar)
    assert torch.allclose(schedule.add_noise(x0, eps, abar), x_t)


def test_to_eps_rejects_unknown():
    import pytest

    with pytest.raises(ValueError, match="sample"):
        schedule.to_eps(torch.zeros(1), torch.zeros(1), torch.ones(1), "sample")
