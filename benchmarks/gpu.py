"""`python -m npo_suite bench gpu`: the GPU check, one command (its time on a GPU is not measured yet).

At full size with random weights (the shipped configs `configs/sd15`, `configs/sdxl`, `configs/sd35m`,
`configs/flux1dev`, built on the device; no download): for `sd15_8gb`, `sdxl_12gb`, `sd35m_24gb` and `flux_40gb`
(a preset whose traced card need exceeds the GPU's memory is skipped, with both figures), each in a fresh process,
  - the latent-cache fill as the run does it (`LatentCache.encode_records`: one fill batch of
    random pixels, `cache_batch_size` images per VAE call), a flow transformer's text encoders then
    released as `loop.train` releases them (`loop.release_text_encoders`), and `steps` optimizer steps of the real
    `trainer.loop.train_step` (the preset's method, precision, optimizer, gradient checkpointing;
    `grad_accum` 2 instead of the preset's 16/32, so that a step is short: the memory of a step does
    not grow with more micro-batches, its time does, linearly);
  - peak memory: `torch.cuda.max_memory_allocated` over the fill and the steps, beside the traced
    estimate of `train --dry-run` for the same settings (`trainer.memory_estimate`);
  - time: the median optimizer step and micro-batch after one warm-up step;
and NPO vs CFG sampling speed (`bench guidance`: SD1.5-sized UNet, one guidance step = one sampler
step) at 512 px (latent 64) and 1024 px (latent 128), as it/s.
Prints ONE JSON line. `--tiny` runs the same on the tiny test models (any device, CPU included;
the CPU peak is PyTorch's CPU allocator's, profiler memory events), for the tests.
"""
from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import dataclass

PRESETS = ("sd15_8gb", "sdxl_12gb", "sd35m_24gb", "flux_40gb")
MODELS = {"sd15_8gb": "sd15", "sdxl_12gb": "sdxl", "sd35m_24gb": "sd35m", "flux_40gb": "flux1dev"}
TINY_PRESETS = ("sd15_8gb", "sdxl_12gb", "sd35m_24gb")  # --tiny: Flux runs the same transformer path as SD3
SAMPLING_PX = (512, 1024)


@dataclass(frozen=True)
class GpuBenchConfig:
    tiny: bool = False
    device: str | None = None  # default cuda
    steps: int = 3  # timed optimizer steps per preset (after one warm-up step)


class NoGpu(RuntimeError):
    pass


def _overrides(preset: str, tiny: bool, model: str, device: str) -> dict:
    o = {"model": model, "grad_accum": 2, "validate_every": 0, "checkpoint_every": 0, "cpu": device == "cpu",
         "lr_warmup_steps": 0}
    if tiny:
        o.update(resolution=64, lora_rank=4)
    return o


def _train_case(preset: str, tiny: bool, model: str, device: str, steps: int) -> dict:
    """One preset in this (fresh) process: fill + steps, peak and times, and the estimate beside them."""
    import torch

    from ..trainer.config import load_config
    from ..trainer.data.cache import LatentCache
    from ..core.flow import FLOW
    from ..trainer.loop import build_optimizer, make_accelerator, release_text_encoders, train_step
    from ..trainer.memory_estimate import (allocator_peak, build_components, fill_batch, fill_records,
                                           fake_batch, resolve_model, stated_card_gib, tokens, trace_run)
    from ..trainer.backends.diffusers import BackendOptions, DiffusersBackend, LoraOptions
    from ..trainer.methods import METHODS

    cfg = load_config(preset=preset, overrides=_overrides(preset, tiny, model, device))
    est = trace_run(cfg, model, device="cuda" if device.startswith("cuda") else "cpu")
    mc = resolve_model(model)
    cuda = device.startswith("cuda")
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.mixed_precision, torch.float32) if cuda \
        else torch.float32
    acc = make_accelerator(cfg)

    def run():
        torch.manual_seed(cfg.seed)
        default = torch.get_default_dtype()
        torch.set_default_dtype(dtype)  # built in the run's dtype: Flux in float32 would be 44 GiB before a cast
        try:
            with torch.device(device):
                unet, tes, vae, sched = build_components(mc)
        finally:
            torch.set_default_dtype(default)
        unet, vae = unet.to(dtype), vae.to(dtype) if vae is not None else None
        tes = [t.to(dtype) for t in tes]
        backend = DiffusersBackend(unet, tes, [tokens(c) for c in mc.text_encoders], sched, vae, family=mc.family,
                                   prediction_type=FLOW if mc.is_transformer else None, device=device,
                                   options=BackendOptions(
                                       lora=LoraOptions(cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, None, cfg.seed),
                                       gradient_checkpointing=cfg.gradient_checkpointing, resolution=cfg.resolution,
                                       weight_dtype=dtype))
        method = METHODS[cfg.method]
        for name in method.extra_adapters(cfg):
            backend.add_adapter(name, init_from="policy")
        kind = method.data_kind
        cache = LatentCache(None, "bench", backend.encode_images, backend.encode_prompts, device=device,
                            encode_batch=cfg.cache_batch_size)
        records, preps = fill_batch(cfg, kind, fill_records(cfg), lambda: torch.rand(3, cfg.resolution,
                                                                                      cfg.resolution) * 2 - 1)
        t0 = time.perf_counter()
        with torch.no_grad():
            cache.encode_records(records, preps)
        sync()
        fill_s = time.perf_counter() - t0
        del preps
        tes.clear()  # the backend's list is the only reference left: the release frees them
        released = release_text_encoders(cfg, backend, method, verbose=False) if mc.is_transformer else 0
        opt = acc.prepare_optimizer(build_optimizer(cfg, backend.trainable_parameters()), device_placement=False)
        gen = torch.Generator(device=device if cuda else "cpu")
        data = iter(lambda: fake_batch(backend, mc, kind, cfg.batch_size, cfg.resolution, device, random=True), None)
        times = []
        for s in range(steps + 1):
            sync()
            t0 = time.perf_counter()
            metrics, _, _ = train_step(cfg, acc, backend, method, data, opt, s, gen)
            sync()
            times.append(time.perf_counter() - t0)
        return {"fill_s": fill_s, "times": times[1:], "loss": float(metrics["loss"]),
                "optimizer": type(getattr(opt, "optimizer", opt)).__name__, "released": released}

    def sync():
        if cuda:
            torch.cuda.synchronize()

    if cuda:
        torch.cuda.reset_peak_memory_stats()
        res = run()
        peak = torch.cuda.max_memory_allocated()
    else:
        res, peak = allocator_peak(run)
    step = statistics.median(res["times"])
    card = stated_card_gib(preset)[0]
    return {"preset": preset, "method": cfg.method, "resolution": cfg.resolution, "mixed_precision": cfg.mixed_precision,
            "optimizer_built": res["optimizer"], "grad_accum": cfg.grad_accum, "cache_batch_size": cfg.cache_batch_size,
            "peak_gib": round(peak / 2**30, 3), "estimate_peak_gib": est.peak_gib,
            "estimate_over_measured": round(est.peak_gib / (peak / 2**30), 3) if peak else None,
            "estimate_card_gib": round(est.card_gib(), 3), "stated_card_gb": card,
            "step_s": round(step, 4), "micro_batch_s": round(step / cfg.grad_accum, 4),
            "preset_step_s": round(step / cfg.grad_accum * load_config(preset=preset).grad_accum, 3),
            "fill_s": round(res["fill_s"], 3), "loss": res["loss"],
            **({"text_encoders_released": res["released"] > 0} if mc.is_transformer else {})}


