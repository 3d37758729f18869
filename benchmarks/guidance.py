"""`python -m npo_suite bench guidance`: what NPO guidance costs per sampling step.

Three cases, one guidance step each (= the UNet work of one sampler step, batch B images):
  cfg            plain CFG, positive LoRA eta merged into the weights once: one forward of 2B rows
  npo_fast       NPO fast path (core.branch_lora): base weights + per-row eta / alpha*eta+beta*delta
                 hooks, one forward of 2B rows
  npo_two_model  NPO general path: two merged copies (theta+eta, theta+alpha*eta+beta*delta), two
                 forwards of B rows each

Time: one process holds ONE copy of the UNet and runs the three cases round-robin, step by step
(so machine load affects them alike). Merged weights cost exactly what plain weights cost, so cfg
and the two-model path are timed on the resident weights (no merge inside the timed loop: merging
192 weights in place before each step churned the allocator and made cfg look slower than the
fast path); the fast path runs with its hooks on. Reported: the
median over `--steps` rounds after `--warmup` rounds (torch.cuda.synchronize on CUDA).
Memory: each case runs once more in its own fresh process (spawn), with its real resident
weights (cfg: one merged copy; fast: base + LoRA factors; two-model: two merged copies), for
one warm-up and one step, so peaks do not leak between cases.
  CUDA: torch.cuda.max_memory_allocated() (weights + LoRA factors + activations).
  CPU:  peak RSS of the process (getrusage ru_maxrss) minus its RSS after imports, before the model
        is built: weights + LoRA factors + activations + allocator slack. tracemalloc does not see
        torch's allocations, hence RSS.
Models: tiny SD1.x-shaped UNet by default; `--full-size` builds a random-init UNet2DConditionModel
with SD1.5's config (configs/sd15/unet, 859.5M parameters) on meta and materialises it in place
(no init pass), latent 32x32, batch 1.
"""
from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

CASES = ("cfg", "npo_fast", "npo_two_model")
DTYPES = ("float32", "float16", "bfloat16")
# SD1.5's UNet config, shipped in the package's root configs/ (as the model loader and the presets find it)
SD15_UNET_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "sd15" / "unet"
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out")


@dataclass(frozen=True)
class GuidanceBenchConfig:
    """What `bench guidance` measures; None picks the size-dependent default (see `resolved`)."""

    full_size: bool = False  # random-init SD1.5-sized UNet (860M params) instead of the tiny one
    steps: int | None = None  # timed steps per case (default 5 full size, 20 tiny)
    warmup: int = 2  # untimed steps per case
    rank: int = 32  # rank of the random eta and delta LoRAs
    latent: int | None = None  # latent side (default 32 full size, 16 tiny)
    batch: int = 1  # images per step (each case runs 2*batch rows)
    alpha: float = 0.5
    beta: float = 1.0
    device: str | None = None  # default cuda when available, else cpu
    dtype: str | None = None  # default float16 on CUDA, float32 on CPU
    threads: int | None = None  # torch CPU threads (default: OMP_NUM_THREADS or 1)

    def resolved(self) -> dict:
        """Every setting filled in, as the plain dict the spawned measuring processes receive."""
        if (self.steps is not None and self.steps < 1) or self.warmup < 0 or self.rank < 1 or self.batch < 1:
            raise ValueError("bench guidance: --steps, --rank and --batch must be >= 1 and --warmup >= 0")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"bench guidance: dtype {self.dtype!r} is not one of {DTYPES}")
        full = bool(self.full_size)
        device = str(self.device or ("cuda" if _cuda() else "cpu"))
        return {"full_size": full, "steps": self.steps or (5 if full else 20), "warmup": self.warmup, "rank": self.rank,
                "latent": self.latent or (32 if full else 16), "batch": self.batch, "alpha": self.alpha,
                "beta": self.beta, "device": device,
                "dtype": self.dtype or ("float16" if device.startswith("cuda") else "float32"),
                "threads": self.threads or int(os.environ.get("OMP_NUM_THREADS", "1") or 1)}


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def full_size_unet_on_meta():
    """SD1.5's UNet (configs/sd15/unet) built on the meta device: its shapes, no memory, no init."""
    import torch
    from diffusers import UNet2DConditionModel

    config = UNet2DConditionModel.load_config(str(SD15_UNET_CONFIG))
    with torch.device("meta"):
        return UNet2DConditionModel.from_config(config)


