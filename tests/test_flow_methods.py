"""Every registered method on a flow model (issue 22): the method wiring of trainer/methods.py
(`Noising`) against hand-computed flow errors, and a 2-step training smoke run per method,
parametrised from the registry. The tiny model is the tiny SD1.5 UNet read as a velocity
network (prediction_type "flow", FlowMatchEulerDiscreteScheduler): the wiring only needs a
network, not a trained flow model."""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from train_fixtures import data_for, load_pipe, tiny_cfg, train_two_steps  # noqa: E402

from npo_suite.trainer.methods import METHODS  # noqa: E402

_PIPE: dict = {}


def flow_backend(model_dir, cfg=None):
    from diffusers import FlowMatchEulerDiscreteScheduler

    from npo_suite.trainer.backends.diffusers import BackendOptions, DiffusersBackend, LoraOptions

    if "p" not in _PIPE:
        _PIPE["p"] = load_pipe(model_dir)
    pipe = copy.deepcopy(_PIPE["p"])
    lora = LoraOptions(cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, None, cfg.seed) if cfg else LoraOptions(2, 2.0)
    return DiffusersBackend(pipe.unet, [pipe.text_encoder], [pipe.tokenizer], FlowMatchEulerDiscreteScheduler(),
                            pipe.vae, family="sd1", prediction_type="flow",
                            options=BackendOptions(lora=lora, resolution=cfg.resolution if cfg else 16))


def _perturb_policy(backend):
    """Give the policy a non-zero LoRA so policy and reference differ."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in backend.trainable_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("form", ["v", "x0", "eps"])
def test_flow_pair_mses_by_hand(sd15_dir, form):
    """pair_mses on a flow backend = the hand-written rectified-flow errors: x_t = (1 − t)x0 + tε, the
    network at timestep t·1000, error vs ε − x0 (v) or x_t − t·v_θ vs x0 (x0); the reference is the
    network with the LoRA off. Same float32 ops in both computations: exact up to the batching of the
    forward (1e-6 relative); eps: x_t + (1 − t)·v_θ vs ε."""
    from npo_suite.trainer.methods import MethodConfig, Noising, pair_mses

    b = flow_backend(sd15_dir)
    _perturb_policy(b)
    cfg = MethodConfig(flow_error=form)
    g = torch.Generator().manual_seed(0)
    x_w, x_l = torch.randn(2, 4, 2, 2, generator=g), torch.randn(2, 4, 2, 2, generator=g)
    t = torch.tensor([0.3, 0.8])
    eps = torch.randn(2, 4, 2, 2, generator=g)
    cond = b.encode_prompts(["a cat", "a dog"])
    with torch.no_grad():
        m = pair_mses(b, x_w, x_l, cond, t, eps, None, Noising(b, cfg))

        def err(x0, adapter):
            tb = t.view(-1, 1, 1, 1)
            x_t = (1 - tb) * x0 + tb * eps
            with b.use_adapter(adapter):
                v = b.unet(x_t, t * 1000, encoder_hidden_states=cond.hidden).sample
            if form == "v":
                return ((v - (eps - x0)) ** 2).mean((1, 2, 3))
            if form == "eps":
                return ((x_t + (1 - tb) * v - eps) ** 2).mean((1, 2, 3))
            return ((x_t - tb * v - x0) ** 2).mean((1, 2, 3))

        for got, want in ((m.pol_w, err(x_w, "policy")), (m.pol_l, err(x_l, "policy")),
                          (m.ref_w, err(x_w, None)), (m.ref_l, err(x_l, None))):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
        assert not torch.allclose(m.pol_w, m.ref_w)  # the reference is the LoRA-off network


def test_flow_timesteps_follow_the_config(sd15_dir):
    """Noising.timesteps on flow = core.flow.sample_t with the config's sampler and shift (same generator
    stream), float in (0, 1); on an eps backend the integer sampler is unchanged."""
    from npo_suite.core.flow import sample_t
    from npo_suite.trainer.methods import MethodConfig, Noising

    b = flow_backend(sd15_dir)
    cfg = MethodConfig(flow_t_sampler="uniform", flow_shift=3.0)
    t, w = Noising(b, cfg).timesteps(64, torch.Generator().manual_seed(5), torch.device("cpu"))
    want = sample_t(64, "uniform", torch.Generator().manual_seed(5), shift=3.0).float()
    torch.testing.assert_close(t, want)
    assert t.dtype == torch.float32 and bool(((t > 0) & (t < 1)).all()) and bool((w == 1).all())


def test_flow_refuses_ddpm_only_settings(sd15_dir, tmp_path):
    from npo_suite.core.schedule import TIMESTEP_WEIGHTS
    from npo_suite.trainer.methods import MethodConfig, Noising

    b = flow_backend(sd15_dir)
    for weight in (k for k in TIMESTEP_WEIGHTS if k != "none"):
        with pytest.raises(ValueError, match="timestep_weight"):
            Noising(b, MethodConfig(timestep_weight=weight)).check()
    with pytest.raises(ValueError, match="reference update"):
        Noising(b, MethodConfig(ref_update_every=4)).check()
    with pytest.raises(ValueError, match="predict_v"):
        b.predict_eps(torch.zeros(1, 4, 2, 2), torch.tensor([1]), b.encode_prompts(["x"]))


@pytest.mark.parametrize("method", list(METHODS))
def test_flow_smoke_every_method(method, sd15_dir, tmp_path):
    """Each method of the registry trains 2 steps on a flow model: finite loss, the policy moved."""
    cfg = tiny_cfg(sd15_dir, data_for(method, tmp_path / "data"), tmp_path / "out", method=method, steps=2,
                   tdft_solver_steps=5, tdft_k=2)
    backend = flow_backend(sd15_dir, cfg)
    result = train_two_steps(cfg, backend)
