"""Rectified flow in the loss layer (issue 22, deliverable 1): core/flow.py, the existing losses on flow
errors, TDFT on flow (trainer/flow_tdft.py, our extension). Golden values are computed by hand in the
comments; the public code the cross-checks transcribe is cited at each test."""
import math

import pytest
import torch
import torch.nn.functional as F

from npo_suite.core.flow import (FLOW_T_SAMPLERS, diffusers_index_t, dynamic_shift, error_weight, eps_to_v,
                                 euler_step, flow_mse, interpolate, noise_pair, per_sample_mse, precondition_x0,
                                 renoise, sample_euler, sample_t, sample_u, shift_t, to_model_timestep, unshift_t,
                                 v_to_eps, v_to_x0, velocity_target, x0_eps_from_v, x0_to_v)
from npo_suite.trainer.ddspo import ddspo_margins
from npo_suite.trainer.flow_tdft import (draw_s, flow_grid_timesteps, flow_tdft_loss, flow_tdft_start,
                                         flow_tdft_target, rollout_grid)
from npo_suite.trainer.losses import bdpo_loss, ddspo_loss, dpo_loss


def d(*rows):
    """float64 latents [B, 1, 1, n] from rows of numbers."""
    return torch.tensor(rows, dtype=torch.float64).reshape(len(rows), 1, 1, -1)


def v64(*x):
    return torch.tensor(x, dtype=torch.float64)


def softplus(x):  # −logσ(x) = log(1 + e^−x)
    return math.log1p(math.exp(-x))


# ---------------------------------------------------------------- interpolation, target, conversions

def test_interpolation_target_and_conversions_golden():
    # row 0: x0 = [1, −2], ε = [3, 0.5], t = 0.25: x_t = 0.75·x0 + 0.25·ε = [0.75 + 0.75, −1.5 + 0.125] = [1.5, −1.375]
    #        v = ε − x0 = [2, 2.5]
    # row 1: x0 = [0, 4],  ε = [−1, 2], t = 0.5:  x_t = [−0.5, 3], v = [−1, −2]
    x0, eps, t = d([1, -2], [0, 4]), d([3, 0.5], [-1, 2]), v64(0.25, 0.5)
    x_t = interpolate(x0, eps, t)
    assert torch.equal(x_t, d([1.5, -1.375], [-0.5, 3.0]))
    v = velocity_target(x0, eps)
    assert torch.equal(v, d([2, 2.5], [-1, -2]))
    # x0 = x_t − t·v: [1.5 − 0.5, −1.375 − 0.625] = [1, −2];  ε = x_t + (1 − t)·v: [1.5 + 1.5, −1.375 + 1.875] = [3, 0.5]
    assert torch.equal(v_to_x0(v, x_t, t), x0)
    assert torch.equal(v_to_eps(v, x_t, t), eps)
    assert torch.equal(torch.stack(x0_eps_from_v(v, x_t, t)), torch.stack([x0, eps]))
    # v = (x_t − x0)/t = [0.5, 0.625]/0.25 = [2, 2.5];  v = (ε − x_t)/(1 − t) = [1.5, 1.875]/0.75 = [2, 2.5]
    assert torch.allclose(x0_to_v(x0, x_t, t), v, atol=1e-15)
    assert torch.allclose(eps_to_v(eps, x_t, t), v, atol=1e-15)
    # DDSPO's SD3 precondition_outputs: pred·(−σ) + x_t with σ = t is the x0 form of the velocity
    assert torch.equal(precondition_x0(v, x_t, t), v_to_x0(v, x_t, t))
    # the endpoints: t = 0 is the data, t = 1 pure noise
    assert torch.equal(interpolate(x0, eps, 0.0), x0) and torch.equal(interpolate(x0, eps, 1.0), eps)


def test_error_forms_are_t_weighted_v_errors():
    # at fixed (x_t, t): x0 − x0_θ = −t·(v − v_θ), ε − ε_θ = (1 − t)·(v − v_θ); so mse_x0 = t²·mse_v, mse_ε = (1 − t)²·mse_v
    # row 0: t = 0.25, v_θ − v = [1, −1] -> mse_v = 1, mse_x0 = 0.0625, mse_ε = 0.5625
    x0, eps, t = d([1, -2], [0, 4]), d([3, 0.5], [-1, 2]), v64(0.25, 0.5)
    x_t, v = interpolate(x0, eps, t), velocity_target(x0, eps)
    pred = v + d([1, -1], [2, 0])  # row 1: [2, 0] -> mse_v = 2, mse_x0 = 0.25·2 = 0.5, mse_ε = 0.5
    mse_v = flow_mse(pred, x0, eps, x_t, t, "v")
    assert torch.allclose(mse_v, v64(1.0, 2.0), atol=1e-15)
    assert torch.allclose(flow_mse(pred, x0, eps, x_t, t, "x0"), v64(0.0625, 0.5), atol=1e-15)
    assert torch.allclose(per_sample_mse(v_to_eps(pred, x_t, t), eps), v64(0.5625, 0.5), atol=1e-15)
    assert torch.allclose(flow_mse(pred, x0, eps, x_t, t, "eps"), v64(0.5625, 0.5), atol=1e-15)
    assert torch.equal(error_weight("x0", t), t * t) and torch.equal(error_weight("v", t), torch.ones(2, dtype=t.dtype))
    assert torch.equal(error_weight("eps", t), (1 - t) ** 2)
    with pytest.raises(ValueError, match="flow error form"):
        flow_mse(pred, x0, eps, x_t, t, "x")


