"""Train Preference LoRA on ComfyUI's flow DiTs (issue 22): tiny random SD3 (MMDiT) and Flux built from
ComfyUI's own classes (dit_build.py), the tiny CLIP, a 16-channel TAESD VAE; fp32 on CPU, 2 steps, 64 px.

Checked:
- the backend's velocity equals ComfyUI's own model call: `BaseModel.apply_model` (what every sampler
  calls), denoised output converted v = (x_t − x0)/σ, on the same x_t, σ and CLIP conditioning, base
  (every adapter off) and with the LoRA active (ComfyUI's LoRA loader on the file the backend writes);
  so does the per-sample flow error the losses are built on; the LoRA gradient through ComfyUI's Flux
  (whose blocks add residuals in place) equals a finite difference;
- the node runs dpo and npo: a kohya file on ComfyUI's module names (`lora_unet_*` + `.alpha`, `ss_*`,
  `npo_family`) that ComfyUI's LoRA loader consumes entirely (no "lora key not loaded", one patch per
  module), trained (output differs from the base), equal to the in-memory NPO_OFFSET, whose keys the
  sampling nodes' key map resolves; the user's MODEL is unchanged; the working set is estimated on the
  model's own config, reported and reserved with model management (`memory_required`); npo also draws its
  validation grid (flow Euler on the backend's velocities);
- every method of the registry runs through the node on one of the two families (2 steps; TDFT on a prompt
  list, DDSPO on prompts with winner images), its memory estimate reported;
- the diffusers config mapped from ComfyUI's model config builds a transformer of ComfyUI's parameter count,
  and its traced working set matches two real steps on ComfyUI's model (see the test for the tolerance);
- a ComfyUI model family the trainer does not train (Wan 2.1) is refused with its name.

Tolerances: the backend calls the same diffusion model with the same arguments as `_apply_model`; the
only difference is ComfyUI's x0 = x_t − σ·v and our (x_t − x0)/σ, a rounding of |x_t|/σ·2⁻²⁴ ≈ 1e-7
relative: bound 1e-5. With the LoRA: ComfyUI merges W + s·up·down, the backend adds s·up(down(x)): fp32
summation order, measured ~1e-7 on these models (tests/comfyui/test_dit_npo.py, same models): bound 1e-5.
Finite difference: central, h = 1e-2 along g/|g| (g: the gradient of every LoRA parameter), fp32 losses
of order 1: rounding ~1e-7/h = 1e-5 against |g| ~ 3e-2..5e-2, plus the O(h²) curvature term: measured 2e-6
(SD3), 4e-4 (Flux); bound 5e-3 relative.
"""
from __future__ import annotations

import logging
import os

import pytest

if not os.environ.get("COMFYUI_PATH"):
    pytest.skip("COMFYUI_PATH is not set (real-ComfyUI tests are opt-in, see docs/comfyui.md)", allow_module_level=True)

import torch  # noqa: E402

import dit_build  # noqa: E402
from informative import assert_informative  # noqa: E402

RTOL = 1e-5
BUILDERS = {"sd3": dit_build.tiny_sd3, "flux": dit_build.tiny_flux}
PROMPTS = ["a photo of a red cube", "a blue house by a lake"]


def rel(a, b):
    assert_informative(a, b, name="compared velocities")
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module", params=list(BUILDERS))
def fam(request, comfy_runtime):
    class F:
        name = request.param
        model = BUILDERS[request.param]()
        clip = dit_build.tiny_clip()
        vae = dit_build.tiny_vae16()
        root = comfy_runtime.root
    return F


def _backend(f, gradient_checkpointing=False, **lora):
    from npo_suite.nodes.comfy.backends import backend_for
    from npo_suite.trainer.backends.diffusers import BackendOptions, LoraOptions

    opts = BackendOptions(lora=LoraOptions(**{"rank": 2, "alpha": 2, **lora}), gradient_checkpointing=gradient_checkpointing)
    return backend_for(f.model, f.clip, f.vae, options=opts)