def _too_big(preset: str, model: str, device: str) -> dict | None:
    """{"skipped": why} when the preset's traced card need exceeds this GPU's memory (Flux on a 24 GB card)."""
    import torch

    from ..trainer.config import load_config
    from ..trainer.memory_estimate import GIB, trace_run

    have = torch.cuda.get_device_properties(device).total_memory / GIB
    need = trace_run(load_config(preset=preset, overrides=_overrides(preset, False, model, device)), model,
                     device="cuda").card_gib()
    if need <= have:
        return None
    return {"preset": preset, "skipped": f"the trace says it needs {need:.2f} GiB on a card; this GPU has {have:.2f} GiB"}


def run(bc: GpuBenchConfig) -> dict:
    import torch

    from .guidance import GuidanceBenchConfig, _in_child, _time_all
    from .guidance import run as guidance_run

    device = bc.device or "cuda"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise NoGpu("bench gpu: no CUDA device here; it measures a GPU (use --tiny --device cpu for the "
                    "tiny self-test)")
    if not bc.tiny and not device.startswith("cuda"):
        raise NoGpu(f"bench gpu: device {device} is not a GPU; full size runs on cuda (or --tiny)")
    t0 = time.perf_counter()
    out = {"bench": "gpu", "device": device, "tiny": bc.tiny,
           "gpu": torch.cuda.get_device_name(device) if device.startswith("cuda") else None, "train": {}, "sampling": {}}
    with tempfile.TemporaryDirectory() as tmp:
        models = dict(MODELS)
        if bc.tiny:
            from ..testing.tiny_models import build_sd3, build_sd15, build_sdxl

            build_sd15(f"{tmp}/sd15")
            build_sdxl(f"{tmp}/sdxl")
            build_sd3(f"{tmp}/sd3")
            models = {"sd15_8gb": f"{tmp}/sd15", "sdxl_12gb": f"{tmp}/sdxl", "sd35m_24gb": f"{tmp}/sd3"}
        for preset in TINY_PRESETS if bc.tiny else PRESETS:
            skip = None if bc.tiny else _too_big(preset, models[preset], device)
            out["train"][preset] = skip or _in_child(_train_case, preset, bc.tiny, models[preset], device, bc.steps)
    for px in SAMPLING_PX:
        latent = px // 8 if not bc.tiny else px // 64
        gc = GuidanceBenchConfig(full_size=not bc.tiny, latent=latent, device=device,
                                 steps=5 if not bc.tiny else 2, warmup=2 if not bc.tiny else 1)
        if bc.tiny:  # timing only, in this process (the memory of each case needs 3 fresh processes)
            t = _time_all(gc.resolved())
            step_s, mem = {c: statistics.median(v) for c, v in t["times"].items()}, None
            dtype = gc.resolved()["dtype"]
        else:
            g = guidance_run(gc)
            step_s, mem, dtype = g["step_s"], g["peak_mem_bytes"], g["dtype"]
        out["sampling"][f"{px}px"] = {
            "latent": latent, "dtype": dtype, "it_s": {c: round(1 / v, 3) for c, v in step_s.items()},
            "npo_fast_over_cfg_time": round(step_s["npo_fast"] / step_s["cfg"], 3),
            "peak_mem_gib": {c: round(b / 2**30, 3) for c, b in mem.items()} if mem else None}
    out["wall_s"] = round(time.perf_counter() - t0, 1)
    return out
