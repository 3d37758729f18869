"""Golden values for the guidance combine functions, CFG rescale, interval gating and v-prediction."""
from __future__ import annotations

import math

import pytest
import torch

from npo_suite.core import guidance
from npo_suite.core.guidance import GUIDANCE, MODES, cfg, guide, npo, offset_active, rescale_cfg, snpo
from npo_suite.core.schedule import eps_to_v, eps_to_x0, v_to_eps


def test_combine_golden():
    assert cfg(torch.tensor(2.0), torch.tensor(1.0), 7.5).item() == 8.5  # 1 + 7.5 * (2 - 1)
    pos, neg = torch.tensor([1.0, -2.0]), torch.tensor([3.0, 0.0])
    assert torch.equal(npo(pos, neg, 2.0), torch.tensor([-1.0, -4.0]))  # neg + 2 * (pos - neg)
    omega = 1.0  # the papers' form (omega + 1) * pos - omega * neg with w = omega + 1
    assert torch.equal(npo(pos, neg, omega + 1), (omega + 1) * pos - omega * neg)
    assert torch.equal(snpo(pos, neg, 3.0), cfg(pos, neg, 3.0))
    assert torch.equal(npo(pos, neg, 1.0), pos)  # w = 1: the positive model alone


def test_registry_is_the_only_list():
    assert list(GUIDANCE) == ["cfg", "npo", "snpo"]
    assert set(MODES) == set(GUIDANCE)
    assert MODES["npo"].neg_group == "neg" and MODES["cfg"].neg_group == "pos" and MODES["snpo"].uncond == "null"
    for fn in GUIDANCE.values():  # one-line docstrings citing the source
        assert fn.__doc__ and "\n" not in fn.__doc__.strip() and any(c.isdigit() for c in fn.__doc__)
    with pytest.raises(ValueError, match="unknown guidance mode 'pag'"):
        guide("pag", torch.zeros(1), torch.zeros(1), 1.0)


def test_rescale_golden():
    guided, pos = torch.tensor([[1.0, 3.0]]), torch.tensor([[0.0, 1.0]])
    # std(guided) = sqrt(2), std(pos) = sqrt(0.5) -> rescaled = guided / 2 = [0.5, 1.5]
    out = rescale_cfg(guided, pos, 0.7)
    assert torch.allclose(out, torch.tensor([[0.65, 1.95]]))  # 0.7 * [0.5, 1.5] + 0.3 * [1, 3]
    assert torch.equal(rescale_cfg(guided, pos, 0.0), guided)
    full = rescale_cfg(guided, pos, 1.0)
    assert math.isclose(full.std().item(), pos.std().item(), rel_tol=1e-6)
    with pytest.raises(ValueError, match="phi"):
        rescale_cfg(guided, pos, 1.5)


def test_interval_gating():
    assert offset_active(1.0, 0.5, 2.0)
    assert offset_active(0.5, 0.5, 2.0) and offset_active(2.0, 0.5, 2.0)  # closed interval
    assert not offset_active(0.4, 0.5, None)
    assert not offset_active(3.0, None, 2.0)
    assert offset_active(1e3)
    with pytest.raises(ValueError, match="empty"):
        offset_active(1.0, 2.0, 1.0)


def _state(seed=0):
    g = torch.Generator().manual_seed(seed)
    x_t = torch.randn(2, 4, 3, 3, generator=g)
    abar = torch.tensor([0.3, 0.8]).reshape(2, 1, 1, 1)
    eps_p, eps_n = torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 4, 3, 3, generator=g)
    return x_t, abar, eps_p, eps_n


def test_v_prediction_combines_linearly():
    """Combining raw v and converting equals converting both branches and combining eps."""
    x_t, abar, eps_p, eps_n = _state()
    v_p, v_n = eps_to_v(eps_p, x_t, abar), eps_to_v(eps_n, x_t, abar)
    for mode in GUIDANCE:
        via_v = v_to_eps(guide(mode, v_p, v_n, 5.0, prediction_type="v_prediction"), x_t, abar)
        assert torch.allclose(via_v, guide(mode, eps_p, eps_n, 5.0), atol=1e-5)


@pytest.mark.parametrize("space", guidance.RESCALE_SPACES)
def test_rescale_space_consistent_across_prediction_types(space):
    x_t, abar, eps_p, eps_n = _state(1)
    kw = dict(rescale=0.7, rescale_space=space, x_t=x_t, abar_t=abar)
    from_eps = guide("npo", eps_p, eps_n, 6.0, prediction_type="epsilon", **kw)
    v_out = guide("npo", eps_to_v(eps_p, x_t, abar), eps_to_v(eps_n, x_t, abar), 6.0, prediction_type="v_prediction", **kw)
    assert torch.allclose(v_to_eps(v_out, x_t, abar), from_eps, atol=1e-4)
    # phi = 1 in x0 space: the guided x0 has the positive branch's std, per sample
    if space == "x0":
        out = guide("npo", eps_p, eps_n, 6.0, rescale=1.0, rescale_space="x0", x_t=x_t, abar_t=abar)
        std = eps_to_x0(out, x_t, abar).flatten(1).std(1)
        assert torch.allclose(std, eps_to_x0(eps_p, x_t, abar).flatten(1).std(1), rtol=1e-4)
    # the rescale differs between spaces (not affine), so the space matters
    other = guide("npo", eps_p, eps_n, 6.0, rescale=0.7, rescale_space="eps" if space != "eps" else "x0", x_t=x_t, abar_t=abar)
    assert not torch.allclose(other, from_eps, atol=1e-3)


def test_rescale_needs_state():
    x_t, abar, eps_p, eps_n = _state()
    with pytest.raises(ValueError, match="x_t and abar_t"):
        guide("cfg", eps_p, eps_n, 2.0, rescale=0.5)
    with pytest.raises(ValueError, match="rescale space"):
        guide("cfg", eps_p, eps_n, 2.0, rescale=0.5, rescale_space="sigma", x_t=x_t, abar_t=abar)