def comfy_v(f, patcher, x, sigma, cond):
    """ComfyUI's model call (the sampler's `apply_model`) converted to velocity: v = (x_t − x0)/σ."""
    import comfy.model_management as mm

    mm.load_models_gpu([patcher], force_full_load=True)
    extra = {"guidance": torch.ones(x.shape[0])} if f.name == "flux" else {}  # the backend's training guidance 1.0
    with torch.no_grad():
        x0 = patcher.model.apply_model(x, sigma, c_crossattn=cond.hidden, y=cond.added["pooled_projections"], **extra)
    return (x - x0) / sigma.reshape(-1, 1, 1, 1)


def test_velocity_and_loss_equal_comfyui_model_call(fam, tmp_path):
    import comfy.sd
    import comfy.utils

    from npo_suite.core import flow as fl
    from npo_suite.nodes.comfy.backend import training_mode

    with training_mode():
        b = _backend(fam)
        try:
            assert b.prediction_type == "flow" and b.abar is None and b.is_transformer
            cond = b.encode_prompts(PROMPTS)
            g = torch.Generator().manual_seed(0)
            x0 = b.encode_images(torch.rand(2, 3, 64, 64, generator=g) * 2 - 1)  # [2, 16, 8, 8]
            eps = torch.randn(x0.shape, generator=g)
            sigma = torch.tensor([0.3, 0.75])
            x_t = fl.interpolate(x0, eps, sigma)  # ComfyUI's CONST noise_scaling: σ·ε + (1 − σ)·x0
            with torch.no_grad():
                ours_base = b.predict_v(x_t, sigma, cond, adapter=None)
            # a non-zero LoRA (up-projections start at zero): random ups, then the file the backend writes
            with torch.no_grad():
                for p in b.trainable_parameters():
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
                ours_lora = b.predict_v(x_t, sigma, cond)
            path = b.write_lora(tmp_path / "v.safetensors", {"npo_method": "dpo"})
            # the gradient through ComfyUI's blocks (Flux adds residuals in place) vs a central difference
            # along the normalised gradient itself (the largest directional derivative: |g|)
            params = b.trainable_parameters()
            loss = fl.flow_mse(b.predict_v(x_t, sigma, cond), x0, eps, x_t, sigma, "v").sum()
            loss.backward()
            grads = [p.grad.detach().clone() for p in params]
            norm = float(torch.sqrt(sum((gr * gr).sum() for gr in grads)))
            analytic = norm  # <g, g/|g|>
            h = 1e-2
            with torch.no_grad():
                vals = []
                for s in (h, -h):
                    for p, gr in zip(params, grads):
                        p.add_(gr * (s / norm))
                    vals.append(float(fl.flow_mse(b.predict_v(x_t, sigma, cond), x0, eps, x_t, sigma, "v").sum()))
                    for p, gr in zip(params, grads):
                        p.sub_(gr * (s / norm))
            numeric = (vals[0] - vals[1]) / (2 * h)
        finally:
            b.close()
    theirs_base = comfy_v(fam, fam.model, x_t, sigma, cond)  # after close(): the user's MODEL, no hooks left
    lora = comfy.utils.load_torch_file(str(path), safe_load=True)
    patched, _ = comfy.sd.load_lora_for_models(fam.model, None, lora, 1.0, 0)
    theirs_lora = comfy_v(fam, patched, x_t, sigma, cond)
    r_base, r_lora = rel(ours_base, theirs_base), rel(ours_lora, theirs_lora)
    print(f"{fam.name}: base rel {r_base:.1e}, LoRA rel {r_lora:.1e}, LoRA vs base {rel(ours_lora, ours_base):.1e}, "
          f"grad {analytic:.6g} vs finite difference {numeric:.6g}")
    assert r_base < RTOL and r_lora < RTOL
    assert rel(ours_lora, ours_base) > 1e-2
    # the per-sample flow error (what every flow loss is built from) on both
    mse = fl.flow_mse(ours_lora, x0, eps, x_t, sigma, "v")
    assert torch.allclose(mse, fl.flow_mse(theirs_lora, x0, eps, x_t, sigma, "v"), rtol=1e-5, atol=0)
    assert abs(analytic - numeric) <= 5e-3 * abs(numeric) and abs(numeric) > 0