def test_per_sample_mse_is_the_mean_over_latent_elements():
    # [[3, 4], [0, 0]] vs 0 with a [B, 1, 1, 2] shape: means (9 + 16)/2 = 12.5 and 0; half precision is upcast
    a = torch.tensor([[3.0, 4.0], [0.0, 0.0]]).reshape(2, 1, 1, 2)
    assert per_sample_mse(a, torch.zeros_like(a)).tolist() == [12.5, 0.0]
    assert per_sample_mse(a.half(), torch.zeros_like(a).half()).dtype == torch.float32


# ---------------------------------------------------------------- timesteps

def test_shift_golden_and_inverse():
    # shift 3: t' = 3t/(1 + 2t): t = 0.5 -> 1.5/2 = 0.75; t = 0.25 -> 0.75/1.5 = 0.5; endpoints fixed
    t = v64(0.0, 0.25, 0.5, 1.0)
    assert torch.allclose(shift_t(t, 3.0), v64(0.0, 0.5, 0.75, 1.0), atol=1e-15)
    # inverse t = t'/(3 − 2t'): 0.75/(3 − 1.5) = 0.5
    assert torch.allclose(unshift_t(shift_t(t, 3.0), 3.0), t, atol=1e-15)
    assert torch.equal(shift_t(t, 1.0), t)
    # Flux's dynamic shift: μ = 0.5 at 256 tokens, 1.15 at 4096 -> shift e^0.5 = 1.6487213, e^1.15 = 3.1581929
    assert dynamic_shift(256) == pytest.approx(1.6487212707, rel=1e-9)
    assert dynamic_shift(4096) == pytest.approx(3.1581929097, rel=1e-9)
    assert to_model_timestep(v64(0.75)).item() == 750.0
    with pytest.raises(ValueError, match="shift"):
        shift_t(t, 0.0)


