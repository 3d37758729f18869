"""`python -m npo_suite bench train`: per-step time and peak memory of every method in METHODS.

Each method's step (zero_grad -> `method.compute` -> backward -> optimizer step, exactly what the
loop does per micro-batch) is compared with the least work any pair method must do: one policy
forward + backward on the pair [2B] and one no-grad reference forward on the pair [2B] (+ the
same optimizer step), measured in the same run. `ratio = step_s / least_work_s`; targets
(docs/BENCHMARKS.md): <= 1.2 for dpo, bdpo, snpo and snpo <= 1.1 x dpo. TDFT (K teacher steps)
and DDSPO (a [3B] reference forward) do more work by design; their ratios are reported, not
targeted.

Timing: all variants run round-robin (one step of each per round), W warm-up rounds, then the
median over N rounds, so a load spike on a shared machine hits every variant alike. Memory: a
separate, untimed pass per variant: CUDA `max_memory_allocated`; CPU the peak resident set size
sampled every millisecond (absolute, weights included).

Models: the tiny SD1.x model (default), or `--full-size`: a random-init UNet with SD1.5's
config (860 M parameters) at a small latent (default 16 x 16, i.e. 128 px), batch 1, with a
one-layer 768-wide CLIP text encoder (the step does not run the text encoder: prompts are
encoded once, as with the latent cache).
"""
from __future__ import annotations

import os
import statistics
import threading
import time
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TrainBenchConfig:
    """What `bench train` measures; None picks the size-dependent default."""

    full_size: bool = False  # SD1.5-sized UNet (random init) instead of the tiny model
    latent: int | None = None  # latent side (default: 8 tiny, 16 full size)
    batch: int | None = None  # pairs per step (default: 2 tiny, 1 full size)
    warmup: int | None = None  # warm-up rounds (default: 3 tiny, 1 full size)
    iters: int | None = None  # timed rounds (default: 15 tiny, 3 full size)
    methods: tuple[str, ...] | None = None  # subset of METHODS (default: all)
    device: str | None = None  # default cuda when available, else cpu
    sets: tuple[str, ...] = ()  # KEY=VALUE method hyper-parameters for every method, as `train --set`


