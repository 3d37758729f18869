"""Training nodes through ComfyUI's own execution on the random-weight SD1.5 checkpoint (64x64, 2-3 steps).

Checks: a run executes as a workflow; the LoRA it writes into models/loras loads in ComfyUI's
stock LoraLoader with every key matched (no "lora key not loaded" logged) and feeds F's NPO
Guider; the in-memory offset equals the file; interrupt saves, resume continues; the user's MODEL
is unchanged afterwards; the ComfyUI run and the command-line run (DiffusersBackend on the same
checkpoint converted to diffusers, same data, seed and LoRA start) agree.
"""
from __future__ import annotations

import logging
import math
import os

import pytest

if not os.environ.get("COMFYUI_PATH"):
    pytest.skip("COMFYUI_PATH is not set (real-ComfyUI tests are opt-in, see docs/comfyui_training.md)",
                allow_module_level=True)

import torch  # noqa: E402
from informative import assert_informative  # noqa: E402

CKPT = "npo_random_sd15_v1.safetensors"


@pytest.fixture(scope="module")
def datasets(comfy):
    """models' sibling `datasets/` of the temp ComfyUI root, with a 3-pair JSONL dataset (64 px PNGs)."""
    import json

    import numpy as np
    from PIL import Image

    import nodes

    from npo_suite.nodes.training import TRAINING_NODES

    for cls in TRAINING_NODES:  # until nodes/extension.py lists TRAINING_NODES (then this is a no-op)
        nodes.NODE_CLASS_MAPPINGS.setdefault(cls.GET_SCHEMA().node_id, cls)
    root = comfy.root / "datasets"
    (root / "pairs3").mkdir(parents=True, exist_ok=True)
    comfy.folder_paths.folder_names_and_paths["npo_datasets"] = ([str(root)], set())
    rng = np.random.default_rng(0)
    lines = []
    for i in range(3):
        for side in ("w", "l"):
            Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(root / "pairs3" / f"{side}{i}.png")
        lines.append({"id": f"p{i}", "prompt": f"a photo of a cat number {i}", "chosen": f"w{i}.png", "rejected": f"l{i}.png"})
    (root / "pairs3" / "pairs.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return root


def train_inputs(**kw):
    d = dict(method="npo", beta=5000.0, lam=0.9, snpo_p=0.5, steps=2, lr=1e-3, lora_rank=4, lora_targets="attn", batch_size=1,
             grad_accum=1, resolution=64, mixed_precision="no", optimizer="adamw", gradient_checkpointing=False, seed=0,
             ref_update_every=0, ref_bound=0.005, ref_on_exceed="freeze", timestep_sampler="uniform",
             timestep_weight="none", output_name="npo_test", resume=False, checkpoint_every=1, init_lora="none",
             extra="")
    d.update(kw)
    return d


class _ProgressSpy:
    """Stands in for ComfyUI's server side of progress: the global ProgressBar hook (previews) and
    PromptServer.instance.send_progress_text (texts), as main.py / server.py wire them."""

    def __init__(self, monkeypatch):
        import comfy.utils as cu
        import server

        self.updates, self.texts = [], []
        monkeypatch.setattr(cu, "PROGRESS_BAR_HOOK", self.hook)
        monkeypatch.setattr(server.PromptServer, "instance", self, raising=False)

    def hook(self, value, total, preview, node_id=None):
        import comfy.model_management as mm

        mm.throw_exception_if_processing_interrupted()  # as main.py's hook does
        self.updates.append((value, total, preview, node_id))

    def send_progress_text(self, text, node_id, sid=None):
        self.texts.append((text, node_id))

    def send_sync(self, *a, **k):
        pass

    def previews(self):
        return [p for *_, p, _ in self.updates if p is not None]


def test_train_in_workflow_then_lora_loader_and_npo_guider(comfy, datasets, caplog, monkeypatch):
    import gc
    import weakref

    import comfy.model_management as mm

    spy = _ProgressSpy(monkeypatch)
    loads = []
    load_models_gpu = mm.load_models_gpu

    def record_loads(models, *a, **k):
        if all(hasattr(getattr(m, "model", None), "diffusion_model") for m in models):  # UNet loads, not VAE/CLIP
            loads.append((k.get("memory_required", 0), [weakref.ref(m) for m in models]))
        return load_models_gpu(models, *a, **k)

    monkeypatch.setattr(mm, "load_models_gpu", record_loads)
    g = {}
    g["1"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}}
    g["2"] = {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 2, "color": 0xC08040}}
    g["3"] = {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 2, "color": 0x303030}}
    g["4"] = {"class_type": "NPOSuite_PreferenceDataset",
              "inputs": {"dataset": "(from images)", "chosen": ["2", 0], "rejected": ["3", 0], "prompt": "a cat"}}
    g["5"] = {"class_type": "NPOSuite_TrainPreferenceLoRA",
              "inputs": {"model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "dataset": ["4", 0],
                         **train_inputs(output_name="wf_npo")}}
    g["6"] = {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a photo of a cat"}}
    g["7"] = {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}}
    g["8"] = {"class_type": "NPOSuite_NPOGuider", "inputs": {
        "model": ["1", 0], "positive": ["6", 0], "negative": ["7", 0], "cfg": 6.0, "negative_offset": ["5", 0],
        "beta": 1.0, "alpha": 0.0, "sigma_min": 0.0, "sigma_max": 0.0}}
    g["9"] = {"class_type": "BasicScheduler", "inputs": {"model": ["1", 0], "scheduler": "normal", "steps": 2, "denoise": 1.0}}
    g["10"] = {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}}
    g["11"] = {"class_type": "RandomNoise", "inputs": {"noise_seed": 3}}
    g["12"] = {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}}
    g["13"] = {"class_type": "SamplerCustomAdvanced", "inputs": {
        "noise": ["11", 0], "guider": ["8", 0], "sampler": ["12", 0], "sigmas": ["9", 0], "latent_image": ["10", 0]}}
    g["14"] = {"class_type": "SaveLatent", "inputs": {"samples": ["13", 0], "filename_prefix": "npo_train/t"}}
    # the loader's output is cached between prompts: read the flags ComfyUI gave the MODEL before training
    loaded = comfy.run({"1": g["1"], "99": {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}}}, ["1"])
    flags = {n: p.requires_grad for n, p in loaded["1"][0][0].model.diffusion_model.named_parameters()}
    out = comfy.run(g, ["1", "5", "13"])
    offset, _model, lora_name, curve, report, grid = out["5"]
    offset, lora_name, curve, report, grid = offset[0], lora_name[0], curve[0], report[0], grid[0]
    assert grid.shape == (1, 64, 64, 3) and float(grid.abs().max()) == 0  # validation off: the blank IMAGE
    # live progress on the node: a text line with the loss per step (rate-limited; first and last always),
    # and a loss-curve preview on the progress bar (at least at the last step)
    assert [t for t, nid in spy.texts if nid == "5" and "loss" in t and "step 2/2" in t], spy.texts
    assert any(v == 2 and tot == 2 and nid == "5" for v, tot, _, nid in spy.updates), spy.updates
    kind, image, size = spy.previews()[-1]
    assert kind == "PNG" and image.mode == "RGB" and image.size[0] > 0 and size
    # memory: the working-set estimate was asked of model management before the steps ...
    reserved = [refs for m, refs in loads if m > 0]
    assert reserved, loads
    # ... and after the node nothing of the run is left: no backend (the node runs ComfyUI's copy of the
    # package, so match by name), no hooks/patches/grads on the UNet, and the training clone of the MODEL's
    # patcher is gone (ComfyUI's loaded-model entry falls back to the user's MODEL, which stays loaded)
    gc.collect()
    assert not [o for o in gc.get_objects() if type(o).__name__ == "ComfyBackend"]
    assert all(r() is None for r in reserved[0])
    model = out["1"][0][0]
    assert model is loaded["1"][0][0]  # the cached loader output: the MODEL the flags were read from
    dm = model.model.diffusion_model
    assert all(not m._forward_hooks and "forward" not in m.__dict__ for m in dm.modules())
    assert all(p.grad is None for p in dm.parameters())
    assert {n: p.requires_grad for n, p in dm.named_parameters()} == flags  # as ComfyUI loaded them
    assert any(lm.model is not None and lm.model.model is model.model for lm in mm.current_loaded_models)  # still loaded
    assert lora_name == "wf_npo.safetensors" and (comfy.root / "loras" / lora_name).is_file()
    # EmptyImage repeats one image: the second pair is a duplicate, counted and skipped
    assert "finished at step 2/2" in report and "1 pairs, 1 skipped" in report and "duplicate_id: 1" in report
    assert curve.ndim == 4 and curve.shape[-1] == 3
    assert torch.isfinite(out["13"][0][0]["samples"]).all()
    assert any(float(d.up.abs().max()) > 0 for d in offset.unet.values())

    # the written file: same deltas as the in-memory offset; stock LoraLoader maps every key
    from npo_suite.core.offsets import load_offset

    back = load_offset(comfy.root / "loras" / lora_name)
    assert set(back.unet) == set(offset.unet)
    for k, d in offset.unet.items():
        assert torch.allclose(back.unet[k].dense(), d.dense(), atol=1e-6), k
    assert back.metadata.get("npo_role") == "negative" and back.metadata.get("npo_method") == "npo"
    # ... and the Load Weight Offset node's report shows its metadata (issue 13: one schema)
    from npo_suite.nodes.offsets import offset_report

    report = offset_report(back, lora_name).splitlines()
    assert {"method: npo", "role: negative", "β: 5000", "steps: 2",
            f"base model hash: {back.metadata['npo_base_model_hash']}"} <= set(report), report
    assert not any(line.startswith("λ") for line in report), report  # NPO has no λ (issue 24): none written
    h = {"1": g["1"], "6": g["6"], "7": g["7"], "9": g["9"], "10": g["10"],
         "20": {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1], "lora_name": lora_name,
                                                       "strength_model": 1.0, "strength_clip": 1.0}},
         "21": {"class_type": "KSampler", "inputs": {"model": ["20", 0], "positive": ["6", 0], "negative": ["7", 0],
                                                     "latent_image": ["10", 0], "seed": 1, "steps": 2, "cfg": 5.0,
                                                     "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
         "22": {"class_type": "SaveLatent", "inputs": {"samples": ["21", 0], "filename_prefix": "npo_train/l"}}}
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        res = comfy.run(h, ["21"])
    assert torch.isfinite(res["21"][0][0]["samples"]).all()
    assert not [r for r in caplog.records if "lora key not loaded" in r.getMessage()]


def _checkpoint(comfy):
    import nodes

    return nodes.CheckpointLoaderSimple().load_checkpoint(CKPT)


@pytest.mark.slow
def test_interrupt_saves_and_resume_continues(comfy, datasets, monkeypatch):
    import comfy.model_management as mm
    from comfy import utils as comfy_utils  # not `import comfy.utils`: that rebinds the `comfy` fixture name

    from npo_suite.nodes.comfy import session
    from npo_suite.nodes.comfy import progress
    from npo_suite.nodes.training import PreferenceDataset, TrainPreferenceLoRA

    with torch.inference_mode():
        model, clip, vae = _checkpoint(comfy)
        data = PreferenceDataset.execute("pairs3", None, None, "").args[0]
    probe = next(iter(model.model.diffusion_model.parameters()))
    before = {k: v.detach().clone() for k, v in list(model.model.diffusion_model.state_dict().items())[:20]}

    def cancel_during_first_step(value, total, preview, node_id=None):
        """main.py's progress hook raises (and clears the flag) once Cancel was pressed."""
        if value >= 1:
            mm.interrupt_current_processing(True)
        mm.throw_exception_if_processing_interrupted()

    monkeypatch.setattr(comfy_utils, "PROGRESS_BAR_HOOK", cancel_during_first_step)
    opts = train_inputs(method="bdpo", steps=3, output_name="resumable")
    with torch.inference_mode(), pytest.raises(mm.InterruptProcessingException):
        TrainPreferenceLoRA.execute(model, clip, vae, data, **opts)
    run = comfy.root / "output" / session.RUNS_SUBDIR / "resumable"
    assert (run / "checkpoints" / "latest").is_file()
    assert (comfy.root / "loras" / "resumable.safetensors").is_file()  # what it had, saved
    assert [s for s, _ in progress.read_losses(run / "metrics.csv")] == [1]  # stopped at the step boundary
    monkeypatch.setattr(comfy_utils, "PROGRESS_BAR_HOOK", None)
    with torch.inference_mode():
        out = TrainPreferenceLoRA.execute(model, clip, vae, data, **{**opts, "resume": True}).args
    assert "finished at step 3/3" in out[4] and "(resumed)" in out[4]
    assert all(p.grad is None for p in model.model.diffusion_model.parameters())
    assert [s for s, _ in progress.read_losses(run / "metrics.csv")] == [1, 2, 3]
    # the user's MODEL: same module tree, no hooks, same weights
    dm = model.model.diffusion_model
    assert all(not m._forward_hooks for m in dm.modules())
    after = dm.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert probe.shape == next(iter(dm.parameters())).shape


def test_diverging_run_stops_with_a_clear_error_and_warns_in_the_progress_text(comfy, datasets, monkeypatch):
    """The node runs the same loop: lr 1e6 gives NaN steps that change nothing, a warning in the node's
    progress text, then NonFiniteError naming the step and causes; nothing is published."""
    from npo_suite.nodes.training import PreferenceDataset, TrainPreferenceLoRA
    from npo_suite.trainer.loop import NonFiniteError

    spy = _ProgressSpy(monkeypatch)
    monkeypatch.setattr("npo_suite.nodes.training._executing_node_id", lambda: "7")
    with torch.inference_mode():
        model, clip, vae = _checkpoint(comfy)
        data = PreferenceDataset.execute("pairs3", None, None, "").args[0]
    opts = train_inputs(method="dpo", steps=12, lr=1e6, output_name="diverged", checkpoint_every=0,
                        extra="max_nonfinite_steps: 3")
    with torch.inference_mode(), pytest.raises(NonFiniteError, match=r"3 consecutive steps .* lr 1e\+06 too high"):
        TrainPreferenceLoRA.execute(model, clip, vae, data, **opts)
    assert any("warning: step" in t and "not finite" in t for t, _ in spy.texts)
    assert not (comfy.root / "loras" / "diverged.safetensors").exists()
    assert all(p.grad is None for p in model.model.diffusion_model.parameters())


U32 = 2.0 ** -24  # float32 unit roundoff


def _n_weight_layers(backend) -> tuple[int, int]:
    """(number of conv/linear layers of the UNet, longest reduction length K = in_features x kernel area)."""
    layers = [m for n, m in backend.unet.named_modules()
              if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) and "lora_" not in n]  # the network, not the LoRA
    ks = [m.weight[0].numel() for m in layers]
    return len(layers), max(ks)