def test_shift_and_index_mapping_match_diffusers_scheduler():
    """FlowMatchEulerDiscreteScheduler (diffusers) with SD3's shift 3: its training tables are
    sigmas[i] = shift((N − i)/N) and timesteps = sigmas·N; the scripts index them with int(u·N)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    sch = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    i = torch.arange(1000)
    u = (i.double() + 0.5) / 1000  # the middle of index i's cell
    ours = diffusers_index_t(u, 1000, 3.0)
    # both float32 tables against our float64: |Δ| within a float32 ulp of values ≤ 1
    assert torch.allclose(ours, sch.sigmas[:1000].double(), rtol=0, atol=2e-7)
    # timesteps = float32 sigmas·1000: the 2e-7 above times 1000, plus half a float32 ulp of 1000 (3.1e-5)
    assert torch.allclose(to_model_timestep(ours), sch.timesteps.double(), rtol=0, atol=2e-4 + 3.1e-5)
    # the table is descending: small u is the noisy end (u ~ 0 -> t = 1), so diffusers' logit_mean is our −m
    assert diffusers_index_t(v64(0.0)).item() == 1.0 and diffusers_index_t(v64(0.9999)).item() == pytest.approx(0.001)


def test_samplers_draw_diffusers_streams():
    """diffusers.training_utils.compute_density_for_timestep_sampling on the same generator state."""
    from diffusers.training_utils import compute_density_for_timestep_sampling as theirs

    for scheme in FLOW_T_SAMPLERS:
        g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
        ref = theirs(weighting_scheme=scheme, batch_size=64, logit_mean=0.3, logit_std=1.2, mode_scale=1.29,
                     generator=g1)
        ours = sample_u(64, scheme, g2, logit_mean=0.3, logit_std=1.2, mode_scale=1.29)
        # same float32 draws; theirs finishes in float32, ours in float64: |Δ| ≤ a float32 ulp of u ≤ 1
        assert torch.allclose(ours, ref.double(), rtol=0, atol=2e-7), scheme
    with pytest.raises(ValueError, match="flow timestep sampler"):
        sample_u(4, "cosmap")


@pytest.mark.parametrize("m,s", [(0.0, 1.0), (-0.5, 0.7)])
def test_logit_normal_statistics(m, s):
    # logit(u) = m + s·z, z ~ N(0, 1), n = 40000 draws. Standard errors: mean s/√n, std ≈ s/√(2n)
    # (normal data): at n = 40000, s = 1: 0.005 and 0.0035. We bound both at 5 standard errors.
    n = 40000
    u = sample_u(n, "logit_normal", torch.Generator().manual_seed(0), logit_mean=m, logit_std=s)
    assert bool(((u > 0) & (u < 1)).all())
    z = torch.logit(u)
    assert abs(z.mean().item() - m) < 5 * s / math.sqrt(n)
    assert abs(z.std().item() - s) < 5 * s / math.sqrt(2 * n)
    if m == 0.0:
        # E[sigmoid(z)] = 0.5 by symmetry; sd(sigmoid(z)) < 0.25, so 5 standard errors < 5·0.25/√n
        assert abs(u.mean().item() - 0.5) < 5 * 0.25 / math.sqrt(n)


def test_uniform_and_mode_samplers_and_shifted_t():
    g = torch.Generator().manual_seed(1)
    n = 40000
    u = sample_u(n, "uniform", g)
    # U[0, 1): mean 1/2, sd 1/√12 = 0.2887; 5 standard errors = 5·0.2887/√n = 0.0072
    assert abs(u.mean().item() - 0.5) < 5 * 0.2887 / math.sqrt(n)
    # mode with c = 0 is 1 − r (uniform again); the formula's endpoints: r = 0 -> 1, r = 1 -> 0 for any c
    r = v64(0.0, 1.0)
    assert torch.allclose(1 - r - 1.29 * (torch.cos(math.pi * r / 2) ** 2 - 1 + r), v64(1.0, 0.0), atol=1e-15)
    um = sample_u(n, "mode", g, mode_scale=1.29)
    assert bool(((um >= 0) & (um <= 1)).all())
    # sample_t = shift(u) on the same stream
    t = sample_t(8, "logit_normal", torch.Generator().manual_seed(3), shift=3.0)
    assert torch.allclose(t, shift_t(sample_u(8, "logit_normal", torch.Generator().manual_seed(3)), 3.0), atol=0)


# ---------------------------------------------------------------- a pair shares t and ε

def test_noise_pair_shares_t_and_eps_in_rng_order():
    x0_w, x0_l = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    p = noise_pair(x0_w, x0_l, torch.Generator().manual_seed(5), shift=3.0)
    g = torch.Generator().manual_seed(5)  # timesteps first, then noise (trainer/methods.py RNG order)
    t = sample_t(3, "logit_normal", g, shift=3.0).float()
    eps = torch.randn(3, 4, 2, 2, generator=g)
    assert torch.equal(p.t, t) and torch.equal(p.eps, eps)
    assert torch.equal(p.x_t_w, interpolate(x0_w, eps, t)) and torch.equal(p.x_t_l, interpolate(x0_l, eps, t))
    assert torch.equal(p.v_w, eps - x0_w) and torch.equal(p.v_l, eps - x0_l)
    # one ε, one t: x_t_w − x_t_l = (1 − t)·(x0_w − x0_l), v_w − v_l = x0_l − x0_w
    tb = t.reshape(-1, 1, 1, 1)
    assert torch.allclose(p.x_t_w - p.x_t_l, (1 - tb) * (x0_w - x0_l), atol=1e-6)
    with pytest.raises(ValueError, match="differ in shape"):
        noise_pair(x0_w, x0_l[:, :2])


# ---------------------------------------------------------------- Euler

def test_euler_one_step_from_noise_is_exact_on_a_single_pair():
    # rectified flow on one (x0, ε): the velocity along the path is constant v = ε − x0, so one Euler step
    # from t = 1 (x = ε) to 0 gives ε + (0 − 1)(ε − x0) = x0 exactly (here in exact binary fractions)
    x0, eps = d([0.5, -1.25]), d([2.0, 0.75])
    v = velocity_target(x0, eps)
    assert torch.equal(euler_step(eps, v, 1.0, 0.0), x0)
    assert torch.equal(sample_euler(lambda x, t: v, eps, v64(1.0, 0.0)), x0)


def test_euler_is_exact_on_the_single_point_field_for_any_grid():
    # the exact velocity when the data is one point x0*: v(x, t) = (x − x0*)/t. Its ODE solution from x(1) = ε is
    # the straight line x(t) = x0* + t·(ε − x0*), linear in t, so every Euler step is exact: any grid ends at x0*
    x0s, eps = d([0.3, -0.7, 1.1]), d([-1.0, 0.4, 2.0])
    field = lambda x, t: (x - x0s) / t.reshape(-1, 1, 1, 1)  # noqa: E731
    for ts in (v64(1.0, 0.0), v64(1.0, 0.6, 0.35, 0.1, 0.0), torch.linspace(1, 0, 28, dtype=torch.float64)):
        assert torch.allclose(sample_euler(field, eps, ts), x0s, atol=1e-12)
    # and an intermediate point: x(0.4) = x0* + 0.4·(ε − x0*)
    assert torch.allclose(sample_euler(field, eps, v64(1.0, 0.7, 0.4)), x0s + 0.4 * (eps - x0s), atol=1e-12)


def test_euler_step_is_diffusers_flow_match_euler_step():
    from diffusers import FlowMatchEulerDiscreteScheduler

    sch = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    sch.set_timesteps(4)
    x, v = torch.randn(1, 4, 3, 3, generator=torch.Generator().manual_seed(0)), torch.randn(1, 4, 3, 3)
    theirs = sch.step(v, sch.timesteps[0], x).prev_sample
    ours = euler_step(x, v, sch.sigmas[0], sch.sigmas[1])
    assert torch.allclose(ours, theirs, atol=1e-6)


# ---------------------------------------------------------------- the losses on flow errors

# One pair (B = 1, two latent elements), t = 0.5, ε = [1, 1]:
#   x0_w = [1, 0] -> v_w = [0, 1];   x0_l = [0, 1] -> v_l = [1, 0]
#   policy:    v_θ(x_w) = [0.2, 1.0]  err [0.2, 0]   mse = 0.04/2 = 0.02
#              v_θ(x_l) = [1.0, 0.4]  err [0, 0.4]   mse = 0.16/2 = 0.08
#   reference: v_ref(x_w) = [0, 0.6]  err [0, −0.4]  mse = 0.08
#              v_ref(x_l) = [0.8, 0]  err [−0.2, 0]  mse = 0.02
X0_W, X0_L, EPS, T = d([1, 0]), d([0, 1]), d([1, 1]), v64(0.5)
POL_W, POL_L, REF_W, REF_L = d([0.2, 1.0]), d([1.0, 0.4]), d([0.0, 0.6]), d([0.8, 0.0])


def _flow_errors(form="v", swap=False):
    x0_w, x0_l = (X0_L, X0_W) if swap else (X0_W, X0_L)
    pw, pl, rw, rl = (POL_L, POL_W, REF_L, REF_W) if swap else (POL_W, POL_L, REF_W, REF_L)
    x_w, x_l = interpolate(x0_w, EPS, T), interpolate(x0_l, EPS, T)
    return (flow_mse(pw, x0_w, EPS, x_w, T, form), flow_mse(pl, x0_l, EPS, x_l, T, form),
            flow_mse(rw, x0_w, EPS, x_w, T, form), flow_mse(rl, x0_l, EPS, x_l, T, form))


def test_flow_errors_golden():
    assert torch.allclose(torch.cat(_flow_errors()), v64(0.02, 0.08, 0.08, 0.02), atol=1e-15)
    # x0 form: t² = 0.25 times each
    assert torch.allclose(torch.cat(_flow_errors("x0")), v64(0.005, 0.02, 0.02, 0.005), atol=1e-15)


def test_dpo_and_npo_on_flow_errors_golden():
    # β = 100, s = 50: m_w = 50·(0.02 − 0.08) = −3, m_l = 50·(0.08 − 0.02) = 3, logit = −(−3 − 3) = 6
    out = dpo_loss(*_flow_errors(), beta=100)
    assert out.logit.item() == pytest.approx(6.0, abs=1e-12)
    assert out.loss.item() == pytest.approx(softplus(6.0), rel=1e-12)  # log(1 + e^−6) = 0.00247569
    assert out.loss.item() == pytest.approx(0.0024756851377, rel=1e-9)
    # NPO: the pair swapped: m_w = 3, m_l = −3, logit = −6, loss = log(1 + e^6) = 6.00247569
    npo = dpo_loss(*_flow_errors(swap=True), beta=100)
    assert npo.logit.item() == pytest.approx(-6.0, abs=1e-12)
    assert npo.loss.item() == pytest.approx(6.0024756851377, rel=1e-9)


def test_x0_form_is_dpo_with_weight_t_squared():
    # x0 errors are t²·v errors, so the x0-form logit is 6·0.25 = 1.5, = the v form with w(t) = t²
    out = dpo_loss(*_flow_errors("x0"), beta=100)
    assert out.logit.item() == pytest.approx(1.5, abs=1e-12)
    assert torch.allclose(out.logit, dpo_loss(*_flow_errors("v"), beta=100, weight=error_weight("x0", T)).logit,
                          atol=1e-12)


def test_bdpo_snpo_and_naive_on_flow_errors_golden():
    # BDPO λ = 0.9: loser d_θ = 50·0.08 = 4, d_ref = 50·0.02 = 1
    #   m_mix = −log(0.9·e^−4 + 0.1·e^−1) − 1 = −log(0.0164841 + 0.0367879) − 1 = 2.9323441 − 1 = 1.9323441 (≤ −log 0.1)
    #   logit = −(m_w − m_mix) = −(−3 − 1.9323441) = 4.9323441
    out = bdpo_loss(*_flow_errors(), beta=100, lam=0.9)
    assert out.logit.item() == pytest.approx(4.9323440553, abs=1e-9)
    assert out.loss.item() == pytest.approx(softplus(4.9323440553), rel=1e-9)
    # SNPO: the row routed to the null branch trains the pair swapped with the BDPO bound. With the null-branch
    # predictions equal to the ones above (a one-row check of the loss, not of the routing):
    #   winner := x_l: m_w = 50·(0.08 − 0.02) = 3; loser := x_w: d_θ = 50·0.02 = 1, d_ref = 50·0.08 = 4
    #   m_mix = −log(0.9·e^−1 + 0.1·e^−4) − 4 = −log(0.3310915 + 0.0018316) − 4 = 1.0998439 − 4 = −2.9001561
    #   logit = −(3 − (−2.9001561)) = −5.9001561
    snpo = bdpo_loss(*_flow_errors(swap=True), beta=100, lam=0.9)
    assert snpo.logit.item() == pytest.approx(-5.9001561361, abs=1e-9)
    # SNPO-naive (λ = 1): the plain DPO logit on the swapped pair, −6
    naive = bdpo_loss(*_flow_errors(swap=True), beta=100, lam=1.0)
    assert naive.logit.item() == pytest.approx(-6.0, abs=1e-12)
    assert torch.equal(naive.logit, dpo_loss(*_flow_errors(swap=True), beta=100).logit)


def test_snpo_routing_on_flow_rows():
    # two rows as trainer/methods.py PairMethod.compute routes them: row 0 conditional (labelled pair),
    # row 1 null (pair swapped, flip = True); the per-row errors then go through bdpo_loss unchanged
    x0_w, x0_l = torch.cat([X0_W, X0_W]), torch.cat([X0_L, X0_L])
    flip = torch.tensor([False, True]).reshape(-1, 1, 1, 1)
    win, lose = torch.where(flip, x0_l, x0_w), torch.where(flip, x0_w, x0_l)
    t, eps = v64(0.5, 0.5), torch.cat([EPS, EPS])

    def routed(a_w, a_l):  # the same per-row flip applied to the predictions
        a_w, a_l = torch.cat([a_w, a_w]), torch.cat([a_l, a_l])
        return torch.where(flip, a_l, a_w), torch.where(flip, a_w, a_l)

    (pw, pl), (rw, rl) = routed(POL_W, POL_L), routed(REF_W, REF_L)
    xw, xl = interpolate(win, eps, t), interpolate(lose, eps, t)
    errs = [flow_mse(pw, win, eps, xw, t), flow_mse(pl, lose, eps, xl, t), flow_mse(rw, win, eps, xw, t),
            flow_mse(rl, lose, eps, xl, t)]
    out = bdpo_loss(*errs, beta=100, lam=0.9)
    assert torch.allclose(out.logit, v64(4.9323440553, -5.9001561361), atol=1e-9)  # the two goldens above


def test_ddspo_on_flow_golden():
    # targets from the reference: v_w* = v_ref(x_w, c) = [0, 0.6], v_l* = v_ref(x_l, c⁻) = [1, 1]
    #   m_w = mse(v_w*, v_θ(x_w)) = mse([0, 0.6], [0.2, 1.0]) = (0.04 + 0.16)/2 = 0.10
    #   mse(v_l*, v_θ(x_l)) = mse([1, 1], [1.0, 0.4]) = 0.36/2 = 0.18
    #   mse(v_l*, v_ref(x_l, c)) = mse([1, 1], [0.8, 0]) = (0.04 + 1)/2 = 0.52;  m_l = 0.18 − 0.52 = −0.34
    #   β = 10: logit = −5·(0.10 + 0.34) = −2.2, loss = log(1 + e^2.2) = 2.3050833
    mg = ddspo_margins(POL_W, POL_L, REF_W, d([1.0, 1.0]), REF_L)
    assert mg.m_w.item() == pytest.approx(0.10, abs=1e-15) and mg.m_l.item() == pytest.approx(-0.34, abs=1e-15)
    out = ddspo_loss(mg.m_w, mg.m_l, beta=10)
    assert out.logit.item() == pytest.approx(-2.2, abs=1e-12)
    assert out.loss.item() == pytest.approx(2.3050833198, rel=1e-9)


# ---------------------------------------------------------------- cross-checks against the public code

def _ku_miil_dpo_loss(model_pred, ref_pred, target, beta_dpo, cast=lambda x: x.float()):
    """KU-MIIL/DDSPO `ddspo/dpo.py` `dpo_loss` (commit 9d8c5bc24647ad5f78a57474115ae0432ae6b3fb), its
    lines transcribed (loss_weighting None); `cast` is their `.float()` (identity for the float64 variant)."""
    per_dim = list(range(1, model_pred.ndim))
    model_losses = (cast(model_pred) - cast(target)).pow(2).mean(dim=per_dim)
    model_losses_w, model_losses_l = model_losses.chunk(2)
    model_diff = model_losses_w - model_losses_l
    ref_losses = (cast(ref_pred) - cast(target)).pow(2).mean(dim=per_dim)
    ref_losses_w, ref_losses_l = ref_losses.chunk(2)
    ref_diff = ref_losses_w - ref_losses_l
    inside_term = -0.5 * beta_dpo * (model_diff - ref_diff)
    loss = -F.logsigmoid(inside_term).mean()
    return loss, inside_term, model_losses, ref_losses


def _flow_batch(dtype, B=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(2 * B, 4, 8, 8, generator=g, dtype=dtype)  # [x_w; x_l]
    eps = torch.randn(B, 4, 8, 8, generator=g, dtype=dtype).repeat(2, 1, 1, 1)  # one ε per pair
    t = torch.sigmoid(torch.randn(B, generator=g, dtype=dtype)).repeat(2)  # one t per pair
    x_t = interpolate(x0, eps, t)
    v = velocity_target(x0, eps)
    pol = v + 0.3 * torch.randn(2 * B, 4, 8, 8, generator=g, dtype=dtype)
    ref = v + 0.3 * torch.randn(2 * B, 4, 8, 8, generator=g, dtype=dtype)
    neg = v + 0.5 * torch.randn(2 * B, 4, 8, 8, generator=g, dtype=dtype)  # the reference under c⁻
    return x0, eps, t, x_t, v, pol, ref, neg


def _tol(beta, mses):
    """|Δlogit| bound for float32. Both sides do the same ops on the same float32 tensors except the order:
    ours reduces with flatten(1).mean(1) and scales each mse by β/2 before subtracting, theirs reduces with
    mean(dim=[1, 2, 3]) and scales the difference (and the x0 form rounds x_t − t·v vs v·(−t) + x_t). Each
    mse entering the logit may thus differ by a few ulps; we allow 16 ulps (ε = 1.19e-7) of each, times
    β/2. Observed on these tensors: ≤ 3.3e-7 (≈ 4 ulps of |logit| ≤ 0.84), 30× inside the bound."""
    return (beta / 2) * 16 * torch.finfo(torch.float32).eps * sum(m.abs().max().item() for m in mses)


@pytest.mark.parametrize("form", ["v", "x0"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dpo_on_flow_equals_ku_miil_dpo_py(form, dtype):
    """Diffusion-DPO on flow, as KU-MIIL/DDSPO runs it for SANA (`adapters/sana.py`: target = noise −
    model_input) and SD3 (`adapters/sd3.py` with precondition_outputs: pred·(−σ) + x_t against x0)."""
    B, beta = 4, 50.0
    x0, eps, t, x_t, v, pol, ref, _ = _flow_batch(dtype, B)
    if form == "v":
        model_pred, ref_pred, target = pol, ref, v
    else:
        model_pred, ref_pred, target = precondition_x0(pol, x_t, t), precondition_x0(ref, x_t, t), x0
    cast = (lambda x: x.float()) if dtype == torch.float32 else (lambda x: x)
    their_loss, their_logit, _, _ = _ku_miil_dpo_loss(model_pred, ref_pred, target, beta, cast)
    m_pol = flow_mse(pol, x0, eps, x_t, t, form)
    m_ref = flow_mse(ref, x0, eps, x_t, t, form)
    ours = dpo_loss(m_pol[:B], m_pol[B:], m_ref[:B], m_ref[B:], beta=beta)
    if dtype == torch.float64:  # float64 throughout: agreement to rounding of values ~β·mse ~ 1e2
        assert torch.allclose(ours.logit, their_logit, rtol=0, atol=1e-10)
        assert torch.allclose(ours.loss, their_loss, rtol=1e-12, atol=0)
    else:
        # x0 form: ours computes x_t − t·v, theirs v·(−t) + x_t: equal in exact arithmetic, 1-ulp apart in float32
        tol = _tol(beta, [m_pol, m_ref])
        assert torch.allclose(ours.logit, their_logit, rtol=0, atol=tol), (ours.logit - their_logit).abs().max()
        assert torch.allclose(ours.loss, their_loss, rtol=0, atol=tol)


@pytest.mark.parametrize("form", ["v", "x0"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ddspo_on_flow_equals_ku_miil_dpo_py(form, dtype):
    """DDSPO on flow: KU-MIIL's TF-CPP rows replace the target by the reference's prediction under c (winner)
    and c⁻ (loser) — `adapters/sana.py` `target[final_indices] = ref_pos_neg` (v form), `adapters/sd3.py` the
    same preconditioned to x0 — and feed `dpo.py` with model_pred = policy under c, ref_pred = reference under c."""
    B, beta = 4, 50.0
    x0, eps, t, x_t, v, pol, ref, neg = _flow_batch(dtype, B, seed=1)
    pre = (lambda p: p) if form == "v" else (lambda p: precondition_x0(p, x_t, t))
    target = torch.cat([pre(ref)[:B], pre(neg)[B:]])  # [v_ref(x_w, c); v_ref(x_l, c⁻)] (or their x0 forms)
    cast = (lambda x: x.float()) if dtype == torch.float32 else (lambda x: x)
    their_loss, their_logit, _, _ = _ku_miil_dpo_loss(pre(pol), pre(ref), target, beta, cast)
    p, r, n = pre(pol), pre(ref), pre(neg)
    mg = ddspo_margins(p[:B], p[B:], r[:B], n[B:], r[B:])
    ours = ddspo_loss(mg.m_w, mg.m_l, beta=beta)
    if dtype == torch.float64:
        assert torch.allclose(ours.logit, their_logit, rtol=0, atol=1e-10)
        assert torch.allclose(ours.loss, their_loss, rtol=1e-12, atol=0)
    else:
        tol = _tol(beta, [mg.m_w, mg.mse_pol_l, mg.mse_ref_l])
        assert torch.allclose(ours.logit, their_logit, rtol=0, atol=tol), (ours.logit - their_logit).abs().max()
        assert torch.allclose(ours.loss, their_loss, rtol=0, atol=tol)


def test_flow_grpo_dpo_is_ours():
    """yifan123/flow_grpo `scripts/train_sd3_dpo.py` (read at yifan123/flow_grpo_refactor
    7be03dc3dad4d3a98b9b82c7000b9731f873ce51): theta_mse = mean over the latent of (pred − (noise − x0))²,
    inside_term = −0.5·β·((θ_w − ref_w) − (θ_l − ref_l)); β = 100 in the issue's reading."""
    B, beta = 4, 100.0
    x0, eps, t, x_t, v, pol, ref, _ = _flow_batch(torch.float64, B, seed=2)
    theta = ((pol - v) ** 2).reshape(2 * B, -1).mean(dim=1)
    refm = ((ref - v) ** 2).reshape(2 * B, -1).mean(dim=1)
    inside = -0.5 * beta * ((theta[:B] - refm[:B]) - (theta[B:] - refm[B:]))
    ours = dpo_loss(theta[:B], theta[B:], refm[:B], refm[B:], beta=beta)
    assert torch.allclose(ours.logit, inside, rtol=0, atol=1e-10)