def _data():
    from npo_suite.nodes.training import PreferenceDataset

    g = torch.Generator().manual_seed(1)
    chosen, rejected = torch.rand(2, 64, 64, 3, generator=g), torch.rand(2, 64, 64, 3, generator=g)
    return PreferenceDataset.execute("(from images)", chosen, rejected, "\n".join(PROMPTS)).args[0]


def _inputs(method, name):
    return dict(method=method, beta=5000.0, lam=0.9, snpo_p=0.5, steps=2, lr=1e-2, lora_rank=2, lora_targets="attn",
                batch_size=1, grad_accum=1, resolution=64, mixed_precision="no", optimizer="adamw",
                gradient_checkpointing=False, seed=0, ref_update_every=0, ref_bound=0.005, ref_on_exceed="freeze",
                timestep_sampler="uniform", timestep_weight="none", output_name=name, resume=False,
                checkpoint_every=0, init_lora="none", extra="")


def _record_reservations(monkeypatch) -> list[int]:
    """memory_required of every load of a diffusion model (not CLIP / VAE) asked of model management."""
    import comfy.model_management as mm

    reserved, load = [], mm.load_models_gpu

    def record(models, *a, **k):
        if all(hasattr(getattr(m, "model", None), "diffusion_model") for m in models):
            reserved.append(k.get("memory_required", 0))
        return load(models, *a, **k)

    monkeypatch.setattr(mm, "load_models_gpu", record)
    return reserved


@pytest.mark.parametrize("method", ["dpo", "npo"])
def test_training_node_writes_a_lora_comfyui_loads(fam, method, caplog, monkeypatch):
    import comfy.lora
    import comfy.lora_convert
    import comfy.sd
    import comfy.utils
    from safetensors import safe_open

    from npo_suite.core.offsets import load_offset_file_keys
    from npo_suite.nodes.comfy.branch import model_deltas
    from npo_suite.nodes.training import TrainPreferenceLoRA

    dm = fam.model.model.diffusion_model
    flags = {n: p.requires_grad for n, p in dm.named_parameters()}
    name = f"dit_{fam.name}_{method}"
    inputs = _inputs(method, name)
    if method == "npo":  # a validation grid at the last step (flow Euler, NPO guidance), 2 sampler steps
        inputs.update(validate_every=2, validation_prompts=PROMPTS[0],
                      extra="validation_sample_steps: 2\nvalidation_seeds: [0]\nvalidation_guidance: 3.0")
    reserved = _record_reservations(monkeypatch)
    with torch.inference_mode():  # as ComfyUI runs a node
        out = TrainPreferenceLoRA.execute(fam.model, fam.clip, fam.vae, _data(), **inputs).args
    offset, _patched, lora_name, _curve, report, grid = out
    assert "finished at step 2/2" in report, report
    if method == "npo":  # rows: prompts; columns: seed x (base, LoRA): 1 x 2 tiles of 64 px
        assert "validation grid: step_000002.png" in report and grid.shape[1:3] == (64, 128), (report, grid.shape)
        assert_informative(grid[:, :, :64], grid[:, :, 64:], name="validation tiles")
    # memory: the traced estimate of this model's config, in the report and asked of model management
    assert "memory: training memory estimate" in report and "reserved with model management" in report, report
    assert f"traced on ComfyUI's {type(fam.model.model).__name__}" in report, report
    assert [m for m in reserved if m > 0], reserved
    path = fam.root / "loras" / lora_name
    with safe_open(str(path), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    modules = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in keys}
    assert all(k.startswith("lora_unet_") and k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in keys)
    assert len(keys) == 3 * len(modules)
    want = {"sd3": ("sd3", "sd3"), "flux": ("flux", "flux1")}[fam.name]
    assert (meta["npo_family"], meta["ss_base_model_version"]) == want
    assert meta["npo_method"] == method and meta["npo_role"] == {"dpo": "positive", "npo": "negative"}[method]
    assert meta["ss_network_dim"] == "2" and meta["npo_trained_in"] == "comfyui"
    if fam.name == "flux":
        assert meta["npo_flux_guidance"] == "1"
    # ComfyUI's loader: every key consumed, one weight patch per module
    lora = comfy.utils.load_torch_file(str(path), safe_load=True)
    key_map = comfy.lora.model_lora_keys_unet(fam.model.model, {})
    assert modules <= set(key_map)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        patches = comfy.lora.load_lora(comfy.lora_convert.convert_lora(dict(lora)), key_map)
        patched, _ = comfy.sd.load_lora_for_models(fam.model, None, lora, 1.0, 0)
    bad = [r.getMessage() for r in caplog.records if "lora key not loaded" in r.getMessage() or "NOT LOADED" in r.getMessage()]
    assert not bad and len(patches) == len(modules)
    # trained: the LoRA changes the model's output (ComfyUI's own call)
    b_cond = _cond(fam)
    x = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(5))
    sigma = torch.tensor([0.6])
    assert rel(comfy_v(fam, patched, x, sigma, b_cond), comfy_v(fam, fam.model, x, sigma, b_cond)) > 1e-4
    # the in-memory NPO_OFFSET is the file, and the sampling nodes' key map resolves all of it
    back = load_offset_file_keys(path)
    assert offset.file_keys and set(offset.unet) == set(back.unet) == modules
    for k, d in offset.unet.items():
        torch.testing.assert_close(back.unet[k].dense(), d.dense(), rtol=0, atol=1e-7)
    m = model_deltas(offset, fam.model)
    assert not m.unmatched and m.applied == len(offset.unet)
    # the user's MODEL: no hooks or forward patches, no grads, ComfyUI's flags
    assert all(not mod._forward_hooks and "forward" not in mod.__dict__ for mod in dm.modules())
    assert all(p.grad is None for p in dm.parameters())
    assert {n: p.requires_grad for n, p in dm.named_parameters()} == flags