def _policy_grads(backend) -> dict[str, torch.Tensor]:
    return {n: torch.cat([m.lora_A["policy"].weight.grad.flatten(), m.lora_B["policy"].weight.grad.flatten()])
            for n, m in backend._layers}


def _step1_quantities(backend, x0_w, x0_l, cond, t, eps, beta):
    """Policy eps predictions, the four per-sample MSEs, the DPO logit and d(sum of policy MSEs)/d(LoRA) at step 1
    on exactly these inputs (the trainer's own pair_mses / dpo_loss)."""
    from npo_suite.core.schedule import add_noise, gather
    from npo_suite.nodes.comfy.backend import training_mode
    from npo_suite.trainer.losses import dpo_loss
    from npo_suite.trainer.methods import pair_mses

    for p in backend.trainable_parameters():
        p.grad = None
    with training_mode():
        m = pair_mses(backend, x0_w, x0_l, cond, t, eps, None)
        (m.pol_w.sum() + m.pol_l.sum()).backward()
        with torch.no_grad():
            x0 = torch.cat([x0_w, x0_l])
            x_t = add_noise(x0, torch.cat([eps, eps]), gather(backend.abar, torch.cat([t, t]), x0))
            pred = backend.predict_eps(x_t, torch.cat([t, t]), cond.repeat(2), "policy")
    mses = torch.stack([m.pol_w, m.pol_l, m.ref_w, m.ref_l]).detach()  # [4, B]
    logit = dpo_loss(*mses, beta).logit
    return {"eps": assert_informative(pred), "mse": mses, "logit": logit, "grad": _policy_grads(backend)}


