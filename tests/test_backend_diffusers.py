"""DiffusersBackend (trainer/backends/diffusers.py) on the tiny SD1.x / SDXL models."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from npo_suite.core.schedule import gather, to_eps
from npo_suite.trainer.backends.base import Backend
from npo_suite.families import get_family
from npo_suite.trainer.backends.diffusers import BackendOptions, DiffusersBackend, LoraOptions

sys.path.insert(0, str(Path(__file__).parent))
from train_fixtures import load_pipe  # noqa: E402

_CACHE: dict = {}


def _fresh(path):
    """A mutable copy of the saved pipeline: loaded once per module, deep-copied per use (fast)."""
    import copy

    if str(path) not in _CACHE:
        _CACHE[str(path)] = load_pipe(path)
    return copy.deepcopy(_CACHE[str(path)])


load_sd15 = load_sdxl = _fresh


def _backend(pipe, **lora):
    opts = BackendOptions(lora=LoraOptions(**{"rank": 2, "alpha": 2.0, **lora}), resolution=16)
    return DiffusersBackend.from_pipeline(pipe, options=opts)


def _perturb(params, scale=0.05, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(scale * torch.randn(p.shape, generator=g))


@pytest.fixture
def sd_backend(sd15_dir):
    return _backend(load_sd15(sd15_dir))


def _inputs(b, n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, 4, 4, generator=g)  # [B, C, h, w]
    t = torch.tensor([10, 700][:n])
    return x, t, b.encode_prompts(["a photo of a cat", "a red dog"][:n])


def test_protocol_and_fresh_lora_equals_base(sd_backend):
    b = sd_backend
    assert isinstance(b, Backend) and b.family == "sd1" and b.num_train_timesteps == 1000
    x, t, c = _inputs(b)
    assert c.hidden.shape == (2, 77, 32) and c.added == {}
    e_pol, e_base = b.predict_eps(x, t, c), b.predict_eps(x, t, c, None)
    assert torch.equal(e_pol, e_base)  # up-projections start at zero
    assert e_pol.requires_grad and not e_base.requires_grad
    assert all(p.requires_grad for p in b.trainable_parameters())
    assert not any(p.requires_grad for p in b.unet.parameters() if all(p is not q for q in b.trainable_parameters()))


def test_adapters_ref_ema_reset_and_toggle_restores_policy(sd_backend):
    b = sd_backend
    x, t, c = _inputs(b)
    base = b.predict_eps(x, t, c, None)
    _perturb(b.trainable_parameters())
    pol = b.predict_eps(x, t, c)
    assert not torch.allclose(pol, base, atol=1e-4)
    b.add_adapter("ref")  # copy of the policy
    b.add_adapter("ema", init_from=None)  # zero effect
    assert torch.equal(b.predict_eps(x, t, c, "ref"), pol)
    assert torch.equal(b.predict_eps(x, t, c, "ema"), base)
    b.ema_update("ema", "policy", decay=0.0)  # ema <- policy
    assert torch.equal(b.predict_eps(x, t, c, "ema"), pol)
    b.reset_adapter("ref")
    assert torch.equal(b.predict_eps(x, t, c, "ref"), base)
    # after any other adapter ran, the policy is active and the only trainable one again
    assert torch.equal(b.predict_eps(x, t, c), pol)
    assert all(p.requires_grad for p in b.trainable_parameters())
    assert not any(p.requires_grad for a in ("ref", "ema") for p in b._params[a])
    with pytest.raises(ValueError, match="unknown adapter"):
        b.predict_eps(x, t, c, "nope")
    with pytest.raises(ValueError, match="already exists"):
        b.add_adapter("ref")


def test_gradients_reach_only_policy_even_with_reference_forward_in_between(sd_backend):
    b = sd_backend
    b.add_adapter("ref")
    x, t, c = _inputs(b)
    e = b.predict_eps(x, t, c)
    with torch.no_grad():
        b.predict_eps(x, t, c, None)
        b.predict_eps(x, t, c, "ref")
    e.pow(2).mean().backward()
    assert all(p.grad is not None for p in b.trainable_parameters())
    assert all(p.grad is None for p in b._params["ref"])


def test_gradient_checkpointing_same_gradients(sd15_dir):
    grads = []
    for gc in (False, True):
        b = DiffusersBackend.from_pipeline(load_sd15(sd15_dir), options=BackendOptions(
            lora=LoraOptions(rank=2, alpha=2.0), gradient_checkpointing=gc))
        _perturb(b.trainable_parameters())
        x, t, c = _inputs(b)
        b.unet.train()
        loss = b.predict_eps(x, t, c).pow(2).mean()
        with torch.no_grad():
            b.predict_eps(x, t, c, None)  # an adapter switch between forward and backward
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in b.trainable_parameters()]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)


def test_v_prediction_is_converted_to_eps(tmp_path):
    from npo_suite.testing.tiny_models import build_sd15

    pipe = build_sd15(None, seed=0, prediction_type="v_prediction")
    b = _backend(pipe)
    assert b.prediction_type == "v_prediction"
    x, t, c = _inputs(b)
    with torch.no_grad():
        v = b.unet(x, t, encoder_hidden_states=c.hidden).sample
    expected = to_eps(v, x, gather(b.abar, t, x), "v_prediction")
    torch.testing.assert_close(b.predict_eps(x, t, c, None), expected)
    assert not torch.allclose(expected, v)


def test_sdxl_conditioning(sdxl_dir):
    b = _backend(load_sdxl(sdxl_dir))
    assert b.family == "sdxl"
    c = b.encode_prompts(["a cat", "a dog"])
    assert c.hidden.shape == (2, 77, 64)  # both encoders' penultimate states concatenated
    assert c.added["text_embeds"].shape == (2, 32)
    assert c.added["time_ids"].tolist() == [[16, 16, 0, 0, 16, 16]] * 2
    null = b.null_cond(3)
    assert len(null) == 3 and null.hidden.abs().sum() == 0 and null.added["text_embeds"].abs().sum() == 0
    x = b.encode_images(torch.rand(2, 3, 16, 16) * 2 - 1)
    assert x.shape == (2, 4, 8, 8)  # tiny VAE: 2 blocks, factor 2
    e = b.predict_eps(x, torch.tensor([5, 900]), c)
    assert e.shape == x.shape and torch.isfinite(e).all()


def test_sd1_null_is_encoded_empty_prompt(sd_backend):
    b = sd_backend
    torch.testing.assert_close(b.null_cond(2).hidden, b.encode_prompts(["", ""]).hidden)


def test_encode_decode_pixel_space(sd15_dir):
    pipe = load_sd15(sd15_dir)
    b = DiffusersBackend(pipe.unet, [pipe.text_encoder], [pipe.tokenizer], pipe.scheduler, vae=None)
    px = torch.rand(1, 4, 8, 8)
    assert torch.equal(b.encode_images(px), px) and torch.equal(b.decode_latents(px), px)
    with pytest.raises(ValueError, match="takes 4 channels, got images with 3"):
        b.encode_images(torch.rand(1, 3, 8, 8))
    b.unet.register_to_config(in_channels=1)  # a grey pixel-space model (the digits world)
    rgb = torch.rand(2, 3, 8, 8)
    torch.testing.assert_close(b.encode_images(rgb), rgb.mean(1, keepdim=True))


def test_target_presets():
    resolve_targets = get_family("sd1").lora_target_modules
    assert resolve_targets("attn") == ["to_q", "to_k", "to_v", "to_out.0"]
    assert "ff.net.2" in resolve_targets("attn_ff") and "conv1" in resolve_targets("attn+conv")
    assert resolve_targets("to_q, to_v") == ["to_q", "to_v"]


def test_conv_targets_are_trained(sd15_dir):
    b = _backend(load_sd15(sd15_dir), targets="attn_ff+conv")
    names = [n for n, _ in b._layers]
    assert any(n.endswith("conv1") for n in names) and any(n.endswith("ff.net.2") for n in names)


def test_continue_from_lora_file(sd15_dir, tmp_path):
    from npo_suite.core.offsets.types import Offset
    from npo_suite.core.offsets import offset_from_peft, save_offset

    b = _backend(load_sd15(sd15_dir), alpha=4.0)  # scale 2
    _perturb(b.trainable_parameters())
    x, t, c = _inputs(b)
    want = b.predict_eps(x, t, c).detach()
    path = tmp_path / "lora.safetensors"
    save_offset(Offset(unet=offset_from_peft(b.unet, "policy", "unet")), path, base=b.unet)
    b2 = _backend(load_sd15(sd15_dir), alpha=1.0, init_path=str(path))  # other alpha: scale folded into up
    torch.testing.assert_close(b2.predict_eps(x, t, c).detach(), want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="rank"):
        _backend(load_sd15(sd15_dir), rank=3, alpha=3.0, init_path=str(path))
    with pytest.raises(ValueError, match="not targets"):
        _backend(load_sd15(sd15_dir), targets="to_q", init_path=str(path))


def test_adapter_state_roundtrip(sd_backend):
    b = sd_backend
    _perturb(b.trainable_parameters())
    st = b.adapter_state("policy")
    b.add_adapter("ref", init_from=None)
    b.load_adapter_state("ref", st)
    x, t, c = _inputs(b)
    assert torch.equal(b.predict_eps(x, t, c, "ref"), b.predict_eps(x, t, c).detach())
    with pytest.raises(ValueError, match="does not match"):
        b.load_adapter_state("ref", {k: v for k, v in list(st.items())[1:]})