def test_simpletuner_summed_errors_are_ours_with_beta_over_n():
    """bghira/SimpleTuner `simpletuner/helpers/distillation/flow_dpo/distiller.py` (commit
    1b1d39b1f944eeb41074c45c4030b8bf5d924c4a), auto_beta off: err = Σ over the latent (norm_type "sum",
    the default) of (pred − (noise − x0))², margin = (ref_w − pol_w) + (pol_l − ref_l), logits = 0.5·β·margin.
    With N latent elements per sample its β_sum equals our β_mean / N."""
    B = 4
    x0, eps, t, x_t, v, pol, ref, _ = _flow_batch(torch.float64, B, seed=3)
    N = v[0].numel()  # 4·8·8 = 256

    def err_sum(pred, target):
        return (pred - target).pow(2).sum(dim=tuple(range(1, pred.dim())))

    pw, pl, rw, rl = err_sum(pol[:B], v[:B]), err_sum(pol[B:], v[B:]), err_sum(ref[:B], v[:B]), err_sum(ref[B:], v[B:])
    beta_sum = 0.2
    theirs = 0.5 * beta_sum * ((rw - pw) + (pl - rl))
    m_pol, m_ref = flow_mse(pol, x0, eps, x_t, t), flow_mse(ref, x0, eps, x_t, t)
    ours = dpo_loss(m_pol[:B], m_pol[B:], m_ref[:B], m_ref[B:], beta=beta_sum * N)  # β_mean = N·β_sum = 51.2
    assert torch.allclose(ours.logit, theirs, rtol=1e-12, atol=1e-10)


