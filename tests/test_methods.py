"""Methods composed with a fake protocol backend (tests/methods_fake_backend.py)."""
import sys
from dataclasses import fields, replace
from pathlib import Path

import pytest
import torch

from npo_suite.core.cond import Cond
from npo_suite.trainer.batches import PairBatch, PromptBatch
from npo_suite.trainer.methods import METHODS, MethodConfig, PairMethod, StepOut

sys.path.insert(0, str(Path(__file__).parent))
from methods_fake_backend import FakeBackend  # noqa: E402

B = 3
PROMPTS = ["a red fox on a snowy hill", "two cats playing chess at night", "an old lighthouse in a storm"]
PAIR_KEYS = {"loss", "implicit_acc", "mse/policy_w", "mse/policy_l", "mse/ref_w", "mse/ref_l", "llr/winner", "logit/mean",
             "logit/abs_mean", "logit/saturated_frac"}
DDSPO_KEYS = {"loss", "implicit_acc", "logit/mean", "logit/abs_mean", "logit/saturated_frac", "t/mean", "ddspo/m_w",
              "ddspo/m_l", "ddspo/mse_policy_l", "ddspo/mse_ref_l"}


def latents(seed):
    return torch.randn(B, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


def pair_batch(be, swap=False):
    w, l = latents(1), latents(2)
    if swap:
        w, l = l, w
    return PairBatch(w, l, be.encode_prompts(PROMPTS), list(PROMPTS))


def prompt_batch(be, with_latents=True, latents_l=None):
    return PromptBatch(list(PROMPTS), be.encode_prompts(PROMPTS), latents=latents(3) if with_latents else None,
                       latents_l=latents_l, latent_shape=(4, 8, 8))


def batch_for(method, be):
    if method.data_kind == "pairs":
        return pair_batch(be)
    return prompt_batch(be, latents_l=latents(4) if method.data_kind == "prompts_with_winners" else None)


def run(name, be, batch, cfg=None, seed=0):
    cfg = cfg or MethodConfig(method=name)
    return METHODS[name].compute(be, batch, cfg, torch.Generator().manual_seed(seed))


def fresh(**kw):
    """A backend whose policy LoRA is non-zero (so policy != reference)."""
    return FakeBackend(seed=0, lora_init_scale=0.3, **kw)


def test_registry_and_config():
    assert {"dpo", "npo", "bdpo", "snpo", "snpo_naive", "tdft", "ddspo"} <= set(METHODS)  # the papers' methods
    assert all(m.name == k for k, m in METHODS.items())  # the key is the name the metadata and logs carry
    assert {m.data_kind for m in METHODS.values()} == {"pairs", "images_or_prompts", "prompts_with_winners"}
    assert all(f.metadata.get("help") for f in fields(MethodConfig))
    cfg = MethodConfig()
    assert (cfg.beta, cfg.lam, cfg.snpo_p, cfg.ddspo_beta, cfg.ref_bound) == (5000.0, 0.9, 0.5, 16000.0, 0.005)
    for bad, match in [(dict(method="ipo"), "method"), (dict(lam=0.0), "lam"), (dict(snpo_p=1.5), "snpo_p"),
                       (dict(timestep_sampler="cosine"), "timestep_sampler"), (dict(tdft_start="x"), "tdft_start"),
                       (dict(ddspo_rewriter="local_lm"), "ddspo_rewriter_path"), (dict(ema_decay=1.0), "ema_decay"),
                       (dict(ref_on_exceed="stop"), "ref_on_exceed"), (dict(ddspo_min_frac=0.8), "ddspo_min_frac"),
                       (dict(tdft_timesteps="x"), "tdft_timesteps"), (dict(tdft_loss="huber1"), "tdft_loss"),
                       (dict(tdft_huber_c=0.0), "tdft_huber_c"), (dict(tdft_guidance=float("nan")), "tdft_guidance"),
                       (dict(ddspo_loser="x"), "ddspo_loser"), (dict(ddspo_loss_weighting="x"), "ddspo_loss_weighting")]:
        with pytest.raises(ValueError, match=match):
            MethodConfig(**bad)


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_finite_and_grads_only_on_policy(name):
    be = fresh()
    method = METHODS[name]
    # ddspo_beta 100: the paper's 16000 saturates the logit on this tiny network (no gradient left)
    cfg = MethodConfig(method=name, timestep_sampler="gamma_bins", timestep_weight="snr_reward_scale", ddspo_beta=100.0)
    method.setup(be, cfg)
    out = method.compute(be, batch_for(method, be), cfg, torch.Generator().manual_seed(0))
    assert isinstance(out, StepOut) and out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert all(torch.isfinite(v) and v.ndim == 0 and not v.requires_grad for v in out.metrics.values())
    assert "loss" in out.metrics
    if method.data_kind == "pairs":
        assert PAIR_KEYS <= set(out.metrics)
    if method.data_kind == "prompts_with_winners":
        assert set(out.metrics) == DDSPO_KEYS
    out.loss.backward()
    grads = [p.grad for p in be.trainable_parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    assert all(not p.requires_grad for p in be.base_params)
    for a, params in be.adapters.items():
        if a != "policy":
            assert all(p.grad is None and not p.requires_grad for p in params.values())


@pytest.mark.parametrize("name", [k for k, m in METHODS.items() if isinstance(m, PairMethod)])
def test_pair_methods_one_batched_policy_forward(name):
    be = fresh()
    run(name, be, pair_batch(be))
    assert be.calls == [("policy", 2 * B, True), (None, 2 * B, False)]


def test_npo_is_dpo_on_swapped_pairs():
    be = fresh()
    a, b = run("npo", be, pair_batch(be)), run("dpo", be, pair_batch(be, swap=True))
    assert torch.equal(a.loss, b.loss) and a.metrics["logit/mean"] == b.metrics["logit/mean"]
    assert not torch.equal(a.loss, run("dpo", be, pair_batch(be)).loss)


def test_snpo_p0_is_bdpo_and_naive_is_lambda_one():
    be = fresh()
    batch = pair_batch(be)
    snpo = run("snpo", be, batch, MethodConfig(method="snpo", snpo_p=0.0))
    bdpo = run("bdpo", be, batch, MethodConfig(method="bdpo"))
    assert torch.equal(snpo.loss, bdpo.loss) and snpo.metrics["snpo/null_frac"] == 0
    for p in (0.0, 0.5, 1.0):
        naive = run("snpo_naive", be, batch, MethodConfig(method="snpo_naive", snpo_p=p, lam=0.9))
        lam1 = run("snpo", be, batch, MethodConfig(method="snpo", snpo_p=p, lam=1.0))
        assert torch.equal(naive.loss, lam1.loss)
    # lambda = 1 BDPO is DPO
    assert torch.equal(run("bdpo", be, batch, MethodConfig(method="bdpo", lam=1.0)).loss, run("dpo", be, batch).loss)


def test_snpo_p1_is_bdpo_on_null_cond_and_swapped_pair():
    be = fresh()
    snpo = run("snpo", be, pair_batch(be), MethodConfig(method="snpo", snpo_p=1.0))
    swapped = pair_batch(be, swap=True)
    null_batch = replace(swapped, cond=be.null_cond(B))
    bdpo = run("bdpo", be, null_batch, MethodConfig(method="bdpo"))
    assert torch.allclose(snpo.loss, bdpo.loss, rtol=1e-6) and snpo.metrics["snpo/null_frac"] == 1


def test_snpo_branch_frequency_and_mixed_rows():
    be = fresh()
    big = PairBatch(torch.randn(400, 4, 8, 8), torch.randn(400, 4, 8, 8), be.encode_prompts(["a cat"] * 400))
    out = run("snpo", be, big, MethodConfig(method="snpo", snpo_p=0.3), seed=1)
    assert abs(out.metrics["snpo/null_frac"].item() - 0.3) < 0.08  # sd 0.023
    assert [c for c in be.calls if c[0] == "policy"] == [("policy", 800, True)]


def test_reference_adapter_under_reference_update():
    be = fresh()
    cfg = MethodConfig(method="dpo", ref_update_every=16)
    assert METHODS["dpo"].extra_adapters(cfg) == ("ref",) and METHODS["tdft"].extra_adapters(cfg) == ("ema",)
    METHODS["dpo"].setup(be, cfg)
    be.calls.clear()
    METHODS["dpo"].compute(be, pair_batch(be), cfg, torch.Generator().manual_seed(0))
    assert be.calls == [("policy", 2 * B, True), ("ref", 2 * B, False)]


@pytest.mark.parametrize("w,rows,start", [(-1.0, B, "auto"), (0.0, B, "auto"), (0.5, 2 * B, "auto"),
                                          (-5.0, 2 * B, "noise")])
def test_tdft_calls_and_ema_moves(w, rows, start):
    be = fresh()
    cfg = MethodConfig(method="tdft", tdft_guidance=w, tdft_start=start, tdft_k=3, ema_decay=0.9)
    m = METHODS["tdft"]
    m.setup(be, cfg)
    be.calls.clear()
    out = m.compute(be, prompt_batch(be), cfg, torch.Generator().manual_seed(0))
    # K rollout steps + 1 Tweedie evaluation of the teacher, no grad; one student forward with grad
    assert be.calls == [("ema", rows, False)] * 4 + [("policy", B, True)]
    assert torch.isfinite(out.loss) and out.metrics["tdft/s_mean"] > out.metrics["tdft/t_mean"]
    assert out.metrics["tdft/real_start"] == (1.0 if start == "auto" else 0.0)
    out.loss.backward()
    ema_before = {k: v.clone() for k, v in be.adapters["ema"].items()}
    with torch.no_grad():
        for p in be.trainable_parameters():
            p -= 0.1 * p.grad
    m.after_step(be, cfg)
    for k, v in be.adapters["ema"].items():
        expected = ema_before[k] + (1 - 0.9) * (be.adapters["policy"][k].detach() - ema_before[k])
        assert torch.allclose(v, expected, atol=1e-6)
    assert any(not torch.equal(be.adapters["ema"][k], ema_before[k]) for k in ema_before)


def test_tdft_ema_is_per_lora_factor_not_of_the_product():
    """The teacher's offset is EMA(up)·EMA(down), which differs from EMA(up·down) (docs/methods.md)."""
    be = fresh()
    cfg = MethodConfig(method="tdft", ema_decay=0.5)
    METHODS["tdft"].setup(be, cfg)
    up0, down0 = be.adapters["ema"]["up1"].clone(), be.adapters["ema"]["down1"].clone()
    with torch.no_grad():
        be.adapters["policy"]["up1"].mul_(3.0)
        be.adapters["policy"]["down1"].mul_(-1.0)
    METHODS["tdft"].after_step(be, cfg)
    # hand: each factor moves halfway: up = (1 + 3)/2 up0 = 2 up0, down = (1 - 1)/2 down0 = 0 -> offset 0
    assert torch.allclose(be.adapters["ema"]["up1"], 2 * up0) and torch.count_nonzero(be.adapters["ema"]["down1"]) == 0
    product_ema = 0.5 * (up0 @ down0) + 0.5 * (3 * up0 @ -down0)  # = -up0 @ down0, not 0
    assert not torch.allclose(be.adapters["ema"]["up1"] @ be.adapters["ema"]["down1"], product_ema)


def _teacher_eps(be, cfg, x, t):
    return METHODS["tdft"].teacher_fn(be, cfg, be.encode_prompts(PROMPTS))(x, t)


@pytest.mark.parametrize("w", [-1.0, -5.0, 0.0, 0.5, 3.0])
def test_tdft_teacher_guidance_equals_the_formula(w):
    """eps = eps_c + w·(eps_c − eps_∅) for any w (authors: −1 SD1.5, −5 SDXL); w = −1 is eps_∅ itself."""
    be = fresh()
    cfg = MethodConfig(method="tdft", tdft_guidance=w)
    METHODS["tdft"].setup(be, cfg)
    x, t = latents(5), torch.tensor([10, 500, 990])
    cond = be.encode_prompts(PROMPTS)
    e_c = be.predict_eps(x, t, cond, "ema")
    e_u = be.predict_eps(x, t, be.null_cond(B), "ema")
    got = _teacher_eps(be, cfg, x, t)
    assert torch.allclose(got, e_c + w * (e_c - e_u), atol=1e-6)
    if w == -1.0:
        assert torch.equal(got, e_u)
        assert not torch.allclose(got, e_c)


def test_tdft_solver_grid_timesteps_on_the_method():
    """The method's draws: t' on the 25-step grid, t = max(t' − 200, 0), P(t = 0) near 0.2, s in [t+1, T−1]."""
    be = fresh()
    cfg = MethodConfig(method="tdft")
    assert (cfg.tdft_timesteps, cfg.tdft_solver_steps, cfg.tdft_k, cfg.tdft_guidance, cfg.tdft_loss,
            cfg.tdft_huber_c) == ("solver_grid", 25, 5, -1.0, "pseudo_huber", 1e-3)
    g = torch.Generator().manual_seed(0)
    t_start, t_end = METHODS["tdft"].timesteps(be, cfg, 20000, g, torch.device("cpu"))
    assert set(t_start.unique().tolist()) == {40 * k - 1 for k in range(1, 26)}
    assert torch.equal(t_end.clamp(min=0), (t_start - 200).clamp(min=0))
    t = t_end.clamp(min=0)
    assert t.max().item() == 799
    # P(t = 0) = 0.2; sd of the frequency over 20000 draws is 0.0028 -> 0.015 is > 5 sd
    assert abs((t == 0).float().mean().item() - 0.2) < 0.015
    # the earlier variant: t uniform over [0, T-2], t' = min(T-1, t + 200)
    t_start, t_end = METHODS["tdft"].timesteps(be, replace(cfg, tdft_timesteps="uniform"), 2000, g, torch.device("cpu"))
    assert torch.equal(t_start, (t_end + 200).clamp(max=999)) and t_end.max().item() > 800


def test_tdft_start_images_refuses_prompts_only():
    be = fresh()
    cfg = MethodConfig(method="tdft", tdft_start="images")
    METHODS["tdft"].setup(be, cfg)
    with pytest.raises(ValueError, match="tdft_start='images' needs images"):
        METHODS["tdft"].compute(be, prompt_batch(be, with_latents=False), cfg, torch.Generator().manual_seed(0))
    out = METHODS["tdft"].compute(be, prompt_batch(be), cfg, torch.Generator().manual_seed(0))
    assert out.metrics["tdft/real_start"] == 1.0


def test_tdft_from_pure_noise_needs_latent_shape():
    be = fresh()
    cfg = MethodConfig(method="tdft")
    METHODS["tdft"].setup(be, cfg)
    out = METHODS["tdft"].compute(be, prompt_batch(be, with_latents=False), cfg, torch.Generator().manual_seed(0))
    assert torch.isfinite(out.loss)
    with pytest.raises(ValueError, match="latent_shape"):
        METHODS["tdft"].compute(be, PromptBatch(PROMPTS, be.encode_prompts(PROMPTS)), cfg)


def test_ddspo_uses_perturbed_prompts_for_loser_targets():
    be = fresh()
    cfg = MethodConfig(method="ddspo")
    assert cfg.ddspo_loser == "generated"
    batch = prompt_batch(be, latents_l=latents(4))
    be.encoded.clear()
    be.calls.clear()
    a = run("ddspo", be, batch, cfg)
    assert be.calls == [("policy", 2 * B, True), (None, 3 * B, False)]
    (neg_prompts,) = be.encoded  # exactly one encode: the degraded prompts
    for neg, p in zip(neg_prompts, PROMPTS):
        assert neg != p and neg and set(neg.split()) <= set(p.split())
    # the same c- given as a precomputed neg_cond gives the same loss (t and eps are drawn first)
    b = run("ddspo", be, replace(batch, neg_cond=be.encode_prompts(neg_prompts)), cfg)
    assert torch.equal(a.loss, b.loss)
    # with c- = c the loser target is the reference's own prediction: a different loss
    c = run("ddspo", be, replace(batch, neg_cond=batch.cond), cfg)
    assert not torch.allclose(a.loss, c.loss)
    assert c.metrics["ddspo/mse_ref_l"] == 0  # mse(eps_ref(x_l, c), eps_ref(x_l, c))


def test_wrong_batch_type_is_a_clear_error():
    be = fresh()
    with pytest.raises(TypeError, match="PairBatch"):
        run("dpo", be, prompt_batch(be))
    with pytest.raises(ValueError, match="winner latents"):
        run("ddspo", be, prompt_batch(be, with_latents=False))
    with pytest.raises(ValueError, match="differ in shape"):
        PairBatch(torch.zeros(2, 4, 8, 8), torch.zeros(2, 4, 4, 4), Cond(torch.zeros(2, 3, 8)))


# ---------------------------------------------------------------- a real tiny diffusers UNet + peft

def _diffusers_backend(sd15_dir):
    pytest.importorskip("peft")
    from diffusers import StableDiffusionPipeline

    from npo_suite.trainer.backends.diffusers import DiffusersBackend

    pipe = StableDiffusionPipeline.from_pretrained(sd15_dir, safety_checker=None, requires_safety_checker=False)
    be = DiffusersBackend.from_pipeline(pipe)
    with torch.no_grad():  # a non-zero policy LoRA, so that policy != reference
        for p in be.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)
    return be


def _real_batch(be, kind):
    g = torch.Generator().manual_seed(0)
    x = [torch.randn(2, 4, 8, 8, generator=g) for _ in range(2)]
    cond = be.encode_prompts(["a cat", "a red dog"])
    if kind == "pairs":
        return PairBatch(x[0], x[1], cond, ["a cat", "a red dog"])
    loser = x[1] if kind == "prompts_with_winners" else None  # DDSPO: an explicit loser image
    return PromptBatch(["a cat", "a red dog"], cond, latents=x[0], latents_l=loser, latent_shape=(4, 8, 8))


@pytest.mark.slow
def test_every_method_on_a_real_tiny_unet(sd15_dir):
    be = _diffusers_backend(sd15_dir)
    unet_params = dict(be.unet.named_parameters())
    trainable = {id(p) for p in be.trainable_parameters()}
    for name in ("snpo", "tdft", "ddspo"):  # one per data kind (the fake-backend tests cover the rest)
        method = METHODS[name]
        cfg = MethodConfig(method=name, tdft_k=1, snpo_p=0.5)
        if not all(a in be.adapters for a in method.extra_adapters(cfg)):
            method.setup(be, cfg)
        out = method.compute(be, _real_batch(be, method.data_kind), cfg, torch.Generator().manual_seed(0))
        assert torch.isfinite(out.loss), name
        be.unet.zero_grad(set_to_none=True)
        out.loss.backward()
        with_grad = {id(p) for p in unet_params.values() if p.grad is not None}
        assert with_grad and with_grad <= trainable, name
        method.after_step(be, cfg)
    batch = _real_batch(be, "pairs")
    snpo = METHODS["snpo"].compute(be, batch, MethodConfig(method="snpo", snpo_p=0.0), torch.Generator().manual_seed(3))
    bdpo = METHODS["bdpo"].compute(be, batch, MethodConfig(method="bdpo"), torch.Generator().manual_seed(3))
    assert torch.allclose(snpo.loss, bdpo.loss, rtol=1e-5)


def test_roles_declared_by_the_methods():
    """The saved LoRA's role comes from the method: NPO/TDFT give negative offsets, SNPO one for both branches."""
    from npo_suite.trainer.methods import METHODS

    from npo_suite.core.offsets.schema import ROLES

    roles = {k: m.role for k, m in METHODS.items()}
    want = {"dpo": "positive", "npo": "negative", "bdpo": "positive", "snpo": "snpo",
            "snpo_naive": "snpo", "tdft": "negative", "ddspo": "positive"}
    assert {k: roles[k] for k in want} == want and set(roles.values()) <= set(ROLES)


def test_ddspo_missing_loser_is_refused_unless_same_is_asked():
    be = fresh()
    winners_only = prompt_batch(be)
    for loser in ("generated", "other"):
        cfg = MethodConfig(method="ddspo", ddspo_loser=loser)
        with pytest.raises(ValueError, match=f"ddspo_loser='{loser}'.*winner images only"):
            run("ddspo", be, winners_only, cfg)
    cfg = MethodConfig(method="ddspo", ddspo_loser="same")
    with pytest.warns(UserWarning, match="x_l = x_w"):
        METHODS["ddspo"].setup(fresh(), cfg)
    same = run("ddspo", be, winners_only, cfg)
    # "same" is x_l = x_w: identical to passing the winner as the loser image explicitly
    explicit = run("ddspo", be, replace(winners_only, latents_l=winners_only.latents), MethodConfig(method="ddspo"))
    assert torch.equal(same.loss, explicit.loss)
    # and a real loser image gives another loss
    other = run("ddspo", be, replace(winners_only, latents_l=latents(4)), MethodConfig(method="ddspo"))
    assert not torch.allclose(other.loss, same.loss)


def test_ddspo_metrics_are_named_for_what_they_are():
    """No `mse/ref_w` (it was always 0) and no `mse/policy_w` (it was the margin m_w); the margins under ddspo/."""
    be = fresh()
    cfg = MethodConfig(method="ddspo", ddspo_beta=100.0)
    batch = prompt_batch(be, latents_l=latents(4))
    out = run("ddspo", be, batch, cfg)
    assert set(out.metrics) == DDSPO_KEYS
    m = out.metrics
    assert torch.allclose(m["ddspo/m_l"], m["ddspo/mse_policy_l"] - m["ddspo/mse_ref_l"], atol=1e-7)
    # logit = -(beta/2)(m_w - m_l) per row; with B rows the means obey the same linear relation
    assert torch.allclose(m["logit/mean"], -(100.0 / 2) * (m["ddspo/m_w"] - m["ddspo/m_l"]), rtol=1e-4, atol=1e-5)


def test_ddspo_linear_weighting_multiplies_outside_the_sigmoid():
    be = fresh()
    batch = prompt_batch(be, latents_l=latents(4))
    plain = run("ddspo", be, batch, MethodConfig(method="ddspo", ddspo_beta=100.0))
    lin = run("ddspo", be, batch, MethodConfig(method="ddspo", ddspo_beta=100.0, ddspo_loss_weighting="linear"))
    assert torch.equal(plain.metrics["logit/mean"], lin.metrics["logit/mean"])  # the logit is unchanged
    assert not torch.allclose(plain.loss, lin.loss)


class _SpyBackend(FakeBackend):
    """Records the (x, t) of every teacher ("ema") call."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.ema_inputs = []

    def predict_eps(self, x_t, t, cond, adapter="policy"):
        if adapter == "ema":
            self.ema_inputs.append((x_t.clone(), t.clone()))
        return super().predict_eps(x_t, t, cond, adapter)


def test_tdft_real_start_noises_the_images_to_t_prime():
    """With images the rollout starts at x_{t'} = a_{t'}·x0 + σ_{t'}·eps (the paper); draws in the documented
    order (grid index, s, then eps_start), so the start can be rebuilt by hand from the same seed."""
    be = _SpyBackend(seed=0, lora_init_scale=0.3)
    cfg = MethodConfig(method="tdft", tdft_k=2)
    METHODS["tdft"].setup(be, cfg)
    batch = prompt_batch(be)
    METHODS["tdft"].compute(be, batch, cfg, torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    index = (torch.rand(B, generator=g, dtype=torch.float64) * 25).long()
    torch.rand(B, generator=g, dtype=torch.float64)  # s
    eps_start = torch.randn(batch.latents.shape, generator=g)
    t_prime = 40 * (index + 1) - 1
    a, s = be.abar[t_prime].sqrt().float().reshape(-1, 1, 1, 1), (1 - be.abar[t_prime]).sqrt().float().reshape(-1, 1, 1, 1)
    x_first, t_first = be.ema_inputs[0]
    assert torch.equal(t_first, t_prime)
    assert torch.allclose(x_first, a * batch.latents + s * eps_start, atol=1e-6)
    # prompts only: pure noise at T - 1
    be.ema_inputs.clear()
    METHODS["tdft"].compute(be, prompt_batch(be, with_latents=False), cfg, torch.Generator().manual_seed(5))
    assert torch.equal(be.ema_inputs[0][0], eps_start) and (be.ema_inputs[0][1] == 999).all()


def test_tdft_guided_target_equals_the_authors_guided_x0():
    """Self-NPO/train.py guides x0 (pred_x0 = cond_x0 + w (cond_x0 − uncond_x0)); our Tweedie of the guided eps equals it."""
    from npo_suite.trainer.tdft import tweedie_x0

    be = fresh()
    for w in (-1.0, -5.0):
        cfg = MethodConfig(method="tdft", tdft_guidance=w)
        METHODS["tdft"].setup(be, cfg)
        x, t = latents(6), torch.tensor([0, 399, 799])
        abar_t = be.abar[t].float().reshape(-1, 1, 1, 1)
        x0 = lambda e: (x - (1 - abar_t).sqrt() * e) / abar_t.sqrt()  # noqa: E731  predicted_origin, epsilon
        cond_x0 = x0(be.predict_eps(x, t, be.encode_prompts(PROMPTS), "ema"))
        uncond_x0 = x0(be.predict_eps(x, t, be.null_cond(B), "ema"))
        theirs = cond_x0 + w * (cond_x0 - uncond_x0)
        ours = tweedie_x0(x, _teacher_eps(be, cfg, x, t), abar_t)
        assert torch.allclose(ours, theirs, atol=1e-4)
