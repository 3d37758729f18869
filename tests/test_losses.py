"""Golden values (computed by hand in the comments), the λ=1 identity, the BDPO bound, gradients."""
import math

import pytest
import torch

import torch.nn.functional as F

from npo_suite.trainer.ddspo import ddspo_margins
from npo_suite.trainer.losses import (LOSSES, SATURATED_LOGIT, bdpo_loss, bdpo_m_mix, ddspo_loss, dpo_loss,
                                      implicit_accuracy, logit_metrics, loss_weight, per_sample_mse)


def t(*v):
    return torch.tensor(v, dtype=torch.float64)


def softplus(x):  # -logsigmoid(x) = log(1 + e^-x)
    return math.log1p(math.exp(-x))


def test_dpo_golden():
    # beta = 100 -> s = beta/2 = 50
    # row 0: m_w = 50*0.10 - 50*0.12 = -1 ; m_l = 50*0.20 - 50*0.18 = 1 ; logit = -(-1 - 1) = 2
    # row 1: m_w = 50*0.30 - 50*0.20 = 5  ; m_l = 50*0.10 - 50*0.20 = -5; logit = -(5 + 5) = -10
    out = dpo_loss(t(0.10, 0.30), t(0.20, 0.10), t(0.12, 0.20), t(0.18, 0.20), beta=100)
    assert torch.allclose(out.logit, t(2.0, -10.0), atol=1e-9)
    # loss = log(1 + e^-2) = 0.126928..., log(1 + e^10) = 10.0000454
    assert torch.allclose(out.per_sample, t(softplus(2.0), softplus(-10.0)), atol=1e-9)
    assert math.isclose(out.per_sample[0].item(), 0.12692801104297263, rel_tol=1e-9)
    assert math.isclose(out.loss.item(), (0.12692801104297263 + 10.000045398899218) / 2, rel_tol=1e-9)
    assert implicit_accuracy(out.logit).item() == 0.5


def test_dpo_weight_scales_logit():
    # w(t) = [2, 0.5] multiplies s: logits 2*2 = 4 and -10*0.5 = -5
    out = dpo_loss(t(0.10, 0.30), t(0.20, 0.10), t(0.12, 0.20), t(0.18, 0.20), beta=100, weight=t(2.0, 0.5))
    assert torch.allclose(out.logit, t(4.0, -5.0), atol=1e-9)


def test_bdpo_golden():
    # beta = 2 -> s = 1, lam = 0.5
    # winner: d_pol = d_ref = 1 -> m_w = 0
    # loser: d_pol = 2, d_ref = 1: m_mix = -log(0.5 e^-2 + 0.5 e^-1) - 1
    #      = -log(0.5*0.135335 + 0.5*0.367879) - 1 = -log(0.251607) - 1 = 1.379885 - 1 = 0.379885
    # logit = -(0 - 0.379885) = 0.379885 ; loss = log(1 + e^-0.379885) = log(1.683939) = 0.521136
    expected_m_mix = -math.log(0.5 * math.exp(-2) + 0.5 * math.exp(-1)) - 1
    assert math.isclose(expected_m_mix, 0.379885, abs_tol=1e-6)
    out = bdpo_loss(t(1.0), t(2.0), t(1.0), t(1.0), beta=2, lam=0.5)
    assert math.isclose(out.logit.item(), expected_m_mix, rel_tol=1e-9)
    assert math.isclose(out.loss.item(), 0.521136, abs_tol=1e-6)