def _rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def start_lora(comfy, release_ckpt, sd1_tokenizer_77):
    """A shared LoRA start (random down AND up projections on every attention projection) in models/loras,
    and the command-line backend that made it (its policy adapter is that start)."""
    from npo_suite.core.offsets import offset_from_peft, save_offset
    from npo_suite.core.offsets.types import Offset
    from npo_suite.families.loading import load_model
    from npo_suite.trainer.backends.diffusers import BackendOptions, DiffusersBackend, LoraOptions

    cli = DiffusersBackend.from_bundle(load_model(release_ckpt, family="sd1", tokenizer=sd1_tokenizer_77),
                                       options=BackendOptions(lora=LoraOptions(rank=4, alpha=4.0, seed=9)))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, m in cli._layers:
            m.lora_B["policy"].weight.copy_(torch.randn(m.lora_B["policy"].weight.shape, generator=g) * 0.01)
    path = comfy.root / "loras" / "start.safetensors"
    save_offset(Offset(unet=offset_from_peft(cli.unet, "policy")), path, base=cli.unet)
    return path, cli


@pytest.mark.slow
def test_step1_mses_logit_and_gradients_within_float32_budget(comfy, start_lora, monkeypatch):
    """ComfyUI's UNet and diffusers' UNet, same weights, same LoRA start, EXACTLY the same inputs (latents,
    noise, timesteps, text states taken from the CLI backend): the trainer's step-1 quantities agree within
    a float32 budget derived here, not a tolerance fitted to the observed gap.

    Budget. u = 2^-24. With the SAME attention kernel (PyTorch SDPA on both sides: ComfyUI's attention
    function swapped for its own `attention_pytorch`) the two networks compute the same function in a
    different float32 operation order (fused vs unfused adds, norm paths, the timestep embedding, concat
    order). Reordering a reduction of length K moves its result by <= K*u relative in the worst case and
    ~sqrt(K)*u typically (independent rounding errors); the D conv/linear layers of the network add such
    errors in quadrature: B_eps = sqrt(D)*sqrt(K_max)*u relative on eps (D and K_max are counted from the
    model: ~1.6e-4 for SD1.5). The per-sample MSE over n latent elements then moves by at most (Cauchy-
    Schwarz) 2*rms(r)*rms(d_eps) + rms(d_eps)^2 + n*u*MSE, r = eps_pred - noise; the DPO logit
    -(beta/2)*((m_pw - m_rw) - (m_pl - m_rl)) by beta/2 times the sum of its four MSE budgets - this is the
    amplification (beta/2 = 2500) that made the old trajectory test fail; the gradient of the summed policy
    MSEs by 2*B_eps relative (a backward pass through the same layers after the forward).
    With each host's DEFAULT kernel (ComfyUI on CPU: sub-quadratic chunked attention; diffusers: SDPA) the
    kernel swap is measured on ComfyUI's side on the same inputs (sub-quad vs SDPA, d_k) and added:
    triangle inequality, |comfy_subquad - cli| <= |comfy_subquad - comfy_sdpa| + |comfy_sdpa - cli|.
    """
    import comfy.ldm.modules.attention as attention

    from npo_suite.nodes.comfy.backend import ComfyBackend, training_mode
    from npo_suite.trainer.backends.diffusers import BackendOptions, LoraOptions

    path, cli = start_lora
    gen = torch.Generator().manual_seed(3)
    x0_w, x0_l, eps = (torch.randn(2, 4, 8, 8, generator=gen) for _ in range(3))
    t = torch.tensor([150, 700])
    cond = cli.encode_prompts(["a photo of a cat", "a red sofa"])
    beta = 5000.0
    ref = _step1_quantities(cli, x0_w, x0_l, cond, t, eps, beta)
    with torch.inference_mode():
        model, clip, vae = _checkpoint(comfy)
    with training_mode():
        cb = ComfyBackend.from_comfy(model, clip, vae, options=BackendOptions(lora=LoraOptions(
            rank=4, alpha=4.0, seed=0, init_path=str(path))))
    try:
        default = _step1_quantities(cb, x0_w, x0_l, cond, t, eps, beta)
        monkeypatch.setattr(attention, "optimized_attention", attention.attention_pytorch)
        monkeypatch.setattr(attention, "optimized_attention_masked", attention.attention_pytorch)
        same = _step1_quantities(cb, x0_w, x0_l, cond, t, eps, beta)
    finally:
        cb.close()
    D, K = _n_weight_layers(cli)
    b_eps = (D * K) ** 0.5 * U32
    n = x0_w[0].numel()
    eps_norm = float(ref["eps"].pow(2).mean().sqrt())
    r_rms = torch.cat([ref["mse"][0], ref["mse"][1]]).sqrt()  # rms residual per policy sample
    d_k = {"eps": _rel(default["eps"], same["eps"]), "grad": _rel(torch.cat(list(default["grad"].values())),
                                                                  torch.cat(list(same["grad"].values())))}

    def mse_budget(rel_eps, mses):
        d = rel_eps * eps_norm
        return 2 * mses.sqrt() * d + d * d + n * U32 * mses

    report = {"D": D, "K_max": K, "B_eps": b_eps, "kernel_swap": d_k}
    for label, got, extra in (("same kernel", same, 0.0), ("default kernels", default, d_k["eps"])):
        rel_eps = b_eps + extra
        report[label] = {"eps": _rel(got["eps"], ref["eps"])}
        assert report[label]["eps"] <= rel_eps, (label, report)
        # policy MSEs and the reference (base, no LoRA) MSEs
        budget = mse_budget(rel_eps, ref["mse"])
        diff = (got["mse"] - ref["mse"]).abs()
        report[label]["mse"] = float((diff / budget).max())
        assert (diff <= budget).all(), (label, diff, budget, report)
        logit_budget = beta / 2 * budget.sum(0)
        report[label]["logit"] = float(((got["logit"] - ref["logit"]).abs() / logit_budget).max())
        assert ((got["logit"] - ref["logit"]).abs() <= logit_budget).all(), (label, got["logit"], ref["logit"], report)
        g_ref = torch.cat([ref["grad"][k] for k in sorted(ref["grad"])])
        g_got = torch.cat([got["grad"][k] for k in sorted(ref["grad"])])
        assert_informative(g_ref, g_got, name="step-1 gradients")
        report[label]["grad"] = _rel(g_got, g_ref)
        assert report[label]["grad"] <= 2 * b_eps + (d_k["grad"] if extra else 0.0), (label, report)
    print("step-1 agreement (relative; mse/logit: fraction of budget):", report)
    assert r_rms.min() > 0