def _build_unet(cfg: dict, device, dtype):
    import torch
    from diffusers import UNet2DConditionModel

    from ..testing.tiny_models import unet_config_sd15

    if cfg["full_size"]:
        unet = full_size_unet_on_meta().to_empty(device=device)
        if dtype != torch.float32:
            unet = unet.to(dtype)
        g = torch.Generator(device="cpu").manual_seed(0)
        with torch.no_grad():  # cheap init in place: matrices N(0, 0.02), norms weight 1, every bias 0
            for m in unet.modules():
                for pname, p in m.named_parameters(recurse=False):
                    if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)) and pname == "weight":
                        p.fill_(1.0)
                    elif p.ndim == 1:
                        p.zero_()
                    else:
                        p.copy_(torch.randn(p.shape, generator=g).mul_(0.02).to(dtype))
    else:
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**unet_config_sd15())
        unet = unet.to(device) if dtype == torch.float32 else unet.to(device, dtype)
    return unet.eval().requires_grad_(False)


def _random_lora(unet, rank: int, seed: int):
    import torch

    from ..core.offsets.types import LowRankDelta, Offset

    g = torch.Generator().manual_seed(seed)
    deltas = {}
    for name, m in unet.named_modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and name.endswith(LORA_TARGETS):
            w = m.weight
            down = torch.randn(rank, w.shape[1], generator=g) * 0.02
            up = torch.randn(w.shape[0], rank, generator=g) * 0.02
            if w.ndim == 4:  # SD1.5 proj_in/out are 1x1 convs
                down, up = down[..., None, None], up[..., None, None]
            deltas[name] = LowRankDelta(down=down, up=up, scale=1.0)
    return Offset(unet=deltas)


def _merge_inplace(unet, terms) -> None:
    import torch

    with torch.no_grad():
        for offset, w in terms:
            for name, d in offset.unet.items():
                p = unet.get_submodule(name).weight
                p.add_((w * d.dense(torch.float32)).reshape(p.shape).to(p.device, p.dtype))