@pytest.mark.parametrize("weight", [None, t(1.0, 2.0, 0.5, 1.7)])
def test_bdpo_lambda_one_is_dpo_exactly(weight):
    g = torch.Generator().manual_seed(0)
    m = [torch.rand(4, generator=g, dtype=torch.float64) * 0.2 for _ in range(4)]
    d = dpo_loss(*m, beta=5000, weight=weight)
    b = bdpo_loss(*m, beta=5000, lam=1.0, weight=weight)
    assert torch.equal(d.logit, b.logit) and torch.equal(d.loss, b.loss)
    # and lambda -> 1 approaches it continuously where d_pol - d_ref is moderate (here |d| < 1: beta = 2)
    near = bdpo_loss(*m, beta=2, lam=1 - 1e-9, weight=weight)
    assert torch.allclose(near.logit, dpo_loss(*m, beta=2, weight=weight).logit, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("lam", [0.5, 0.9, 0.99])
def test_m_mix_bound_random_and_extreme(lam):
    g = torch.Generator().manual_seed(1)
    # d = s * mse with s = 5000/2 and mse up to ~8: d spans 0 .. 2e4, plus a few extreme rows
    d_pol = torch.cat([torch.rand(1000, generator=g) * 2e4, torch.tensor([0.0, 1e4, 0.0, 3e4, 1e-3])])
    d_ref = torch.cat([torch.rand(1000, generator=g) * 2e4, torch.tensor([1e4, 0.0, 0.0, 3e4, 2e4])])
    d_pol.requires_grad_(True)
    m_mix = bdpo_m_mix(d_pol, d_ref, lam)
    assert torch.isfinite(m_mix).all()
    assert (m_mix <= -math.log(1 - lam) + 1e-3).all()  # float32 at 3e4: a few ulps
    m_mix.sum().backward()
    assert torch.isfinite(d_pol.grad).all()
    # the pull on the loser is bounded: the loss with a huge loser error stays >= log(1 + (1-lam))
    out = bdpo_loss(t(0.1), t(100.0), t(0.1), t(0.1), beta=5000, lam=lam)
    assert out.loss.item() >= math.log1p(1 - lam) - 1e-9
    assert dpo_loss(t(0.1), t(100.0), t(0.1), t(0.1), beta=5000).loss.item() < 1e-12  # DPO: unbounded


def test_ddspo_golden():
    # beta = 100 -> s = 50; logit = -50*(0.01 - 0.03) = 1 ; loss = log(1 + e^-1) = 0.3132617
    out = ddspo_loss(t(0.01), t(0.03), beta=100)
    assert math.isclose(out.logit.item(), 1.0, rel_tol=1e-9)
    assert math.isclose(out.loss.item(), 0.31326168751822286, rel_tol=1e-9)


def test_ddspo_linear_weighting_golden():
    # two pairs, beta = 100 (s = 50): logits 1 and -1 ; t = 999 and 333 of T = 1000 -> weights 1 and 1/3
    # loss = mean(log(1 + e^-1) * 1, log(1 + e^1) * 1/3) = (0.3132617 + 1.3132617/3) / 2 = 0.3755178
    t_ = torch.tensor([999, 333])
    w = loss_weight("linear", t_, 1000)
    assert w.tolist() == [1.0, 333 / 999]
    out = ddspo_loss(t(0.01, 0.03), t(0.03, 0.01), beta=100, outer_weight=w)
    assert out.logit.tolist() == pytest.approx([1.0, -1.0])
    assert math.isclose(out.loss.item(), (softplus(1.0) + softplus(-1.0) / 3) / 2, rel_tol=1e-9)
    assert loss_weight("none", t_, 1000) is None
    with pytest.raises(ValueError, match="loss weighting"):
        loss_weight("cosine", t_, 1000)


def test_ddspo_loss_equals_the_authors_dpo_loss_with_linear_weighting():
    """KU-MIIL/DDSPO ddspo/dpo.py `dpo_loss(..., loss_weighting="linear")`, transcribed, on the same tensors:
    model_pred = the policy on [x_w; x_l] under c, ref_pred = the reference on them under c, target =
    [eps_ref(x_w, c); eps_ref(x_l, c⁻)] (TF-CPP)."""
    g = torch.Generator().manual_seed(0)
    B = 4
    pol, ref, neg = (torch.randn(2 * B, 4, 8, 8, generator=g) for _ in range(3))
    target = torch.cat([ref[:B], neg[B:]])
    timesteps = torch.tensor([0, 250, 600, 999]).repeat(2)
    beta = 16000.0 / 1000  # a beta that does not saturate on random tensors

    def theirs(model_pred, ref_pred, target, beta_dpo, timesteps, num_train_timesteps=1000):
        per_dim = list(range(1, model_pred.ndim))
        model_losses = (model_pred.float() - target.float()).pow(2).mean(dim=per_dim)
        model_losses_w, model_losses_l = model_losses.chunk(2)
        ref_losses = (ref_pred.float() - target.float()).pow(2).mean(dim=per_dim)
        ref_losses_w, ref_losses_l = ref_losses.chunk(2)
        inside_term = -0.5 * beta_dpo * ((model_losses_w - model_losses_l) - (ref_losses_w - ref_losses_l))
        weights = timesteps.chunk(2)[0].float() / (num_train_timesteps - 1)
        return (-F.logsigmoid(inside_term) * weights).mean(), inside_term

    their_loss, their_logit = theirs(pol, ref, target, beta, timesteps)
    mg = ddspo_margins(pol[:B], pol[B:], ref[:B], neg[B:], ref[B:])
    ours = ddspo_loss(mg.m_w, mg.m_l, beta=beta, outer_weight=loss_weight("linear", timesteps[:B], 1000))
    assert torch.allclose(ours.logit, their_logit, rtol=1e-5, atol=1e-5)
    assert torch.allclose(ours.loss, their_loss, rtol=1e-5, atol=1e-7)


def test_logit_metrics_golden():
    # |logit| = 0.5, 2, 12, 30 -> mean |logit| 11.125 ; two of four past 10 -> saturated 0.5 ; mean (−0.5+2−12+30)/4
    m = logit_metrics(torch.tensor([-0.5, 2.0, -12.0, 30.0]))
    assert SATURATED_LOGIT == 10.0
    assert m["logit/abs_mean"].item() == pytest.approx(11.125)
    assert m["logit/saturated_frac"].item() == pytest.approx(0.5)
    assert m["logit/mean"].item() == pytest.approx(4.875)


def test_gradients_dpo_golden():
    # d loss / d mse_pol_w = s * sigmoid(-logit) / B ; logit = 2, s = 50, B = 1 -> 50 * 0.1192029 = 5.960146
    m = [t(0.10), t(0.20), t(0.12), t(0.18)]
    for x in m:
        x.requires_grad_(True)
    dpo_loss(*m, beta=100).loss.backward()
    g = 50 / (1 + math.exp(2))
    assert math.isclose(m[0].grad.item(), g, rel_tol=1e-9)
    assert math.isclose(m[1].grad.item(), -g, rel_tol=1e-9)
    assert math.isclose(m[2].grad.item(), -g, rel_tol=1e-9)
    assert math.isclose(m[3].grad.item(), g, rel_tol=1e-9)


def test_half_precision_inputs_are_promoted():
    out = dpo_loss(*(torch.full((2,), v, dtype=torch.float16) for v in (0.1, 0.2, 0.12, 0.18)), beta=5000)
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)


def test_per_sample_mse_and_registry():
    a = torch.zeros(2, 1, 2, 2)
    b = torch.tensor([1.0, 3.0]).reshape(2, 1, 1, 1).expand(2, 1, 2, 2)
    assert torch.equal(per_sample_mse(a, b), torch.tensor([1.0, 9.0]))
    assert set(LOSSES) == {"dpo", "bdpo", "ddspo"}
    with pytest.raises(ValueError, match="lambda"):
        bdpo_m_mix(t(1.0), t(1.0), 0.0)
