"""`python -m npo_suite pairs`: preference pairs from a model's own samples (evaluation/pairs.py).

    python -m npo_suite pairs --model M --prompts prompts.txt --samples-per-prompt 8 --scorer pickscore \\
        --model-path ./PickScore_v1 --processor-path ./CLIP-H --out data/mine
    python -m npo_suite pairs --from-run runs/gen:cfg --scorer world_reward --out data/from_run

Samples come from the project's sampler (`diffusers_host.generate.sample`; any --mode, offsets
allowed) on fixed seeds, or from an existing `generate` run. A re-run into the same --out resumes.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .evaluate import _scorer_options, scorer_settings
from .model_flags import add_model_flags, load_kwargs


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..families import family_names

    from ..core.guidance import GUIDANCE
    from ..diffusers_host.generate import FLOW_SCHEDULERS, SCHEDULERS
    from ..evaluation.pairing import PAIR_RULES

    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="model to sample from (diffusers folder, single-file .safetensors, world folder)")
    src.add_argument("--from-run", help="an existing generate run: manifest.json or its folder, optionally PATH:MODE")
    p.add_argument("--prompts", help="a .txt file (one prompt a line) or .jsonl ({prompt, negative_prompt?, seed?})")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--negative-prompt", default="", help="negative prompt of every --prompt / .txt prompt")
    p.add_argument("--samples-per-prompt", type=int, default=8, help="K samples per prompt (seeds below)")
    p.add_argument("--seed-start", type=int, default=100_000, help="prompt i's seeds are seed-start + i*K + k "
                   "(a .jsonl line's own seed s gives s + k); away from the evaluation seeds 0..n")
    p.add_argument("--mode", default="cfg", choices=list(GUIDANCE), help="guidance mode of the samples")
    p.add_argument("--pos-offset", help="positive offset eta (LoRA/diff file), conditional rows")
    p.add_argument("--neg-offset", help="negative offset delta (NPO LoRA), unconditional rows")
    p.add_argument("--snpo-offset", help="SNPO LoRA for --mode snpo")
    p.add_argument("--alpha", type=float, default=1.0)
    p.add_argument("--beta", type=float, default=1.0)
    p.add_argument("--cfg", type=float, default=7.5, help="guidance weight w")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--scheduler", default=None, choices=list(SCHEDULERS) + list(FLOW_SCHEDULERS),
                   help="default ddim; flow-euler for flow-matching models (SD3/SD3.5, Flux, SANA, the flow world)")
    p.add_argument("--flux-guidance", type=float, default=None,
                   help="Flux-dev's embedded guidance (default 3.5); lower it (1-2) when --cfg > 1 does the guiding")
    p.add_argument("--sigma-min", type=float, default=None)
    p.add_argument("--sigma-max", type=float, default=None)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=16, help="images rendered and scored per step of the resume log")
    add_model_flags(p)
    p.add_argument("--family", choices=family_names(), default=None)
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--rule", default="best_worst", choices=list(PAIR_RULES),
                   help="pairing rule: " + "; ".join(f"{k}: {v[1]}" for k, v in PAIR_RULES.items()))
    p.add_argument("--margin", type=float, default=0.05, help="pairs whose scores differ by <= this are near-ties: dropped, counted")
    p.add_argument("--out", required=True, help="dataset folder: pairs.jsonl, images/, samples.jsonl, report.md")
    p.add_argument("--json", action="store_true", help="print one JSON line with the summary")
    _scorer_options(p, multiple=False)


def _items(args) -> list[dict]:
    from ..diffusers_host.generate import read_prompts

    return read_prompts(args.prompt, args.prompts, args.negative_prompt, seeds=())


def _model_source(args):
    """(jobs, render, config, duplicate prompts) for --model: generate.sample on fixed seeds."""
    import torch

    from ..diffusers_host.generate import load_offsets, sample, to_pil
    from ..families.loading import load_model, model_fingerprint
    from ..evaluation.pairs import plan_jobs

    jobs, dups = plan_jobs(_items(args), args.samples_per_prompt, args.seed_start)
    bundle = load_model(args.model, family=args.family, dtype=getattr(torch, args.dtype), device=args.device,
                        allow_pickle=args.allow_pickle, **load_kwargs(args))
    offsets, info = load_offsets(bundle, pos=args.pos_offset, neg=args.neg_offset, snpo=args.snpo_offset,
                                 alpha=args.alpha, beta=args.beta, allow_pickle=args.allow_pickle)
    settings = dict(cfg_scale=args.cfg, steps=args.steps, scheduler=args.scheduler or bundle.family_spec.default_scheduler,
                    sigma_min=args.sigma_min, sigma_max=args.sigma_max, height=args.height, width=args.width,
                    flux_guidance=args.flux_guidance)

    def render(chunk):
        res = sample(bundle, [j.prompt for j in chunk], [j.seed for j in chunk], args.mode,
                     negative_prompts=[j.negative_prompt for j in chunk], offsets=offsets, **settings)
        return [to_pil(im) for im in res.images]
    config = {"source": "model", "model": str(args.model), "model_hash": model_fingerprint(bundle), "mode": args.mode,
              "offsets": {k: v["path"] for k, v in info.items()}, "alpha": args.alpha, "beta": args.beta,
              "dtype": args.dtype, **settings}
    return jobs, render, config, dups


def _run_source(args):
    """(jobs, render, config, duplicates) for --from-run: the run's images, copied into --out."""
    from PIL import Image

    from ..evaluation.pairs import Job
    from ..evaluation.runs import manifest_path, read_run

    entries = read_run(args.from_run)
    spec = args.from_run if Path(args.from_run).exists() else args.from_run.rsplit(":", 1)[0]
    manifest = json.loads(manifest_path(Path(spec)).read_text(encoding="utf-8"))
    negs = {str(r.get("file") or r.get("path") or r.get("image")): str(r.get("negative_prompt") or "")
            for r in (manifest.get("images", []) if isinstance(manifest, dict) else manifest)}
    by_job, dups = {}, 0
    for e in entries:
        if e.seed is None:
            raise ValueError(f"{args.from_run}: image {e.path.name} has no seed; pairs need (prompt, seed) per image")
        j = Job(e.prompt, negs.get(e.path.name, ""), e.seed)
        if j in by_job:
            dups += 1
            continue
        by_job[j] = e.path

    def render(chunk):
        out = []
        for j in chunk:
            with Image.open(by_job[j]) as im:
                out.append(im.copy())
        return out
    config = {"source": "run", "run": str(args.from_run),
              "model_hash": manifest.get("model_hash") if isinstance(manifest, dict) else None}
    return list(by_job), render, config, dups