def build(full_size: bool, device: str):
    """(backend, model name): the tiny SD1.x pipeline or an SD1.5-config UNet with random weights."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    from ..testing import tiny_models as tm
    from ..trainer.backends.diffusers import BackendOptions, DiffusersBackend, LoraOptions

    opts = BackendOptions(lora=LoraOptions(rank=8, alpha=8.0, targets="attn"), resolution=64)
    if not full_size:
        return DiffusersBackend.from_pipeline(tm.build_sd15(None, seed=0), device=device, options=opts), "tiny-sd15"
    torch.manual_seed(0)
    tok = tm.build_tokenizer("/tmp/npo_suite_bench_tok")
    te = CLIPTextModel(tm.text_encoder_config(len(tok), hidden=768, layers=1)).eval()
    unet = UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8, sample_size=64).eval()  # SD1.5 config
    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
    return DiffusersBackend(unet, [te], [tok], sched, vae=None, device=device, options=opts), "sd15-size-random"


def batches(backend, B: int, side: int, seed: int = 0):
    """A PairBatch and a PromptBatch of random latents [B, 4, side, side]."""
    from ..trainer.batches import PairBatch, PromptBatch

    g = torch.Generator().manual_seed(seed)
    prompts = [f"a photo of a red cat with a tree {i}" for i in range(B)]
    cond = backend.encode_prompts(prompts)
    lw, ll = (torch.randn(B, 4, side, side, generator=g).to(backend.device) for _ in range(2))
    return (PairBatch(lw, ll, cond, prompts),
            PromptBatch(prompts, cond, latents=lw, latents_l=ll, latent_shape=(4, side, side)))


def least_work(backend, pair, generator):
    """Policy forward + backward on the pair [2B] and a no-grad reference forward on it [2B]."""
    from ..core.schedule import add_noise, gather

    x0 = torch.cat([pair.latents_w, pair.latents_l])  # [2B, C, h, w]
    t = torch.randint(0, backend.num_train_timesteps, (x0.shape[0] // 2,), generator=generator).repeat(2)
    eps = torch.randn(x0.shape, generator=generator).to(x0)
    x_t = add_noise(x0, eps, gather(backend.abar, t, x0))
    c2 = pair.cond.repeat(2)
    loss = (backend.predict_eps(x_t, t, c2, "policy") - eps).pow(2).mean()
    with torch.no_grad():
        backend.predict_eps(x_t, t, c2, None)
    return loss


def _peak_rss_mb(fn) -> float:
    """Peak resident set size (MB) while fn() runs, sampled every ms from /proc/self/statm."""
    page = os.sysconf("SC_PAGE_SIZE")
    peak, done = [0], threading.Event()

    def sample():
        while not done.is_set():
            with open("/proc/self/statm") as f:
                peak[0] = max(peak[0], int(f.read().split()[1]) * page)
            time.sleep(0.001)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    try:
        fn()
    finally:
        done.set()
        th.join()
    return peak[0] / 2**20


def run(bc: TrainBenchConfig) -> dict:
    from ..trainer.config import load_config
    from ..trainer.methods import METHODS

    full = bc.full_size
    side = bc.latent or (16 if full else 8)
    B = bc.batch or (1 if full else 2)
    warmup = bc.warmup if bc.warmup is not None else (1 if full else 3)
    iters = bc.iters or (3 if full else 15)
    names = list(bc.methods or METHODS)
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise ValueError(f"bench train: unknown method(s) {unknown}; choose from {list(METHODS)}")
    backend, model = build(full, bc.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cfg = load_config(overrides={"method": "dpo", "resolution": 8 * side}, sets=list(bc.sets) or None)
    pair, prompt = batches(backend, B, side)
    opt = torch.optim.AdamW(backend.trainable_parameters(), lr=1e-12)  # a real step that barely moves
    gen = torch.Generator()

    def step_fn(name):
        method = METHODS.get(name)
        mcfg = cfg.replace(method=name) if method else cfg
        batch = pair if (method is None or method.data_kind == "pairs") else prompt

        def one():
            opt.zero_grad(set_to_none=True)
            loss = least_work(backend, pair, gen) if method is None else method.compute(backend, batch, mcfg, gen).loss
            loss.backward()
            opt.step()
            if method is not None:
                method.after_step(backend, mcfg)
        return one

    for n in names:
        METHODS[n].setup(backend, cfg.replace(method=n))
    fns = {"least_work": step_fn(None), **{n: step_fn(n) for n in names}}
    times: dict[str, list[float]] = {k: [] for k in fns}
    sync = torch.cuda.synchronize if backend.device.type == "cuda" else (lambda: None)
    for r in range(warmup + iters):
        for k, fn in fns.items():
            gen.manual_seed(r)
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            if r >= warmup:
                times[k].append(time.perf_counter() - t0)
    mem = {}
    for k, fn in fns.items():
        if backend.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            fn()
            mem[k] = torch.cuda.max_memory_allocated() / 2**20
        else:
            mem[k] = _peak_rss_mb(fn)
    med = {k: statistics.median(v) for k, v in times.items()}
    lw = med["least_work"]
    methods = {n: {"step_s": round(med[n], 5), "least_work_s": round(lw, 5), "ratio": round(med[n] / lw, 3),
                   "peak_mem_mb": round(mem[n], 1)} for n in names}
    out = {"model": model, "device": _device_name(backend.device), "batch_pairs": B, "latent": side,
           "rounds": iters, "set": list(bc.sets), "least_work_peak_mem_mb": round(mem["least_work"], 1), "methods": methods}
    if "snpo" in med and "dpo" in med:
        out["snpo_over_dpo"] = round(med["snpo"] / med["dpo"], 3)
    return out


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads, {os.cpu_count()} cores)"
