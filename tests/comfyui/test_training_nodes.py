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


def _with_text_model_prefix(src, dst):
    """A copy of the harness checkpoint in the SD1.5 release layout for diffusers' single-file loader.

    The harness writes CLIP keys as `cond_stage_model.transformer.embeddings...` (transformers 5's
    CLIPTextModel has no `text_model.` level); ComfyUI accepts that, diffusers only recognises the
    release layout `cond_stage_model.transformer.text_model.embeddings...`. Same tensors, renamed keys.
    """
    from safetensors.torch import load_file, save_file

    pre = "cond_stage_model.transformer."
    sd = load_file(str(src))
    save_file({(pre + "text_model." + k[len(pre):] if k.startswith(pre) and not k.startswith(pre + "text_model.")
                else k): v for k, v in sd.items()}, str(dst))
    return dst


@pytest.mark.slow
def test_comfyui_and_cli_runs_agree(comfy, datasets, tmp_path):
    """Same checkpoint (converted to diffusers for the CLI backend), data, seed and LoRA start (fp32, 2 steps).

    Tolerance: ComfyUI's UNet/CLIP/VAE implementations and diffusers' differ in operation order
    (observed: losses differ by ~4e-4 relative). Per-step losses agree to rel 2e-3 (step 2's loss already
    depends on step 1's update). The LoRA changes made by training (trained minus start) agree to rel
    1e-2 in Frobenius norm over all layers and 5e-2 per layer (observed: all 2.6e-3; per layer median 4e-4,
    worst 1.3e-2: AdamW divides by sqrt(v), so an element whose gradient is near round-off takes a +-lr
    step of either sign).
    Not compared: the mid block's self-attention to_q/to_k. At 64 px the mid block sees a 1x1 latent,
    one token: softmax over one key is constant, the true gradient of q and k is exactly zero, and AdamW
    turns each implementation's round-off there into lr-sized steps (observed rel difference ~1.0).
    """
    from npo_suite.families.loading import load_model
    from npo_suite.core.offsets.types import Offset
    from npo_suite.core.offsets import load_offset, offset_from_peft, save_offset
    from npo_suite.nodes.comfy import session
    from npo_suite.nodes.comfy import progress
    from npo_suite.nodes.training import PreferenceDataset, TrainPreferenceLoRA
    from npo_suite.trainer.backends.diffusers import BackendOptions, DiffusersBackend, LoraOptions
    from npo_suite.trainer.config import TrainConfig
    from npo_suite.trainer.loop import train

    # ComfyUI's own tokenizer folder as it is (its config says model_max_length 8192: the CLI backend
    # takes the text encoder's 77, core.conditioning.prompt_length).
    tok = os.path.join(os.environ["COMFYUI_PATH"], "comfy", "sd1_tokenizer")
    ckpt = _with_text_model_prefix(comfy.root / "checkpoints" / CKPT, tmp_path / "sd15.safetensors")
    bundle = load_model(ckpt, family="sd1", tokenizer=tok)
    # a shared LoRA start: random down AND up projections on every attention projection
    start = DiffusersBackend.from_bundle(bundle, options=BackendOptions(lora=LoraOptions(rank=4, alpha=4.0, seed=9)))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, m in start._layers:
            m.lora_B["policy"].weight.copy_(torch.randn(m.lora_B["policy"].weight.shape, generator=g) * 0.01)
    save_offset(Offset(unet=offset_from_peft(start.unet, "policy")), comfy.root / "loras" / "start.safetensors",
                base=start.unet)
    start.unet.delete_adapters(["policy"])
    bundle = load_model(ckpt, family="sd1", tokenizer=tok)
    cli = DiffusersBackend.from_bundle(bundle, options=BackendOptions(lora=LoraOptions(
        rank=4, alpha=4.0, seed=0, init_path=str(comfy.root / "loras" / "start.safetensors"))))
    cfg = TrainConfig(method="dpo", beta=5000.0, steps=2, lr=1e-3, lora_rank=4, lora_alpha=4.0, resolution=64, seed=0,
                      log_every=1, checkpoint_every=0, output_dir=str(tmp_path / "cli"), data_path=[
                          str(datasets / "pairs3" / "pairs.jsonl")])
    res = train(cfg, backend=cli, data=None)
    cli_losses = progress.read_losses(tmp_path / "cli" / "metrics.csv")
    with torch.inference_mode():
        model, clip, vae = _checkpoint(comfy)
        data = PreferenceDataset.execute("pairs3", None, None, "").args[0]
        out = TrainPreferenceLoRA.execute(model, clip, vae, data, **train_inputs(
            method="dpo", steps=2, output_name="agree", init_lora="start.safetensors", checkpoint_every=0)).args
    comfy_losses = progress.read_losses(comfy.root / "output" / session.RUNS_SUBDIR / "agree" / "metrics.csv")
    assert len(cli_losses) == len(comfy_losses) == 2
    for (s1, a), (s2, b) in zip(cli_losses, comfy_losses):
        assert s1 == s2 and abs(a - b) <= 2e-3 * max(abs(a), 1e-3), (cli_losses, comfy_losses)
    ours, theirs = out[0].unet, offset_from_peft(cli.unet, "policy")
    first = load_offset(comfy.root / "loras" / "start.safetensors").unet
    assert set(ours) == set(theirs) == set(first)
    num = den = 0.0
    worst = []
    zero_grad = {f"mid_block.attentions.0.transformer_blocks.0.attn1.{p}" for p in ("to_q", "to_k")}
    assert zero_grad <= set(ours)
    for k in sorted(set(ours) - zero_grad):
        s = first[k].dense()
        ca, cb = ours[k].dense() - s, theirs[k].dense() - s  # what each run's training changed
        assert float(cb.norm()) > 0 and float(ca.norm()) > 0, k
        num, den = num + float((ca - cb).norm()) ** 2, den + float(cb.norm()) ** 2
        worst.append((float((ca - cb).norm() / cb.norm()), k))
    worst.sort(reverse=True)
    assert (num / den) ** 0.5 <= 1e-2 and worst[0][0] <= 5e-2, ((num / den) ** 0.5, worst[:3])
    assert res.steps_done == 2


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