def _scorer_config(args) -> dict:
    s = {k: v for k, v in scorer_settings(args).items() if k not in ("device", "allow_pickle")}
    if args.scorer.startswith("world_") and s["world"] is None and args.model and (Path(args.model) / "reward").is_dir():
        s["world"] = str(args.model)  # the world's own reward when sampling a world
    return s


def main(args) -> int:
    from tqdm import tqdm

    from ..evaluation.pairs import build_dataset
    from ..evaluation.scorers import make_scorer

    try:
        sc = _scorer_config(args)
        scorer = make_scorer(args.scorer, **{**scorer_settings(args), **sc})  # before any sampling: fail fast
        jobs, render, config, dups = _model_source(args) if args.model else _run_source(args)
        config["scorer"] = {"name": args.scorer, **sc}
        out = Path(args.out)
        with tqdm(total=len(jobs), desc="pairs", unit="img", file=sys.stderr) as bar:
            res = build_dataset(out, jobs, render, scorer, scorer_name=args.scorer, rule=args.rule, margin=args.margin,
                                config=config, batch_size=args.batch_size, progress=bar.update,
                                extra={"duplicate_prompts": dups})
    except (FileNotFoundError, ValueError, ImportError) as e:
        print(f"pairs: error: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(res))
    else:
        print(f"pairs: {res['pairs']} pairs from {res['samples']} samples ({res['new']} new, {res['resumed']} resumed; "
              f"{res['near_ties']} near-ties dropped, {dups} duplicate prompts dropped) -> {res['pairs_file']}; "
              f"report: {res['report']}")
    return 0