# ---------------------------------------------------------------- TDFT on flow (our extension)

def test_flow_grid_timesteps():
    # N = 25, K = 5: t' = (k + 1)/25, t = max(t' − 0.2, 0): index 0 -> (0.04, 0), 4 -> (0.2, 0), 5 -> (0.24, 0.04),
    # 24 -> (1, 0.8); t = 0 for 5 of the 25 grid points, as the authors' grid on SD
    ts, te = flow_grid_timesteps(torch.tensor([0, 4, 5, 24]), 25, 5)
    assert torch.allclose(ts, v64(0.04, 0.2, 0.24, 1.0), atol=1e-15)
    assert torch.allclose(te, v64(0.0, 0.0, 0.04, 0.8), atol=1e-15)
    _, te_all = flow_grid_timesteps(torch.arange(25), 25, 5)
    assert int((te_all == 0).sum()) == 5
    assert torch.allclose(rollout_grid(v64(0.8), v64(0.4), 2).squeeze(1), v64(0.8, 0.6, 0.4), atol=1e-15)


def test_flow_tdft_golden_constant_teacher():
    # teacher v = c = [0.5, −1] everywhere; x_{t'} = [1, −1] at t' = 0.8, K = 2 steps to t = 0.4 (grid 0.8, 0.6, 0.4):
    #   x_t = x_{t'} + (0.4 − 0.8)·c = [1 − 0.2, −1 + 0.4] = [0.8, −0.6]
    #   x0_hat = x_t − 0.4·c = [0.6, −0.2]
    #   re-noise to s = 0.6 with ε_s = [1, 2]: a = (1 − 0.6)/(1 − 0.4) = 2/3, b = sqrt(0.36 − (4/9)·0.16) = sqrt(13/45)
    #   = 0.5374838;  x_s = [0.5333333 + 0.5374838, −0.4 + 1.0749677] = [1.0708172, 0.6749677]
    # student v = 0: x0_θ = x_s; l2 = ((1.0708172 − 0.6)² + (0.6749677 + 0.2)²)/2 = 0.4936186
    c = d([0.5, -1.0])
    teacher = lambda x, t: c.expand_as(x)  # noqa: E731
    tg = flow_tdft_target(teacher, d([1.0, -1.0]), v64(0.8), v64(0.4), 2, v64(0.6), d([1.0, 2.0]))
    assert torch.allclose(tg.x_t, d([0.8, -0.6]), atol=1e-12)
    assert torch.allclose(tg.x0_hat, d([0.6, -0.2]), atol=1e-12)
    assert torch.allclose(tg.x_s, d([1.0708171832, 0.6749676998]), atol=1e-9)
    loss, dist = flow_tdft_loss(lambda x, t: torch.zeros_like(x), tg, kind="l2")
    assert dist.item() == pytest.approx(0.4936186478, abs=1e-9) and loss.item() == pytest.approx(dist.item())
    # a weight w(s) multiplies the per-sample distance
    loss2, _ = flow_tdft_loss(lambda x, t: torch.zeros_like(x), tg, kind="l2", weight=v64(2.0))
    assert loss2.item() == pytest.approx(2 * 0.4936186478, abs=1e-9)