def _cond(f):
    from npo_suite.core.cond import Cond

    c, pooled = f.clip.encode_from_tokens(f.clip.tokenize(PROMPTS[0]), return_pooled=True)
    return Cond(c.float(), {"pooled_projections": pooled.float()})


def test_unsupported_family_and_targets_are_named(fam):
    from npo_suite.nodes.comfy.backend import training_mode
    from npo_suite.nodes.comfy.backends import backend_for

    wan = dit_build.tiny_wan()
    with training_mode(), pytest.raises(ValueError, match=r"Wan 2\.1 \(WAN21\) with FLOW prediction.*does not train"):
        backend_for(wan, fam.clip, None)
    with training_mode(), pytest.raises(ValueError, match="matched no module"):
        _backend(fam, targets="to_q,to_k")  # diffusers names: ComfyUI's modules are the fused qkv


def test_gradient_checkpointing_gives_the_same_gradient(fam):
    """Per-block activation checkpointing (Flux's blocks add to their inputs in place: they run on copies)
    gives the gradient of the plain backward; fp32, measured 0 (SD3) and 9e-6 (Flux) relative: bound 1e-4."""
    from npo_suite.nodes.comfy.backend import training_mode

    grads = []
    for checkpointing in (False, True):
        with training_mode():
            b = _backend(fam, gradient_checkpointing=checkpointing)
            try:
                cond = b.encode_prompts(PROMPTS)
                g = torch.Generator().manual_seed(0)
                with torch.no_grad():
                    for p in b.trainable_parameters():
                        p.copy_(torch.randn(p.shape, generator=g) * 0.1)
                x = torch.randn(2, 16, 8, 8, generator=g)
                b.predict_v(x, torch.tensor([0.3, 0.7]), cond).pow(2).mean().backward()
                grads.append(torch.cat([p.grad.flatten() for p in b.trainable_parameters()]))
            finally:
                b.close()
    assert rel(grads[1], grads[0]) < 1e-4


