"""Step time / memory of NPO on flow-matching DiTs in real ComfyUI vs what a user would pick instead
(issue 23): plain CFG, our NPO (Apply NPO + stock KSampler: δ on the unconditional rows of the one
batched forward), ComfyUI's hook-LoRA path (`CreateHookLoraModelOnly` + `ConditioningSetProperties`
on the negative: the positive and negative run as two forwards with the LoRA patched in and out), and the dual-model path (Dual-Model NPO Guider with the negative
model = ComfyUI's own LoRA loader on the same file: two forwards, re-patched per step).
Companion of bench_comfy_npo.py (SD checkpoints through the prompt executor); the DiTs here are
built in-process by dit_build.py, so this script calls ComfyUI's sampling code directly. Not
collected by pytest. Run (figures in docs/BENCHMARKS.md):

    COMFYUI_PATH=/work/hosts/comfy/ComfyUI OMP_NUM_THREADS=1 /work/hosts/comfy/venv/bin/python \
        tests/comfyui/bench_dit_npo.py --models sd3,flux,wan,sd3d8 --repeats 3 --json

Each path is built with the nodes a user would wire: NPO = Load Weight Offset -> Apply NPO -> KSampler;
hook = Create Hook LoRA (MO) -> Cond Set Props on the negative only (the single-conditioning node: the
"pair" node would put the LoRA on both prompts) -> KSampler; dual = LoraLoaderModelOnly -> Dual-Model
NPO Guider -> SamplerCustomAdvanced; plain = KSampler. All fp32 on CPU, cfg 3, euler / simple.

Method: every (model, case, repeat) is a fresh subprocess. In a child: build the model and the
random rank-8 kohya δ (alpha 8) over every Linear of the transformer blocks (β = 1, no η), one
1-step warm-up, then an M-step and an N-step run of the same seed; per-step cost = (t_N − t_M)/(N − M)
(wall and process-CPU seconds). Memory: the child's private memory (RssAnon, sampled every 5 ms):
its peak over the warm-up and both runs (peak_anon_mib: weights, activations, LoRA factors, weight
backups / patched copies), the same minus the level just before the first sampling (sampling_mib),
and the whole-process ru_maxrss. Cases are interleaved per repeat; figures are medians. Same image: the parent checks that the N-step latents of NPO, hook LoRA and dual model
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
NEGATIVE = "blurry, low quality, watermark, jpeg artifacts, text, deformed"
CASES = ("plain", "npo", "hook", "dual")
MODELS = {"sd3": ("SD3 depth 2 (hidden 128)", (1, 16, 32, 32)), "flux": ("Flux 2+2 blocks, hidden 64", (1, 16, 32, 32)),
          "wan": ("Wan 2.1 2 blocks, dim 64", (1, 16, 1, 32, 32)),
          "sd3d8": ("SD3 depth 8 (hidden 512, 8 heads)", (1, 16, 32, 32)),
          "sd3d8_512": ("SD3 depth 8 (hidden 512, 8 heads) at 512 px", (1, 16, 64, 64))}


def _rss_anon() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


def child(model_name: str, case: str, m: int, n: int, out_path: str) -> None:
    sys.path.insert(0, str(HERE))
    from conftest import Comfy

    import atexit
    import shutil

    root = Path(tempfile.mkdtemp(prefix="npo_bench_"))
    atexit.register(shutil.rmtree, root, True)  # the child's ComfyUI folders (its LoRA file), nothing left in /tmp
    harness = Comfy(root)
    import torch
    from safetensors.torch import save_file

    import comfy.samplers
    import dit_build
    import nodes
    from comfy_extras.nodes_custom_sampler import Noise_RandomNoise, SamplerCustomAdvanced
    from comfy_extras.nodes_hooks import ConditioningSetProperties, CreateHookLoraModelOnly
    from npo_suite.nodes.offsets import LoadWeightOffset
    from npo_suite.nodes.sampling import ApplyNPO, DualModelNPOGuider

    torch.manual_seed(0)
    builder = {"sd3": dit_build.tiny_sd3, "flux": dit_build.tiny_flux, "wan": dit_build.tiny_wan,
               "sd3d8": lambda: dit_build.tiny_sd3(depth=8), "sd3d8_512": lambda: dit_build.tiny_sd3(depth=8, pos_embed_max_size=32)}[model_name]
    prefixes = {"sd3": ("joint_blocks.",), "sd3d8": ("joint_blocks.",), "sd3d8_512": ("joint_blocks.",), "flux": ("double_blocks.", "single_blocks."),
                "wan": ("blocks.",)}[model_name]
    model = builder()
    clip = dit_build.tiny_clip()
    pos, neg = dit_build.encode(clip, "a photo of a red cube"), dit_build.encode(clip, NEGATIVE)
    if model_name == "flux":  # real CFG on a guidance-distilled layout: FluxGuidance lowered on both prompts
        import node_helpers

        pos, neg = (node_helpers.conditioning_set_values(c, {"guidance": 1.0}) for c in (pos, neg))
    # rank-8 δ with alpha = rank (scale 1) over every Linear of the transformer blocks, in ComfyUI's loras folder
    lora_sd = dit_build.kohya_lora(dit_build.linear_modules(model, prefixes), seed=1, rank=8, std=0.1, alpha=8.0)
    save_file(lora_sd, str(harness.root / "loras" / "delta.safetensors"))
    shape = MODELS[model_name][1]
    cfg = 3.0
    run_model = model
    # every case reads the file with Load Weight Offset (the same modules imported, the same file read),
    # so the memory figures differ by what each path does, not by which of this package's modules it imports
    offset = LoadWeightOffset.execute("loras/delta.safetensors").args[0]
    if case == "npo":  # Load Weight Offset -> Apply NPO -> stock KSampler
        run_model = ApplyNPO.execute(model, negative_offset=offset, beta=1.0, alpha=0.0).args[0]
    else:
        import gc

        del offset
        gc.collect()
    if case == "hook":  # Create Hook LoRA (MO) -> Cond Set Props on the negative only -> stock KSampler
        (hooks,) = CreateHookLoraModelOnly().create_hook_model_only("delta.safetensors", 1.0)
        (neg,) = ConditioningSetProperties().set_properties(neg, 1.0, "default", hooks=hooks)
    elif case == "dual":  # LoraLoaderModelOnly -> Dual-Model NPO Guider -> SamplerCustomAdvanced
        (neg_model,) = nodes.LoraLoaderModelOnly().load_lora_model_only(model, "delta.safetensors", 1.0)

    def sample(steps: int, seed: int = 5):
        latent = {"samples": torch.zeros(shape)}
        if case == "dual":
            g = DualModelNPOGuider.execute(model, neg_model, pos, neg, cfg).args[0]
            sig = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "simple", steps).cpu()
            return SamplerCustomAdvanced().sample(Noise_RandomNoise(seed), g, comfy.samplers.sampler_object("euler"),
                                                  sig, latent)[0]["samples"]
        return nodes.common_ksampler(run_model, seed, steps, cfg, "euler", "simple", pos, neg, latent)[0]["samples"]

    base = _rss_anon()  # model, CLIP, LoRA file and the path's setup built; nothing sampled yet
    peak = [base]
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_anon())
            time.sleep(0.005)

    th = threading.Thread(target=watch, daemon=True)
    th.start()
    sample(1)  # warm-up (inside the memory window: weight backups / patched copies made on first use count)
    times = {}
    for steps in (m, n):
        t0, c0 = time.perf_counter(), time.process_time()
        lat = sample(steps)
        times[steps] = (time.perf_counter() - t0, time.process_time() - c0)
    stop.set()
    th.join()
    torch.save(lat, out_path + ".pt")
    res = {"wall": (times[n][0] - times[m][0]) / (n - m), "cpu": (times[n][1] - times[m][1]) / (n - m),
           "sampling_mib": (peak[0] - base) / 2**20, "peak_anon_mib": peak[0] / 2**20, "maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "torch_threads": torch.get_num_threads()}
    Path(out_path).write_text(json.dumps(res))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="sd3,flux,wan,sd3d8")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--m", type=int, default=2)
    ap.add_argument("--n", type=int, default=12)
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
                                         "npo/dual cpu": med["npo"]["cpu"] / med["dual"]["cpu"],
                                         "npo/plain peak_anon": med["npo"]["peak_anon_mib"] / med["plain"]["peak_anon_mib"],
                                         "hook/plain peak_anon": med["hook"]["peak_anon_mib"] / med["plain"]["peak_anon_mib"],
                                         "dual/plain peak_anon": med["dual"]["peak_anon_mib"] / med["plain"]["peak_anon_mib"]}}
        print(json.dumps({model_name: report[model_name]["median"], "ratios": report[model_name]["ratios"],
                          "same_image": checks}), flush=True)
    import shutil

    shutil.rmtree(tmp, True)
    if a.json:
        print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
