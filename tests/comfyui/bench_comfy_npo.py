"""Step-time / peak-memory benchmark inside real ComfyUI: Apply NPO + stock KSampler vs plain KSampler.

Both cases load the SAME random kohya LoRA with the stock `LoraLoaderModelOnly` (merged into the
weights by ComfyUI); the NPO case adds `NPOSuite_ApplyNPO` with a random rank-4 negative offset δ
(β = 1, no η, full sigma range) on top of that model. Not collected by pytest (bench_*.py). Run:

    COMFYUI_PATH=/work/ComfyUI OMP_NUM_THREADS=1 /work/comfy_venv/bin/python tests/comfyui/bench_comfy_npo.py --json
    COMFYUI_PATH=/work/ComfyUI OMP_NUM_THREADS=1 flock /tmp/npo_heavy.lock timeout 900 \
        /work/comfy_venv/bin/python tests/comfyui/bench_comfy_npo.py --family sdxl --json

Families: `sd15`, the random SD1.5-shaped checkpoint of conftest.py (LoRA/δ from test_comfy_npo's
`random_lora`); `sdxl`, the random full-size SDXL of sdxl_build.py (LoRA/δ on all 560 attention
projections), loaded with `--bf16-unet` semantics (UNet weights bf16, fp32 compute via manual cast;
text encoders fp16; VAE fp32) so that it fits in 24 GB (~14 GiB peak).

Method
- Every (case, repeat) runs in its own fresh subprocess (its peak RSS = `ru_maxrss` of that process:
  ComfyUI + checkpoint + LoRA + sampling, i.e. the whole-process peak, not just the sampler's).
- In a child: one 1-step warm-up prompt (loads checkpoint, patches LoRA, encodes text), then the
  M-step and N-step prompts; per-step cost = (t_N − t_M) / (N − M), which removes model load, text
  encode and the per-prompt constant (no VAE decode: the latent is saved with SaveLatent). Each
  prompt uses a new seed so ComfyUI's output cache never skips the KSampler.
- Plain and NPO children are interleaved (plain, npo, npo, plain, ...); the figures are medians.
- Both wall seconds and the child's process CPU seconds are reported (CPU is more robust on a
  shared machine; with OMP_NUM_THREADS=1 the two agree when the machine is quiet).
- Memory per child besides ru_maxrss (which also counts the checkpoint's memory-mapped, reclaimable
  file pages while ComfyUI loads from them): the peak of RssAnon (private memory, sampled every
  50 ms) and, after the runs, VmRSS split into RssAnon and RssFile from /proc/self/status.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

# family -> (checkpoint file, LoRA file, δ file, kohya family, defaults for --repeats/--m/--n,
#            seeds of the random (LoRA, δ); the figures in docs/BENCHMARKS.md were measured with these)
FAMILIES = {
    "sd15": ("npo_random_sd15_v1.safetensors", "bench_style.safetensors", "bench_delta.safetensors", "sd1", (4, 2, 8),
             (3, 1)),
    "sdxl": ("npo_random_sdxl_v1.safetensors", "bench_sdxl_style.safetensors", "bench_sdxl_delta.safetensors", "sdxl",
             (2, 1, 5), (23, 21)),
}


def _files(family: str):
    from conftest import CACHE as cache

    ckpt, lora, delta = FAMILIES[family][:3]
    return cache, ckpt, lora, delta


def _prompt(family: str, case: str, steps: int, seed: int, res: int, cfg: float) -> dict:
    _, ckpt_name, lora_name, delta_name = _files(family)
    p = {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt_name}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": "a photo of a cat"}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": "blurry"}},
        "empty": {"class_type": "EmptyLatentImage", "inputs": {"width": res, "height": res, "batch_size": 1}},
        "lora": {"class_type": "LoraLoaderModelOnly",
                 "inputs": {"model": ["ckpt", 0], "lora_name": lora_name, "strength_model": 1.0}},
    }
    model = ["lora", 0]
    if case == "npo":
        p["delta"] = {"class_type": "NPOSuite_LoadWeightOffset",
                      "inputs": {"offset_name": f"npo/{delta_name}", "family": "auto", "allow_pickle": False}}
        p["apply"] = {"class_type": "NPOSuite_ApplyNPO",
                      "inputs": {"model": model, "negative_offset": ["delta", 0], "beta": 1.0, "alpha": 0.0,
                                 "sigma_min": 0.0, "sigma_max": 0.0}}
        model = ["apply", 0]
    p["ks"] = {"class_type": "KSampler",
               "inputs": {"model": model, "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["empty", 0],
                          "seed": seed, "steps": steps, "cfg": cfg, "sampler_name": "euler", "scheduler": "normal",
                          "denoise": 1.0}}
    p["save"] = {"class_type": "SaveLatent", "inputs": {"samples": ["ks", 0], "filename_prefix": "bench/l"}}
    return p


def _proc_mem() -> dict:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                out[k] = round(int(v.split()[0]) / 1024.0, 1)  # KiB -> MiB
    return out


class _AnonPeak:
    """Samples RssAnon every 50 ms in a thread: the private-memory peak."""

    def __init__(self):
        import threading

        self.peak, self._stop = 0.0, threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self):
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, _proc_mem().get("RssAnon", 0.0))

    def stop(self) -> float:
        self._stop.set()
        self._t.join()
        return self.peak


def child(args) -> None:
    """One fresh ComfyUI process: warm-up, then the M- and N-step prompts; prints one JSON line."""
    from conftest import Comfy

    anon = _AnonPeak()
    cache, ckpt_name, lora_name, delta_name = _files(args.family)
    root = Path(tempfile.mkdtemp(prefix="npo_bench_comfy_"))
    h = Comfy(root)
    if args.family == "sdxl":
        from comfy import cli_args

        cli_args.args.bf16_unet = True
    (root / "checkpoints" / ckpt_name).symlink_to(cache / ckpt_name)
    (root / "loras" / lora_name).symlink_to(cache / lora_name)
    (root / "npo" / delta_name).symlink_to(cache / delta_name)
    import torch

    seed, times, mem = 1000, {}, {}
    for label, steps in (("warmup", 1), ("m", args.m), ("n", args.n)):
        seed += 1
        prompt = _prompt(args.family, args.child, steps, seed, args.res, args.cfg)
        w0, c0 = time.perf_counter(), time.process_time()
        out = h.run(prompt, ["ks", "ckpt"])
        w1, c1 = time.perf_counter(), time.process_time()
        lat = out["ks"][0][0]["samples"]
        if not torch.isfinite(lat).all():
            raise RuntimeError(f"{args.child}: non-finite latent at {steps} steps")
        times[label] = {"wall": w1 - w0, "cpu": c1 - c0}
        mem[label] = _proc_mem()
        final = lat.flatten().tolist()  # same seeds in both cases: the parent checks NPO really acts
    m = out["ckpt"][0][0].model
    print("BENCH " + json.dumps({
        "case": args.child, "times": times, "final_latent": final, "mem_after_mib": mem,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,  # Linux: KiB
        "peak_rss_anon_mib": anon.stop(),
        "torch_threads": torch.get_num_threads(),
        "dtypes": {"unet_weights": str(m.get_dtype()), "unet_compute": str(m.manual_cast_dtype or m.get_dtype()),
                   "model_class": type(m).__name__},
    }), flush=True)


def _ensure_files(family: str) -> dict:
    """Checkpoint + LoRA + δ in the shared cache (built once, atomically); returns the δ shape."""
    sys.path.insert(0, os.environ["COMFYUI_PATH"])
    cache, ckpt_name, lora_name, delta_name = _files(family)
    if family == "sdxl":
        import sdxl_build

        sdxl_build.ensure_random_sdxl()

        def random_lora(seed, std):
            return sdxl_build.random_sdxl_lora(seed, rank=4, std=std)
    else:
        from conftest import build_random_sd15

        if not (cache / ckpt_name).exists():
            build_random_sd15(cache / ckpt_name)
        from test_comfy_npo import random_lora

    from npo_suite.core.offsets import save_offset

    lora_seed, delta_seed = FAMILIES[family][5]
    delta = random_lora(delta_seed, std=0.08)
    for name, off in ((lora_name, random_lora(lora_seed, std=0.03)), (delta_name, delta)):
        if not (cache / name).exists():
            save_offset(off, cache / name, format="kohya", family=FAMILIES[family][3])
    ranks = {int(d.down.shape[0]) for d in delta.unet.values()}
    return {"rank": sorted(ranks), "modules": len(delta.unet), "beta": 1.0, "alpha": 0.0}


def _run_child(case: str, args) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", case, "--family", args.family,
           "--m", str(args.m), "--n", str(args.n), "--res", str(args.res), "--cfg", str(args.cfg)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
    line = next((ln for ln in r.stdout.splitlines() if ln.startswith("BENCH ")), None)
    if r.returncode != 0 or line is None:
        raise RuntimeError(f"child {case} failed (rc={r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    d = json.loads(line[len("BENCH "):])
    t = d["times"]
    d["wall_per_step"] = (t["n"]["wall"] - t["m"]["wall"]) / (args.n - args.m)
    d["cpu_per_step"] = (t["n"]["cpu"] - t["m"]["cpu"]) / (args.n - args.m)
    return d


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", action="store_true", help="print only the one-line JSON result")
    ap.add_argument("--family", choices=list(FAMILIES), default="sd15")
    ap.add_argument("--repeats", type=int, help="fresh processes per case, interleaved (sd15: 4, sdxl: 2)")
    ap.add_argument("--m", type=int, help="short run steps (sd15: 2, sdxl: 1)")
    ap.add_argument("--n", type=int, help="long run steps (sd15: 8, sdxl: 5)")
    ap.add_argument("--res", type=int, default=64, choices=(64, 128), help="image side (latent = res/8)")
    ap.add_argument("--cfg", type=float, default=5.0)
    ap.add_argument("--child", choices=("plain", "npo"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    for k, v in zip(("repeats", "m", "n"), FAMILIES[args.family][4]):
        if getattr(args, k) is None:
            setattr(args, k, v)
    if not os.environ.get("COMFYUI_PATH"):
        ap.error("set COMFYUI_PATH to a ComfyUI checkout (and run with that ComfyUI's Python)")
    if args.n <= args.m:
        ap.error("--n must be larger than --m")
    if args.child:
        child(args)
        return 0

    delta = _ensure_files(args.family)
    runs = {"plain": [], "npo": []}
    for r in range(args.repeats):
        order = ("plain", "npo") if r % 2 == 0 else ("npo", "plain")
        for case in order:
            d = _run_child(case, args)
            runs[case].append(d)
            if not args.json:
                print(f"repeat {r} {case}: wall {d['wall_per_step']:.3f} s/step, cpu {d['cpu_per_step']:.3f} s/step, "
                      f"peak RSS {d['peak_rss_mib']:.0f} MiB", flush=True)

    def med(case, key):
        return statistics.median(d[key] for d in runs[case])

    import torch

    a = torch.tensor(runs["npo"][0]["final_latent"])
    b = torch.tensor(runs["plain"][0]["final_latent"])
    npo_rel_diff = float((a - b).abs().max() / b.abs().max())
    if npo_rel_diff <= 1e-3:
        raise RuntimeError(f"Apply NPO did not change the result (rel diff {npo_rel_diff:.2e}): δ is not acting")
    res = {
        "bench": "comfyui_apply_npo_vs_plain_ksampler", "family": args.family, "dtypes": runs["plain"][0]["dtypes"],
        "device": f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                  f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, "
                  f"torch threads {runs['plain'][0]['torch_threads']})",
        "resolution": [args.res, args.res], "latent": [args.res // 8, args.res // 8], "batch": 1,
        "sampler": "euler", "scheduler": "normal", "cfg": args.cfg, "steps": {"m": args.m, "n": args.n},
        "repeats": args.repeats, "lora": {"loader": "LoraLoaderModelOnly", "strength": 1.0, "both_cases": True},
        "delta": delta, "npo_vs_plain_latent_rel_diff": round(npo_rel_diff, 4),
        "plain_s_per_step": round(med("plain", "wall_per_step"), 4),
        "npo_s_per_step": round(med("npo", "wall_per_step"), 4),
        "npo_over_plain": round(med("npo", "wall_per_step") / med("plain", "wall_per_step"), 4),
        "plain_cpu_s_per_step": round(med("plain", "cpu_per_step"), 4),
        "npo_cpu_s_per_step": round(med("npo", "cpu_per_step"), 4),
        "npo_over_plain_cpu": round(med("npo", "cpu_per_step") / med("plain", "cpu_per_step"), 4),
        "peak_rss_mib": {"plain": round(med("plain", "peak_rss_mib"), 1), "npo": round(med("npo", "peak_rss_mib"), 1),
                         "what": "ru_maxrss of each fresh child process (whole process), median"},
        "peak_rss_anon_mib": {c: round(med(c, "peak_rss_anon_mib"), 1) for c in runs},
        "after_runs_mib": {c: runs[c][0]["mem_after_mib"]["n"] for c in runs},
        "all_wall_s_per_step": {c: [round(d["wall_per_step"], 4) for d in runs[c]] for c in runs},
        "all_cpu_s_per_step": {c: [round(d["cpu_per_step"], 4) for d in runs[c]] for c in runs},
        "loadavg_end": os.getloadavg(),
    }
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