def test_init_lora_starts_from_the_written_file(fam, tmp_path):
    """`init_lora`: a file the backend wrote (alpha 4, rank 2) read back through ComfyUI's key map into a run
    with alpha 2 (the scale folded into the ups) gives the same velocity; another rank is refused."""
    from npo_suite.nodes.comfy.backend import training_mode

    g = torch.Generator().manual_seed(2)
    x, sigma = torch.randn(2, 16, 8, 8, generator=g), torch.tensor([0.4, 0.9])
    with training_mode():
        a = _backend(fam, alpha=4.0)
        try:
            cond = a.encode_prompts(PROMPTS)
            with torch.no_grad():
                for p in a.trainable_parameters():
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
                va = a.predict_v(x, sigma, cond)
            path = a.write_lora(tmp_path / "init.safetensors", {})
        finally:
            a.close()
        b = _backend(fam, init_path=str(path))
        try:
            with torch.no_grad():
                vb = b.predict_v(x, sigma, cond)
        finally:
            b.close()
        with pytest.raises(ValueError, match="rank 2, this run uses lora rank 4"):
            _backend(fam, rank=4, alpha=4.0, init_path=str(path))
    assert rel(vb, va) < 1e-6  # the same LoRA: identical ops, only up·(alpha/rank) rounded once


def test_transformer_config_builds_comfyuis_model_in_diffusers(fam):
    """The diffusers config mapped from ComfyUI's model config (`model_config.unet_config`) builds a transformer
    with ComfyUI's parameter count, matrix for matrix (shapes as multisets; the fused qkv of ComfyUI is three
    matrices in diffusers, so a 3D x D matrix counts as three D x D ones)."""
    import collections

    import diffusers

    from npo_suite.nodes.comfy.memory import transformer_config

    cfg = transformer_config(type(fam.model.model).__name__, fam.model.model.model_config.unet_config)
    with torch.device("meta"):
        net = getattr(diffusers, cfg["_class_name"]).from_config(cfg)
    ours = sum(p.numel() for p in net.parameters())
    theirs = sum(p.numel() for p in fam.model.model.diffusion_model.parameters())
    assert ours == theirs, (cfg, ours, theirs)
    assert collections.Counter(p.ndim for p in net.parameters() if p.ndim >= 2)  # built something


def _measured_step(b, cfg, batch):
    """Bytes the allocator holds beyond the loaded weights over two real steps of `cfg.method` on `batch`
    (PyTorch's CPU allocator, profiler memory events: `memory_estimate.allocator_peak`), plus the LoRA
    made before the measurement (the estimate counts it): the UNet node's measure
    (tests/test_comfy_backend_logic.py::test_memory_estimate_for_backend_against_its_real_step)."""
    from npo_suite.trainer.loop import build_optimizer
    from npo_suite.trainer.memory_estimate import allocator_peak
    from npo_suite.trainer.methods import METHODS

    gen = torch.Generator().manual_seed(0)
    lora = sum(p.numel() * p.element_size() for p in b.trainable_parameters())

    def two_steps():
        opt = build_optimizer(cfg, b.trainable_parameters())
        for _ in range(2):
            METHODS[cfg.method].compute(b, batch, cfg, gen).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return opt

    _, measured = allocator_peak(two_steps)
    return measured + lora


