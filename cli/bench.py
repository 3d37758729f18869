"""`python -m npo_suite bench guidance|train`: benchmarks (step time and memory; docs/BENCHMARKS.md).

  bench guidance   per-step time and peak memory: CFG (LoRA merged), NPO fast path, NPO two-model path
  bench train      training step time and memory of every method against the least work of a pair step

The measuring lives in benchmarks/ (typed configs in, dicts out); this module parses and prints.
"""
from __future__ import annotations

import argparse
import json


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="name", metavar="NAME", required=True)
    device = _default_device()
    p = sub.add_parser("guidance", help="per-step time and peak memory: CFG (LoRA merged), NPO fast path, NPO two-model path",
                       description="What NPO guidance costs per sampling step (benchmarks/guidance.py).")
    p.add_argument("--json", action="store_true", help="print one JSON object (else a table)")
    p.add_argument("--full-size", action="store_true", help="random-init SD1.5-sized UNet (860M params)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per case (default 5 full size, 20 tiny)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per case (default 2)")
    p.add_argument("--rank", type=int, default=32, help="rank of the random eta and delta LoRAs (default 32)")
    p.add_argument("--latent", type=int, default=None, help="latent side (default 32 full size, 16 tiny)")
    p.add_argument("--batch", type=int, default=1, help="images per step (each case runs 2*batch rows; default 1)")
    p.add_argument("--alpha", type=float, default=0.5, help="weight of eta in the negative model (default 0.5)")
    p.add_argument("--beta", type=float, default=1.0, help="weight of delta in the negative model (default 1.0)")
    p.add_argument("--device", default=device, help=f"default {device}")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="default float16 on CUDA, float32 on CPU")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: OMP_NUM_THREADS or 1)")
    t = sub.add_parser("train", help="training step time and memory",
                       description="Per-step time and peak memory of every method in METHODS (benchmarks/train.py).")
    t.add_argument("--json", action="store_true", help="print one JSON line")
    t.add_argument("--full-size", action="store_true", help="SD1.5-sized UNet (random init) instead of the tiny model")
    t.add_argument("--latent", type=int, default=None, help="latent side (default: 8 tiny, 16 full size)")
    t.add_argument("--batch", type=int, default=None, help="pairs per step (default: 2 tiny, 1 full size)")
    t.add_argument("--warmup", type=int, default=None, help="warm-up rounds (default: 3 tiny, 1 full size)")
    t.add_argument("--iters", type=int, default=None, help="timed rounds (default: 15 tiny, 3 full size)")
    t.add_argument("--methods", nargs="+", default=None, help="subset of METHODS (default: all)")
    t.add_argument("--device", default=device, help=f"default {device}")
    _add_gpu(sub)
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="method hyper-parameter for every method (e.g. --set tdft_k=25), as `train --set`")


def _add_gpu(sub) -> None:
    g = sub.add_parser("gpu", help="the GPU check (<= 8 min): peak memory and step time of sd15_8gb and sdxl_12gb "
                                   "at full size with random weights beside their traced estimates, NPO vs CFG "
                                   "sampling it/s at 512 and 1024 px; one JSON line")
    g.add_argument("--tiny", action="store_true", help="the tiny test models instead of full size (any device)")
    g.add_argument("--device", default="cuda", help="default cuda; --tiny --device cpu for the self-test")
    g.add_argument("--steps", type=int, default=3, help="timed optimizer steps per preset (default 3)")


def _gpu(args) -> int:
    import sys

    from ..benchmarks.gpu import GpuBenchConfig, NoGpu, run

    try:
        res = run(GpuBenchConfig(tiny=args.tiny, device=args.device, steps=args.steps))
    except NoGpu as e:
        print(e, file=sys.stderr)
        return 2
    print(json.dumps(res))
    return 0


def guidance_config(args: argparse.Namespace):
    from ..benchmarks.guidance import GuidanceBenchConfig

    return GuidanceBenchConfig(full_size=args.full_size, steps=args.steps, warmup=args.warmup, rank=args.rank,
                               latent=args.latent, batch=args.batch, alpha=args.alpha, beta=args.beta,
                               device=str(args.device), dtype=args.dtype, threads=args.threads)


def train_config(args: argparse.Namespace):
    from ..benchmarks.train import TrainBenchConfig

    return TrainBenchConfig(full_size=args.full_size, latent=args.latent, batch=args.batch, warmup=args.warmup,
                            iters=args.iters, methods=tuple(args.methods) if args.methods else None,
                            device=args.device, sets=tuple(args.set))


def _guidance(args) -> int:
    from ..benchmarks.guidance import CASES, run

    res = run(guidance_config(args))
    if args.json:
        print(json.dumps(res, indent=2))
        return 0
    print(f"bench guidance on {res['device']} ({res['dtype']}, {res['threads']} threads), UNet {res['unet_params'] / 1e6:.1f}M params, "
          f"latent {res['latent']}x{res['latent']}, batch {res['batch']}, LoRA rank {res['rank']} on {res['lora_modules']} modules")
    print(f"{'case':<15}{'step (ms)':>12}{'peak mem (MiB)':>16}")
    for k in CASES:
        print(f"{k:<15}{res['step_s'][k] * 1e3:>12.1f}{res['peak_mem_bytes'][k] / 2**20:>16.1f}")
    print(f"npo_fast_over_cfg={res['npo_fast_over_cfg']:.3f}  npo_two_model_over_cfg={res['npo_two_model_over_cfg']:.3f}  "
          f"mem_npo_fast_over_cfg={res['mem_npo_fast_over_cfg']:.3f}  mem_npo_two_model_over_cfg={res['mem_npo_two_model_over_cfg']:.3f}")
    return 0


def _train(args) -> int:
    from ..benchmarks.train import run

    res = run(train_config(args))
    if args.json:
        print(json.dumps(res))
        return 0
    print(f"{res['model']} on {res['device']}: batch {res['batch_pairs']} pairs, latent {res['latent']}^2, "
          f"median of {res['rounds']} rounds")
    print(f"{'method':<12}{'step s':>10}{'least s':>10}{'ratio':>8}{'peak MB':>10}")
    for n, m in res["methods"].items():
        print(f"{n:<12}{m['step_s']:>10.4f}{m['least_work_s']:>10.4f}{m['ratio']:>8.2f}{m['peak_mem_mb']:>10.1f}")
    if "snpo_over_dpo" in res:
        print(f"snpo / dpo = {res['snpo_over_dpo']:.3f}")
    return 0


def main(args: argparse.Namespace) -> int:
    return {"guidance": _guidance, "train": _train, "gpu": _gpu}[args.name](args)