def _in_child(fn, *args):
    """fn(*args) in a fresh spawned process; its result dict (errors re-raised here)."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    proc = ctx.Process(target=_child_main, args=(fn, args, q))
    proc.start()
    res = q.get()
    proc.join()
    if "error" in res:
        raise RuntimeError(f"bench guidance: {fn.__name__}{args[:1]} failed: {res['error']}")
    return res


def _child_main(fn, args, queue) -> None:
    try:
        queue.put(fn(*args))
    except BaseException as e:  # report the failure to the parent instead of hanging it
        queue.put({"error": f"{type(e).__name__}: {e}"})


def _setup(cfg: dict):
    import torch

    torch.set_num_threads(cfg["threads"])
    device, dtype = torch.device(cfg["device"]), getattr(torch, cfg["dtype"])
    unet = _build_unet(cfg, device, dtype)
    eta, delta = _random_lora(unet, cfg["rank"], 1), _random_lora(unet, cfg["rank"], 2)
    n = cfg["batch"]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, cfg["latent"], cfg["latent"], generator=g).to(device, dtype)  # [B, 4, h, w]
    hid = torch.randn(2 * n, 77, unet.config.cross_attention_dim, generator=g).to(device, dtype)  # [2B, 77, D]
    return unet, eta, delta, x, hid, torch.tensor(500, device=device)


def _groups(eta, delta, cfg):
    from ..core.npo import npo_groups

    return npo_groups(eta, delta, cfg["alpha"], cfg["beta"])


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_all(cfg: dict) -> dict:
    """Round-robin timing of the three cases on one resident UNet."""
    import torch

    from ..core.branch_lora import BranchOffsets
    from ..core.guidance import npo

    unet, eta, delta, x, hid, t = _setup(cfg)
    n, dev = cfg["batch"], x.device
    groups = _groups(eta, delta, cfg)
    fast = BranchOffsets(unet, groups, rows=["pos"] * n + ["neg"] * n)

    def fwd(xx, hh):
        _sync(dev)
        t0 = time.perf_counter()
        out = unet(xx, t, encoder_hidden_states=hh).sample
        _sync(dev)
        return out, time.perf_counter() - t0

    times = {c: [] for c in CASES}
    with torch.inference_mode():
        for i in range(cfg["warmup"] + cfg["steps"]):
            # cfg: a forward of 2B rows on plain weights. A merged LoRA changes weight values, not the
            # work, so this times "CFG with the LoRA merged" without merging inside the timed loop
            # (in-place merges of every targeted weight churn the allocator and skew the next forward).
            out, dt_cfg = fwd(torch.cat([x, x]), hid)
            npo(*out.chunk(2), 7.5)
            with fast:
                out, dt_fast = fwd(torch.cat([x, x]), hid)
                npo(*out.chunk(2), 7.5)
            pos, dt_a = fwd(x, hid[:n])  # two-model: the positive model's B rows ...
            neg, dt_b = fwd(x, hid[n:])  # ... and the negative model's B rows (same work as merged copies)
            npo(pos, neg, 7.5)
            if i >= cfg["warmup"]:
                for c, v in zip(CASES, (dt_cfg, dt_fast, dt_a + dt_b)):
                    times[c].append(v)
    return {"times": times, "params": sum(p.numel() for p in unet.parameters()), "lora_modules": len(eta.unet)}


def _memory(case: str, cfg: dict) -> dict:
    """Peak memory of one case with its real resident weights (fresh process)."""
    import copy

    import diffusers  # noqa: F401  (imported before the RSS baseline: imports are not the case's memory)
    import torch
    from diffusers import UNet2DConditionModel  # noqa: F401

    from ..testing import tiny_models  # noqa: F401
    from ..core.branch_lora import branch_offsets
    from ..core.guidance import npo

    diffusers.utils.logging.set_verbosity_error()
    cuda = cfg["device"].startswith("cuda")
    base_rss = _rss_bytes()
    if cuda:
        torch.cuda.reset_peak_memory_stats(cfg["device"])
    unet, eta, delta, x, hid, t = _setup(cfg)
    n = cfg["batch"]
    groups = _groups(eta, delta, cfg)
    with torch.inference_mode(), contextlib.ExitStack() as stack:
        if case == "cfg":
            _merge_inplace(unet, groups["pos"])
            step = lambda: npo(*unet(torch.cat([x, x]), t, encoder_hidden_states=hid).sample.chunk(2), 7.5)  # noqa: E731
        elif case == "npo_fast":
            stack.enter_context(branch_offsets(unet, groups, rows=["pos"] * n + ["neg"] * n))
            step = lambda: npo(*unet(torch.cat([x, x]), t, encoder_hidden_states=hid).sample.chunk(2), 7.5)  # noqa: E731
        else:
            neg_model = copy.deepcopy(unet)
            _merge_inplace(unet, groups["pos"])
            _merge_inplace(neg_model, groups["neg"])
            step = lambda: npo(unet(x, t, encoder_hidden_states=hid[:n]).sample,  # noqa: E731
                               neg_model(x, t, encoder_hidden_states=hid[n:]).sample, 7.5)
        step()
        step()
        _sync(x.device)
    peak = torch.cuda.max_memory_allocated(cfg["device"]) if cuda else _peak_rss_bytes() - base_rss
    return {"case": case, "peak_mem_bytes": int(peak)}


def run(config: GuidanceBenchConfig) -> dict:
    """Timing (one process, round-robin) and memory (one fresh process per case); ratios against cfg."""
    cfg = config.resolved()
    timing = _in_child(_time_all, cfg)
    mem = {case: _in_child(_memory, case, cfg)["peak_mem_bytes"] for case in CASES}
    med = {c: statistics.median(v) for c, v in timing["times"].items()}
    return {
        "device": cfg["device"], "dtype": cfg["dtype"], "full_size": cfg["full_size"], "threads": cfg["threads"],
        "latent": cfg["latent"], "batch": cfg["batch"], "rank": cfg["rank"], "steps": cfg["steps"], "warmup": cfg["warmup"],
        "memory_measure": "cuda max_memory_allocated" if cfg["device"].startswith("cuda") else "peak RSS delta (ru_maxrss - RSS after imports)",
        "unet_params": timing["params"], "lora_modules": timing["lora_modules"],
        "step_s": med, "step_s_all": timing["times"], "peak_mem_bytes": mem,
        "npo_fast_over_cfg": med["npo_fast"] / med["cfg"],
        "npo_two_model_over_cfg": med["npo_two_model"] / med["cfg"],
        "mem_npo_fast_over_cfg": mem["npo_fast"] / mem["cfg"],
        "mem_npo_two_model_over_cfg": mem["npo_two_model"] / mem["cfg"],
    }