@pytest.mark.slow
def test_comfyui_and_cli_first_adamw_step_agree(comfy, datasets, start_lora, tmp_path):
    """The real runs (the node in ComfyUI, `train` on the diffusers backend: same checkpoint, data, seed, LoRA
    start; fp32, DPO, 1 step): the LoRA each run wrote is exactly one AdamW step with the configured lr.

    AdamW's first step with bias correction is theta1 = theta0*(1 - lr*wd) - lr*g/(|g| + eps_adam): per
    element s = -(theta1 - theta0*(1 - lr*wd))/lr = g/(|g| + eps_adam) lies in (-1, 1) and is +-1 up to
    eps_adam/|g| wherever |g| >> eps_adam (1e-8). So, on both sides, |s| <= 1 up to the float32 rounding of
    theta1 - theta0 (u*(|theta0| + |theta1|)/lr per element); and where the CLI's |s| >= 1 - 1e-4 (|g| >=
    1e4*eps_adam), the ComfyUI run's s has the same value up to 1e-4 + that rounding: the gradients there are
    far above their step-1 differences (measured ~4e-5 relative, test above), so no sign can flip; where
    |g| is at the level of round-off, AdamW makes a full +-lr step of either sign (the reason trajectories
    of several steps cannot be compared to float32 precision, see docs/comfyui_training.md), and those
    elements are only required to stay a valid first step. An lr off by 1% on either side fails: |s| up to
    1.01, or saturated elements at 0.99.
    """
    from npo_suite.core.offsets import load_offset, offset_from_peft
    from npo_suite.nodes.training import PreferenceDataset, TrainPreferenceLoRA
    from npo_suite.trainer.config import TrainConfig
    from npo_suite.trainer.loop import train

    path, cli = start_lora
    lr, wd = 1e-3, TrainConfig.weight_decay
    cli.load_lora_file(str(path))  # back to the start (the backend that wrote it; one UNet fewer in memory)
    for p in cli.trainable_parameters():
        p.grad = None
    cfg = TrainConfig(method="dpo", beta=5000.0, steps=1, lr=lr, lora_rank=4, lora_alpha=4.0, resolution=64, seed=0,
                      log_every=1, checkpoint_every=0, output_dir=str(tmp_path / "cli"), data_path=[
                          str(datasets / "pairs3" / "pairs.jsonl")])
    assert train(cfg, backend=cli, data=None).steps_done == 1
    with torch.inference_mode():
        model, clip, vae = _checkpoint(comfy)
        data = PreferenceDataset.execute("pairs3", None, None, "").args[0]
        out = TrainPreferenceLoRA.execute(model, clip, vae, data, **train_inputs(
            method="dpo", steps=1, lr=lr, output_name="agree", init_lora="start.safetensors", checkpoint_every=0)).args
    ours, theirs = out[0].unet, offset_from_peft(cli.unet, "policy")
    first = load_offset(path).unet
    assert set(ours) == set(theirs) == set(first)
    s_comfy, s_cli, tol = [], [], []
    for k in sorted(first):
        for part in ("down", "up"):
            t0 = getattr(first[k], part).float()
            for side, off in ((s_comfy, ours), (s_cli, theirs)):
                t1 = getattr(off[k], part).float()
                side.append((-(t1 - t0 * (1 - lr * wd)) / lr).flatten())
            t1 = getattr(ours[k], part).float()
            tol.append((2 * U32 * (t0.abs() + t1.abs()) / lr + 1e-6).flatten())
    s_comfy, s_cli, tol = torch.cat(s_comfy), torch.cat(s_cli), torch.cat(tol)
    assert_informative(s_comfy, s_cli, name="first-step updates / lr")
    for name, s in (("comfyui", s_comfy), ("cli", s_cli)):
        over = s.abs() - 1 - tol
        assert (over <= 0).all(), f"{name}: |update/lr| up to {float(s.abs().max()):.6f} > 1: not one AdamW step at lr {lr}"
    sat = s_cli.abs() >= 1 - 1e-4
    gap = (s_comfy - s_cli).abs()[sat]
    assert int(sat.sum()) >= 1000, int(sat.sum())  # enough elements far above eps_adam for the lr check (measured: 35%)
    assert (gap <= 1e-4 + tol[sat]).all(), (f"{int((gap > 1e-4 + tol[sat]).sum())} of {int(sat.sum())} saturated "
                                             f"elements differ, max {float(gap.max()):.3g}")
    print(f"first AdamW step: {int(sat.sum())} of {s_cli.numel()} elements saturated, max |s_comfy - s_cli| there "
          f"{float(gap.max()):.3g}; unsaturated elements of opposite sign: "
          f"{int(((s_comfy * s_cli) < 0).sum())}")


