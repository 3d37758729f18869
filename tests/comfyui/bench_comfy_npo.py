"""Step-time / peak-memory benchmark inside real ComfyUI: Apply NPO + stock KSampler vs plain KSampler.

Both cases load the SAME random kohya LoRA with the stock `LoraLoaderModelOnly` (merged into the
weights by ComfyUI); the NPO case adds `NPOSuite_ApplyNPO` with a random rank-4 negative offset δ
(β = 1, no η, full sigma range) on top of that model. Not collected by pytest (bench_*.py). Run:

    COMFYUI_PATH=/work/ComfyUI OMP_NUM_THREADS=1 /work/comfy_venv/bin/python tests/comfyui/bench_comfy_npo.py --json

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

DELTA_NAME = "bench_delta.safetensors"
LORA_NAME = "bench_style.safetensors"


def _prompt(case: str, steps: int, seed: int, res: int, cfg: float) -> dict:
    from conftest import CKPT_NAME

    p = {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT_NAME}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": "a photo of a cat"}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": "blurry"}},
        "empty": {"class_type": "EmptyLatentImage", "inputs": {"width": res, "height": res, "batch_size": 1}},
        "lora": {"class_type": "LoraLoaderModelOnly",
                 "inputs": {"model": ["ckpt", 0], "lora_name": LORA_NAME, "strength_model": 1.0}},
    }
    model = ["lora", 0]
    if case == "npo":
        p["delta"] = {"class_type": "NPOSuite_LoadWeightOffset",
                      "inputs": {"offset_name": f"npo/{DELTA_NAME}", "family": "auto", "allow_pickle": False}}
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


def child(args) -> None:
    """One fresh ComfyUI process: warm-up, then the M- and N-step prompts; prints one JSON line."""
    from conftest import CACHE, CKPT_NAME, Comfy

    root = Path(tempfile.mkdtemp(prefix="npo_bench_comfy_"))
    h = Comfy(root)
    (root / "checkpoints" / CKPT_NAME).symlink_to(CACHE / CKPT_NAME)
    (root / "loras" / LORA_NAME).symlink_to(CACHE / LORA_NAME)
    (root / "npo" / DELTA_NAME).symlink_to(CACHE / DELTA_NAME)
    import torch

    seed = 1000
    times = {}
    for label, steps in (("warmup", 1), ("m", args.m), ("n", args.n)):
        seed += 1
        prompt = _prompt(args.child, steps, seed, args.res, args.cfg)
        w0, c0 = time.perf_counter(), time.process_time()
        out = h.run(prompt, ["ks"])
        w1, c1 = time.perf_counter(), time.process_time()
        lat = out["ks"][0][0]["samples"]
        if not torch.isfinite(lat).all():
            raise RuntimeError(f"{args.child}: non-finite latent at {steps} steps")
        times[label] = {"wall": w1 - w0, "cpu": c1 - c0}
        final = lat.flatten().tolist()  # same seeds in both cases: the parent checks NPO really acts
    print("BENCH " + json.dumps({
        "case": args.child, "times": times, "final_latent": final,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,  # Linux: KiB
        "torch_threads": torch.get_num_threads(),
    }), flush=True)


def _ensure_files() -> dict:
    """Checkpoint + LoRA + δ in the shared cache (built once, atomically); returns the δ shape."""
    from conftest import CACHE, CKPT_NAME, build_random_sd15

    if not (CACHE / CKPT_NAME).exists():
        sys.path.insert(0, os.environ["COMFYUI_PATH"])
        build_random_sd15(CACHE / CKPT_NAME)
    from test_comfy_npo import random_lora

    from npo_suite.core.offsets import save_offset

    delta = random_lora(1, std=0.08)
    for name, off in ((LORA_NAME, random_lora(3, std=0.03)), (DELTA_NAME, delta)):
        if not (CACHE / name).exists():
            save_offset(off, CACHE / name, format="kohya", family="sd1")
    ranks = {int(d.down.shape[0]) for d in delta.unet.values()}
    return {"rank": sorted(ranks), "modules": len(delta.unet), "beta": 1.0, "alpha": 0.0}


def _run_child(case: str, args) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", case, "--m", str(args.m), "--n", str(args.n),
           "--res", str(args.res), "--cfg", str(args.cfg)]
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
    ap.add_argument("--repeats", type=int, default=4, help="fresh processes per case (interleaved)")
    ap.add_argument("--m", type=int, default=2, help="short run steps")
    ap.add_argument("--n", type=int, default=8, help="long run steps")
    ap.add_argument("--res", type=int, default=64, choices=(64, 128), help="image side (latent = res/8)")
    ap.add_argument("--cfg", type=float, default=5.0)
    ap.add_argument("--child", choices=("plain", "npo"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if not os.environ.get("COMFYUI_PATH"):
        ap.error("set COMFYUI_PATH to a ComfyUI checkout (and run with that ComfyUI's Python)")
    if args.n <= args.m:
        ap.error("--n must be larger than --m")
    if args.child:
        child(args)
        return 0

    delta = _ensure_files()
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
        "bench": "comfyui_apply_npo_vs_plain_ksampler",
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
        "all_wall_s_per_step": {c: [round(d["wall_per_step"], 4) for d in runs[c]] for c in runs},
        "all_cpu_s_per_step": {c: [round(d["cpu_per_step"], 4) for d in runs[c]] for c in runs},
        "loadavg_end": os.getloadavg(),
    }
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