def test_memory_estimate_against_the_real_step(fam, monkeypatch):
    """The DiT node's reservation: the trace of diffusers' transformer built from ComfyUI's model config,
    host-encoded (the shapes of ComfyUI's CLIP and VAE), less the transformer's weights, scaled by
    `COMFY_BLOCKS_FACTOR` (what ComfyUI's blocks keep for backward beyond diffusers'), against two real steps on
    ComfyUI's own model (the UNet node's measure). Attention: PyTorch's SDPA, what ComfyUI runs on an NVIDIA
    GPU and what the trace assumes; on CPU ComfyUI picks its sub-quadratic attention, whose saved score chunks
    grow with the tokens squared (measured ratio 0.69 at 256 px for SD3): not a GPU run's working set.
    Measured estimate/measured 0.958 (SD3), 1.011 (Flux) (2026-12-05, torch 2.13 CPU, fp32). 5 % allowed, as
    for the UNet node: LoRA layout (fused qkv), kernels' scratch buffers and the optimizer's bookkeeping differ
    by torch version; a missing component (the LoRA's optimizer state, an adapter, the activations of a forward)
    is far more."""
    import comfy.ldm.flux.math as flux_math
    import comfy.ldm.modules.attention as attention
    import comfy.ldm.modules.diffusionmodules.mmdit as mmdit

    from npo_suite.nodes.comfy.backend import training_mode
    from npo_suite.nodes.comfy.memory import memory_estimate_for
    from npo_suite.trainer.batches import PairBatch
    from npo_suite.trainer.config import TrainConfig
    from npo_suite.trainer.stream import latent_shape

    cfg = TrainConfig(method="dpo", resolution=64, batch_size=2, lora_rank=2, lora_alpha=2, grad_accum=1, cache_dir="c")
    with training_mode():
        b = _backend(fam)
        try:
            est = memory_estimate_for(b, cfg)
            shape = latent_shape(b, cfg.resolution)
            assert shape == (16, 8, 8)
            g = torch.Generator().manual_seed(0)
            batch = PairBatch(torch.randn(2, *shape, generator=g), torch.randn(2, *shape, generator=g),
                              b.encode_prompts(PROMPTS), PROMPTS)
            monkeypatch.setattr(mmdit, "optimized_attention", attention.attention_pytorch)
            monkeypatch.setattr(flux_math, "optimized_attention", attention.attention_pytorch)
            measured = _measured_step(b, cfg, batch)
        finally:
            b.close()
    print(f"{fam.name}: {est.report()}; measured {measured / 2**20:.3f} MiB, "
          f"estimate/measured {est.total / measured:.4f}")
    assert f"ComfyUI's {type(fam.model.model).__name__}" in est.model
    assert est.total == pytest.approx(measured, rel=0.05), (est.report(), measured / 2**20)


def _method_runs():
    """Every registered method on one family (alternating), dpo and npo on both (the test above)."""
    from npo_suite.trainer.methods import METHODS

    others = [m for m in METHODS if m not in ("dpo", "npo")]
    return [(m, list(BUILDERS)[i % len(BUILDERS)]) for i, m in enumerate(others)]


@pytest.mark.parametrize("method,family", _method_runs())
def test_every_method_trains_through_the_node(comfy_runtime, method, family, monkeypatch):
    """The registry's other methods through the DiT node (2 steps, 64 px): finished, finite losses, a trained
    LoRA (non-zero ups), the method in the file, the estimate reported and reserved. TDFT trains on a prompt
    list (data-free, its EMA teacher on the flow model), DDSPO on prompts with winner images, as the UNet
    node's tests feed them (tests/comfyui/test_training_nodes.py)."""
    from safetensors import safe_open

    from npo_suite.core.offsets import load_offset_file_keys
    from npo_suite.nodes.training import PromptList, TrainPreferenceLoRA
    from npo_suite.trainer.methods import METHODS

    model, clip, vae = BUILDERS[family](), dit_build.tiny_clip(), dit_build.tiny_vae16()
    kind = METHODS[method].data_kind
    if kind == "pairs":
        data = _data()
    else:
        images = torch.rand(2, 64, 64, 3, generator=torch.Generator().manual_seed(3))
        data = PromptList.execute("(from text)", "\n".join(PROMPTS),
                                  images if kind == "prompts_with_winners" else None).args[0]
    extra = {"tdft": "tdft_k: 1\n", "ddspo": "ddspo_beta: 16000\nddspo_loser: other\n"}.get(method, "")
    inputs = dict(_inputs(method, f"dit_{family}_{method}"), extra=extra)
    reserved = _record_reservations(monkeypatch)
    with torch.inference_mode():
        out = TrainPreferenceLoRA.execute(model, clip, vae, data, **inputs).args
    offset, report = out[0], out[4]
    assert "finished at step 2/2" in report and "non-finite" not in report, report
    assert "memory: training memory estimate" in report and [m for m in reserved if m > 0], (report, reserved)
    assert any(float(d.up.abs().max()) > 0 for d in offset.unet.values())
    path = comfy_runtime.root / "loras" / out[2]
    with safe_open(str(path), "pt") as f:
        assert f.metadata()["npo_method"] == method
    assert set(load_offset_file_keys(path).unet) == set(offset.unet)