def _prompt_list_run(comfy, method: str, extra: str, with_images: bool, caplog):
    """Prompt List -> Train Preference LoRA (2 steps, 64 px) in a workflow, then LoraLoader + KSampler."""
    g = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}},
         "3": {"class_type": "NPOSuite_PromptList", "inputs": {
             "source": "(from text)", "prompts": "a photo of a red cat\n# comment\na blue dog in the park",
             "ddspo_min_frac": 0.4, "ddspo_max_frac": 0.7, "preview_seed": 0}}}
    if with_images:  # DDSPO trains on (prompt, winner image) rows
        g["2"] = {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 2, "color": 0x4080C0}}
        g["3"]["inputs"]["images"] = ["2", 0]
    name = f"wf_{method}"
    g["5"] = {"class_type": "NPOSuite_TrainPreferenceLoRA", "inputs": {
        "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "dataset": ["3", 0],
        **train_inputs(method=method, output_name=name, checkpoint_every=0, extra=extra)}}
    out = comfy.run(g, ["5"])["5"]
    offset, lora_name, report = out[0][0], out[2][0], out[4][0]
    assert lora_name == f"{name}.safetensors" and "finished at step 2/2" in report, report
    from npo_suite.nodes.comfy import session
    from npo_suite.nodes.comfy import progress

    losses = progress.read_losses(comfy.root / "output" / session.RUNS_SUBDIR / name / "metrics.csv")
    assert [s for s, _ in losses] == [1, 2] and all(math.isfinite(v) for _, v in losses), losses
    h = {"1": g["1"],
         "6": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a photo of a cat"}},
         "7": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
         "10": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
         "20": {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1], "lora_name": lora_name,
                                                       "strength_model": 1.0, "strength_clip": 1.0}},
         "21": {"class_type": "KSampler", "inputs": {"model": ["20", 0], "positive": ["6", 0], "negative": ["7", 0],
                                                     "latent_image": ["10", 0], "seed": 1, "steps": 1, "cfg": 5.0,
                                                     "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
         "22": {"class_type": "SaveLatent", "inputs": {"samples": ["21", 0], "filename_prefix": f"npo_train/{method}"}}}
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        res = comfy.run(h, ["21"])
    assert torch.isfinite(res["21"][0][0]["samples"]).all()
    assert not [r for r in caplog.records if "lora key not loaded" in r.getMessage()]
    return offset, comfy.root / "loras" / lora_name


def _lora_keys(path):
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return set(f.keys()), dict(f.metadata() or {})


@pytest.mark.slow
def test_tdft_self_npo_from_prompt_list(comfy, datasets, caplog):
    """Self-NPO/TDFT in ComfyUI: data-free (prompts only), the EMA teacher stays out of the file."""
    from npo_suite.core.offsets import load_offset

    offset, path = _prompt_list_run(comfy, "tdft", "tdft_k: 1\n", False, caplog)
    keys, meta = _lora_keys(path)
    assert meta.get("npo_method") == "tdft" and meta.get("npo_role") == "negative"
    assert not [k for k in keys if "ema" in k.lower()]
    modules = {k.split(".")[0] for k in keys}
    assert len(keys) == 3 * len(modules)  # one lora_down / lora_up / alpha per module: one adapter only
    back = load_offset(path)
    assert set(back.unet) == set(offset.unet)  # the policy, as the node's offset output
    for k, d in offset.unet.items():
        assert torch.allclose(back.unet[k].dense(), d.dense(), atol=1e-6), k


@pytest.mark.slow
def test_ddspo_from_prompt_list_with_winner_images(comfy, datasets, caplog):
    offset, path = _prompt_list_run(comfy, "ddspo", "ddspo_beta: 16000\nddspo_loser: other\n", True, caplog)
    keys, meta = _lora_keys(path)
    assert meta.get("npo_method") == "ddspo" and meta.get("npo_role") == "positive"
    assert len(keys) == 3 * len({k.split(".")[0] for k in keys})
    assert any(float(d.up.abs().max()) > 0 for d in offset.unet.values())


@pytest.mark.slow
def test_validation_grid_output(comfy, datasets):
    """validate_every / validation_prompts (optional inputs): the last grid is the node's 6th output."""
    from npo_suite.nodes.training import PreferenceDataset, TrainPreferenceLoRA

    with torch.inference_mode():
        model, clip, vae = _checkpoint(comfy)
        data = PreferenceDataset.execute("pairs3", None, None, "").args[0]
        out = TrainPreferenceLoRA.execute(model, clip, vae, data, **train_inputs(
            steps=2, output_name="validated", checkpoint_every=0,
            extra="validation_sample_steps: 2\nvalidation_seeds: [0]\n"),
            validate_every=2, validation_prompts="a photo of a cat\na dog").args
    grid, report = out[5], out[4]
    assert grid.shape == (1, 2 * 64, 2 * 64, 3), grid.shape  # rows: 2 prompts; columns: 1 seed x (base, LoRA)
    assert torch.isfinite(grid).all() and "validation grid: step_000002.png" in report
    assert (comfy.root / "output" / "npo_suite_runs" / "validated" / "validation" / "step_000002.png").is_file()


def test_node_widgets_are_trainconfig_fields(comfy, datasets):
    """Issue 13: the node's widgets carry TrainConfig's names, defaults, ranges and help (one source:
    the fields; the node once had steps 500 / checkpoint_every 100 and renamed rank, precision)."""
    import dataclasses

    import nodes

    from npo_suite.trainer.config import TrainConfig
    from npo_suite.trainer.methods import METHODS
    from npo_suite.nodes.comfy.session import NODE_ONLY, NODE_WIDGETS

    spec = nodes.NODE_CLASS_MAPPINGS["NPOSuite_TrainPreferenceLoRA"].INPUT_TYPES()
    inputs = {**spec["required"], **spec.get("optional", {})}
    assert [n for n in inputs if n not in ("model", "clip", "vae", "dataset")] == list(NODE_WIDGETS)
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    for name in NODE_WIDGETS:
        if name in NODE_ONLY:
            continue
        opts = inputs[name][1]
        assert opts["default"] == fields[name].default, name
        assert opts["tooltip"] == fields[name].metadata["help"], name
    assert inputs["steps"][1]["default"] == 1000 and inputs["checkpoint_every"][1]["default"] == 500
    assert list(inputs["method"][1].get("options") or inputs["method"][0]) == list(METHODS)
    assert inputs["beta"][1]["min"] == fields["beta"].metadata["min"] and inputs["lora_rank"][1]["max"] == 256