def test_flow_tdft_exact_teacher_recovers_the_data_and_an_equal_student_has_zero_loss():
    # data = one point x0*: the exact velocity (x − x0*)/t; from pure noise (t' = 1), any K Euler steps land on the
    # straight line, so x0_hat = x0* exactly; the student with the same field predicts x0* at (x_s, s): loss 0
    x0s = torch.randn(3, 4, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    field = lambda x, t: (x - x0s) / t.reshape(-1, 1, 1, 1)  # noqa: E731
    eps = torch.randn(3, 4, 2, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x_start, t_start = flow_tdft_start(None, eps, v64(0.9, 0.9, 0.9))
    assert torch.equal(x_start, eps) and torch.equal(t_start, v64(1.0, 1.0, 1.0))
    t_end = v64(0.5, 0.2, 0.05)
    s = draw_s(t_end, torch.Generator().manual_seed(2))
    assert bool(((s > t_end) & (s <= 1)).all())
    tg = flow_tdft_target(field, x_start, t_start, t_end, 5, s, torch.randn_like(eps))
    assert torch.allclose(tg.x0_hat, x0s, atol=1e-12)
    assert torch.allclose(tg.x_t, x0s + t_end.reshape(-1, 1, 1, 1) * (eps - x0s), atol=1e-12)
    loss, dist = flow_tdft_loss(field, tg, kind="l2")
    assert dist.abs().max().item() < 1e-20
    # from a real latent: x_{t'} = (1 − t')·x0 + t'·ε
    xs, ts = flow_tdft_start(x0s, eps, v64(0.3, 0.6, 0.9))
    assert torch.equal(xs, interpolate(x0s, eps, v64(0.3, 0.6, 0.9))) and torch.equal(ts, v64(0.3, 0.6, 0.9))


def test_flow_renoise_preserves_the_forward_marginal():
    # x_t = (1 − t)·x0 + t·ε' with x0 = 2 everywhere; x_s should be (1 − s)·2 + s·ε'': mean 2(1 − s), sd s.
    # n = 200000 elements; 5 standard errors: mean 5·s/√n, sd 5·s/√(2n)
    n, t, s = 200000, 0.3, 0.7
    g = torch.Generator().manual_seed(0)
    x0 = torch.full((n, 1, 1, 1), 2.0, dtype=torch.float64)
    x_t = interpolate(x0, torch.randn(n, 1, 1, 1, generator=g, dtype=torch.float64), t)
    x_s = renoise(x_t, torch.full((n,), t, dtype=torch.float64), torch.full((n,), s, dtype=torch.float64),
                  torch.randn(n, 1, 1, 1, generator=g, dtype=torch.float64))
    assert abs(x_s.mean().item() - 2 * (1 - s)) < 5 * s / math.sqrt(n)
    assert abs(x_s.std().item() - s) < 5 * s / math.sqrt(2 * n)
    # hand value: t = 0.2, s = 0.6: a = 0.4/0.8 = 0.5, b = sqrt(0.36 − 0.25·0.04) = sqrt(0.35) = 0.5916080
    out = renoise(d([1.0]), v64(0.2), v64(0.6), d([1.0]))
    assert out.item() == pytest.approx(0.5 + math.sqrt(0.35), abs=1e-12)
    # s = t is the identity; t = s = 1 too; s < t is refused
    assert torch.equal(renoise(d([1.5]), v64(0.4), v64(0.4), d([3.0])), d([1.5]))
    assert torch.equal(renoise(d([1.5]), v64(1.0), v64(1.0), d([3.0])), d([1.5]))
    with pytest.raises(ValueError, match="s >= t"):
        renoise(d([1.0]), v64(0.5), v64(0.4), d([1.0]))
