"""Step time / memory of NPO on flow-matching DiTs in real ComfyUI vs what a user would pick instead
(issue 23): plain CFG, our NPO (Apply NPO + stock KSampler: δ on the unconditional rows of the one
batched forward), ComfyUI's hook-LoRA path (Create Hook LoRA (MO) on the negative conditioning =
`CreateHookLoraModelOnly` + `Cond Pair Set Props`: the positive and negative run as two forwards
with the LoRA swapped in and out), and the dual-model path (Dual-Model NPO Guider with the negative
model = ComfyUI's own LoRA loader on the same file: two forwards, re-patched per step).
Companion of bench_comfy_npo.py (SD checkpoints through the prompt executor); the DiTs here are
built in-process by dit_build.py, so this script calls ComfyUI's sampling code directly. Not
collected by pytest. Run (figures in docs/BENCHMARKS.md):

    COMFYUI_PATH=/work/hosts/comfy/ComfyUI OMP_NUM_THREADS=2 /work/hosts/comfy/venv/bin/python \
        tests/comfyui/bench_dit_npo.py --models sd3,flux,wan,sd3d8 --repeats 3 --json

Method: every (model, case, repeat) is a fresh subprocess. In a child: build the model and the
random rank-8 kohya δ over every Linear of the transformer blocks (β = 1, no η), one 1-step
warm-up, then an M-step and an N-step run of the same seed; per-step cost = (t_N − t_M)/(N − M)
(wall and process-CPU seconds). Memory: the child's private memory (RssAnon, sampled every 5 ms)
above its level just before sampling, i.e. what sampling itself adds (activations, LoRA factors,
patched weight copies), and the whole-process ru_maxrss. Cases are interleaved per repeat; figures
are medians. Same image: the parent checks that the N-step latents of NPO, hook LoRA and dual model
agree (relative max difference <= 1e-4) and differ from plain CFG.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CASES = ("plain", "npo", "hook", "dual")
MODELS = {"sd3": ("SD3 depth 2 (hidden 128)", (1, 16, 32, 32)), "flux": ("Flux 2+2 blocks, hidden 64", (1, 16, 32, 32)),
          "wan": ("Wan 2.1 2 blocks, dim 64", (1, 16, 1, 32, 32)),
          "sd3d8": ("SD3 depth 8 (hidden 512, 8 heads)", (1, 16, 32, 32))}


def _rss_anon() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


def child(model_name: str, case: str, m: int, n: int, out_path: str) -> None:
    sys.path.insert(0, str(HERE))
    from conftest import Comfy

    Comfy(Path(tempfile.mkdtemp(prefix="npo_bench_")))
    import torch
    from safetensors.torch import save_file

    import comfy.hooks
    import comfy.samplers
    import comfy.sd
    import dit_build
    import nodes
    from comfy_extras.nodes_custom_sampler import Noise_RandomNoise, SamplerCustomAdvanced
    from npo_suite.core.npo import NPOSpec
    from npo_suite.core.offsets import load_offset_file_keys
    from npo_suite.nodes.comfy.branch import Guider_DualModelNPO, apply_npo

    torch.manual_seed(0)
    builder = {"sd3": dit_build.tiny_sd3, "flux": dit_build.tiny_flux, "wan": dit_build.tiny_wan,
               "sd3d8": lambda: dit_build.tiny_sd3(depth=8)}[model_name]
    prefixes = {"sd3": ("joint_blocks.",), "sd3d8": ("joint_blocks.",), "flux": ("double_blocks.", "single_blocks."),
                "wan": ("blocks.",)}[model_name]
    model = builder()
    clip = dit_build.tiny_clip()
    pos, neg = dit_build.encode(clip, "a photo of a red cube"), dit_build.encode(clip, "blurry")
    if model_name == "flux":
        import node_helpers

        pos, neg = (node_helpers.conditioning_set_values(c, {"guidance": 1.0}) for c in (pos, neg))
    lora_sd = dit_build.kohya_lora(dit_build.linear_modules(model, prefixes), seed=1, rank=8)
    path = Path(tempfile.mkdtemp()) / "delta.safetensors"
    save_file(lora_sd, str(path))
    shape = MODELS[model_name][1]
    cfg = 3.0
    if case == "npo":
        run_model, _ = apply_npo(model, NPOSpec(delta=load_offset_file_keys(path), alpha=0.0, beta=1.0))
    elif case == "hook":
        hooks = comfy.hooks.create_hook_lora(lora=lora_sd, strength_model=1.0, strength_clip=0.0)
        (neg,) = comfy.hooks.set_conds_props(conds=[neg], strength=1.0, set_cond_area="default", hooks=hooks)
        run_model = model
    else:
        run_model = model

    def sample(steps: int, seed: int = 5):
        latent = {"samples": torch.zeros(shape)}
        if case == "dual":
            neg_model, _ = comfy.sd.load_lora_for_models(model, None, lora_sd, 1.0, 0)
            g = Guider_DualModelNPO(model, neg_model)
            g.set_conds(pos, neg)
            g.set_cfg(cfg)
            sig = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "simple", steps).cpu()
            return SamplerCustomAdvanced().sample(Noise_RandomNoise(seed), g, comfy.samplers.sampler_object("euler"),
                                                  sig, latent)[0]["samples"]
        return nodes.common_ksampler(run_model, seed, steps, cfg, "euler", "simple", pos, neg, latent)[0]["samples"]

    sample(1)
    base = _rss_anon()
    peak = [base]
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_anon())
            time.sleep(0.005)

    th = threading.Thread(target=watch, daemon=True)
    th.start()
    times = {}
    for steps in (m, n):
        t0, c0 = time.perf_counter(), time.process_time()
        lat = sample(steps)
        times[steps] = (time.perf_counter() - t0, time.process_time() - c0)
    stop.set()
    th.join()
    torch.save(lat, out_path + ".pt")
    res = {"wall": (times[n][0] - times[m][0]) / (n - m), "cpu": (times[n][1] - times[m][1]) / (n - m),
           "sampling_mib": (peak[0] - base) / 2**20, "maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    Path(out_path).write_text(json.dumps(res))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="sd3,flux,wan,sd3d8")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--m", type=int, default=2)
    ap.add_argument("--n", type=int, default=6)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--child", nargs=3, metavar=("MODEL", "CASE", "OUT"))
    a = ap.parse_args()
    if a.child:
        child(a.child[0], a.child[1], a.m, a.n, a.child[2])
        return
    import torch

    tmp = Path(tempfile.mkdtemp(prefix="npo_dit_bench_"))
    report = {}
    for model_name in a.models.split(","):
        runs = {c: [] for c in CASES}
        latents = {}
        for r in range(a.repeats):
            order = CASES if r % 2 == 0 else tuple(reversed(CASES))
            for case in order:
                out = tmp / f"{model_name}_{case}_{r}.json"
                subprocess.run([sys.executable, __file__, "--m", str(a.m), "--n", str(a.n), "--child", model_name, case,
                                str(out)], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                runs[case].append(json.loads(out.read_text()))
                latents[case] = torch.load(str(out) + ".pt")

        def rel(x, y):
            return float((latents[x] - latents[y]).abs().max() / latents[y].abs().max())

        checks = {"npo_vs_hook": rel("npo", "hook"), "npo_vs_dual": rel("npo", "dual"), "npo_vs_plain": rel("npo", "plain")}
        assert checks["npo_vs_hook"] <= 1e-4 and checks["npo_vs_dual"] <= 1e-4 and checks["npo_vs_plain"] > 1e-2, checks
        med = {c: {k: statistics.median(x[k] for x in runs[c]) for k in runs[c][0]} for c in CASES}
        report[model_name] = {"label": MODELS[model_name][0], "latent": MODELS[model_name][1], "median": med,
                              "all": runs, "same_image": checks,
                              "ratios": {"npo/plain wall": med["npo"]["wall"] / med["plain"]["wall"],
                                         "npo/plain cpu": med["npo"]["cpu"] / med["plain"]["cpu"],
                                         "npo/hook cpu": med["npo"]["cpu"] / med["hook"]["cpu"],
                                         "npo/dual cpu": med["npo"]["cpu"] / med["dual"]["cpu"]}}
        print(json.dumps({model_name: report[model_name]["median"], "ratios": report[model_name]["ratios"],
                          "same_image": checks}), flush=True)
    if a.json:
        print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
