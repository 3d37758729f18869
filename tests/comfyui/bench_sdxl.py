"""Step time / peak RSS on the random full-size SDXL inside real ComfyUI: Apply NPO + KSampler vs plain KSampler.

The SDXL counterpart of bench_comfy_npo.py (same method, own script: that file is SD1.5-only).
Both cases load the SAME random kohya-SDXL LoRA (all 560 attention projections, rank 4) with the
stock `LoraLoaderModelOnly` (merged into the weights by ComfyUI); the NPO case adds
`NPOSuite_ApplyNPO` with a random rank-4 negative offset δ on the same 560 projections (β = 1, no η,
full sigma range). ComfyUI runs with `--cpu --bf16-unet` semantics (UNet weights bf16, compute
fp32 via manual cast; text encoders fp16; VAE fp32). Not collected by pytest (bench_*.py). Run:

    COMFYUI_PATH=/work/ComfyUI OMP_NUM_THREADS=1 flock /tmp/npo_heavy.lock timeout 900 /usr/bin/time -v \
        /work/comfy_venv/bin/python tests/comfyui/bench_sdxl.py --json

Method
- Every (case, repeat) runs in a fresh subprocess: one 1-step warm-up prompt (checkpoint load, LoRA
  patch, text encode), then the M-step and N-step prompts (new seeds, so ComfyUI's cache never
  skips the sampler); per-step cost = (t_N − t_M) / (N − M). Cases interleave (plain, npo, npo,
  plain, ...); figures are medians. Wall and process-CPU seconds are both reported.
- Memory per child: ru_maxrss (whole-process peak, includes the memory-mapped checkpoint pages
  while ComfyUI loads from them), the peak of RssAnon (private memory, sampled every 50 ms) and,
  after the runs, VmRSS split into RssAnon and RssFile (file-backed) from /proc/self/status.
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

import sdxl_build  # noqa: E402

DELTA_NAME = "bench_sdxl_delta.safetensors"
LORA_NAME = "bench_sdxl_style.safetensors"


def _prompt(case: str, steps: int, seed: int, res: int, cfg: float) -> dict:
    p = {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": sdxl_build.SDXL_CKPT_NAME}},
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


def _proc_mem() -> dict:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                out[k] = round(int(v.split()[0]) / 1024.0, 1)  # KiB -> MiB
    return out


class _AnonPeak:
    """Samples RssAnon every 50 ms in a thread: the private-memory peak (ru_maxrss also counts the
    checkpoint's memory-mapped, reclaimable file pages while ComfyUI reads from them)."""

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
    from conftest import Comfy

    anon = _AnonPeak()

    root = Path(tempfile.mkdtemp(prefix="npo_bench_sdxl_"))
    h = Comfy(root)
    from comfy import cli_args

    cli_args.args.bf16_unet = True
    (root / "checkpoints" / sdxl_build.SDXL_CKPT_NAME).symlink_to(sdxl_build.CACHE / sdxl_build.SDXL_CKPT_NAME)
    (root / "loras" / LORA_NAME).symlink_to(sdxl_build.CACHE / LORA_NAME)
    (root / "npo" / DELTA_NAME).symlink_to(sdxl_build.CACHE / DELTA_NAME)
    import torch

    seed, times, mem = 1000, {}, {}
    for label, steps in (("warmup", 1), ("m", args.m), ("n", args.n)):
        seed += 1
        w0, c0 = time.perf_counter(), time.process_time()
        out = h.run(_prompt(args.child, steps, seed, args.res, args.cfg), ["ks", "ckpt"])
        w1, c1 = time.perf_counter(), time.process_time()
        lat = out["ks"][0][0]["samples"]
        if not torch.isfinite(lat).all():
            raise RuntimeError(f"{args.child}: non-finite latent at {steps} steps")
        times[label] = {"wall": w1 - w0, "cpu": c1 - c0}
        mem[label] = _proc_mem()
        final = lat.flatten().tolist()
    m = out["ckpt"][0][0].model
    print("BENCH " + json.dumps({
        "case": args.child, "times": times, "final_latent": final, "mem_after_mib": mem,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "peak_rss_anon_mib": anon.stop(),
        "torch_threads": torch.get_num_threads(),
        "dtypes": {"unet_weights": str(m.get_dtype()), "unet_compute": str(m.manual_cast_dtype or m.get_dtype()),
                   "model_class": type(m).__name__},
    }), flush=True)


def _ensure_files() -> dict:
    sys.path.insert(0, os.environ["COMFYUI_PATH"])
    sdxl_build.ensure_random_sdxl()
    sdxl_build.ensure_npo_suite_importable()
    from npo_suite.core.offsets import save_offset

    delta = sdxl_build.random_sdxl_lora(21, rank=4, std=0.08)
    for name, off in ((LORA_NAME, sdxl_build.random_sdxl_lora(23, rank=4, std=0.03)), (DELTA_NAME, delta)):
        if not (sdxl_build.CACHE / name).exists():
            save_offset(off, sdxl_build.CACHE / name, format="kohya", family="sdxl")
    return {"rank": 4, "modules": len(delta.unet), "beta": 1.0, "alpha": 0.0}


def _run_child(case: str, args) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", case, "--m", str(args.m), "--n", str(args.n),
           "--res", str(args.res), "--cfg", str(args.cfg)]
    r = subprocess.run(cmd, check=False, capture_output=True, text=True, env=os.environ.copy())
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
    ap.add_argument("--repeats", type=int, default=2, help="fresh processes per case (interleaved)")
    ap.add_argument("--m", type=int, default=1, help="short run steps")
    ap.add_argument("--n", type=int, default=5, help="long run steps")
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
        for case in (("plain", "npo") if r % 2 == 0 else ("npo", "plain")):
            d = _run_child(case, args)
            runs[case].append(d)
            if not args.json:
                print(f"repeat {r} {case}: wall {d['wall_per_step']:.3f} s/step, cpu {d['cpu_per_step']:.3f} s/step, "
                      f"peak RSS {d['peak_rss_mib']:.0f} MiB", flush=True)

    def med(case, key):
        return statistics.median(d[key] for d in runs[case])

    import torch

    a, b = torch.tensor(runs["npo"][0]["final_latent"]), torch.tensor(runs["plain"][0]["final_latent"])
    npo_rel_diff = float((a - b).abs().max() / b.abs().max())
    if npo_rel_diff <= 1e-3:
        raise RuntimeError(f"Apply NPO did not change the result (rel diff {npo_rel_diff:.2e}): δ is not acting")
    res = {
        "bench": "comfyui_sdxl_apply_npo_vs_plain_ksampler",
        "device": f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                  f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, "
                  f"torch threads {runs['plain'][0]['torch_threads']})",
        "dtypes": runs["plain"][0]["dtypes"],
        "resolution": [args.res, args.res], "latent": [args.res // 8, args.res // 8], "batch": 1,
        "sampler": "euler", "scheduler": "normal", "cfg": args.cfg, "steps": {"m": args.m, "n": args.n},
        "repeats": args.repeats, "lora": {"loader": "LoraLoaderModelOnly", "strength": 1.0, "both_cases": True,
                                          "modules": delta["modules"]},
        "delta": delta, "npo_vs_plain_latent_rel_diff": round(npo_rel_diff, 4),
        "plain_s_per_step": round(med("plain", "wall_per_step"), 3),
        "npo_s_per_step": round(med("npo", "wall_per_step"), 3),
        "npo_over_plain": round(med("npo", "wall_per_step") / med("plain", "wall_per_step"), 4),
        "plain_cpu_s_per_step": round(med("plain", "cpu_per_step"), 3),
        "npo_cpu_s_per_step": round(med("npo", "cpu_per_step"), 3),
        "npo_over_plain_cpu": round(med("npo", "cpu_per_step") / med("plain", "cpu_per_step"), 4),
        "peak_rss_mib": {c: round(med(c, "peak_rss_mib"), 1) for c in runs},
        "peak_rss_anon_mib": {c: round(med(c, "peak_rss_anon_mib"), 1) for c in runs},
        "after_runs_mib": {c: runs[c][0]["mem_after_mib"]["n"] for c in runs},
        "all_wall_s_per_step": {c: [round(d["wall_per_step"], 3) for d in runs[c]] for c in runs},
        "all_cpu_s_per_step": {c: [round(d["cpu_per_step"], 3) for d in runs[c]] for c in runs},
        "loadavg_end": os.getloadavg(),
    }
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
