"""`python -m npo_suite generate MODEL --prompt TEXT --modes cfg npo --neg-offset neg.safetensors --out DIR`:
batch generation with cfg / npo / snpo guidance (diffusers_host/generate.py::run_generate).

Every prompt x seed is sampled in each mode from the same initial noise; writes the PNGs, grid.png
(rows: prompt x seed, columns: modes) and manifest.json.
"""
from __future__ import annotations

import argparse

from .model_flags import add_model_flags


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..families import family_names

    import torch

    from ..core.guidance import GUIDANCE, RESCALE_SPACES
    from ..diffusers_host.generate import FLOW_SCHEDULERS, NPO_PATHS, SCHEDULERS, GenerateJob

    d = GenerateJob(model="", out="")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    p.add_argument("model", help="diffusers folder, single-file .safetensors, or pixel-space world folder")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts", help="a .txt file (one prompt a line) or .jsonl ({prompt, negative_prompt?, seed?}; "
                                     "neg_prompt accepted for negative_prompt, docs/data.md)")
    p.add_argument("--negative-prompt", default=d.negative_prompt,
                   help="negative prompt of every --prompt / .txt prompt (cfg, npo; default: none)")
    p.add_argument("--modes", nargs="+", default=list(d.modes), choices=list(GUIDANCE),
                   help=f"guidance modes (same seeds; default: {' '.join(d.modes)})")
    p.add_argument("--pos-offset", help="positive offset eta (LoRA/diff file), applied to the conditional rows")
    p.add_argument("--alpha", type=float, default=d.alpha, help="weight of eta in the negative model "
                   f"(theta+alpha*eta+beta*delta; default {d.alpha}, as in the NPO paper, see docs/guidance.md)")
    p.add_argument("--neg-offset", help="negative offset delta (NPO LoRA), applied to the unconditional rows")
    p.add_argument("--beta", type=float, default=d.beta,
                   help=f"weight of delta in the negative model (npo) and of the SNPO LoRA (snpo; default {d.beta})")
    p.add_argument("--snpo-offset", help="SNPO LoRA s for --modes snpo: both branches run theta+eta+beta*s")
    p.add_argument("--cfg", type=float, default=d.cfg, help=f"guidance weight w (papers: omega = w - 1; default {d.cfg})")
    p.add_argument("--rescale", type=float, default=d.rescale, help=f"CFG rescale phi (Lin et al. 2023), 0 = off "
                                                                     f"(default {d.rescale})")
    p.add_argument("--rescale-space", default=d.rescale_space, choices=list(RESCALE_SPACES),
                   help=f"space of the CFG rescale (default {d.rescale_space})")
    p.add_argument("--steps", type=int, default=d.steps, help=f"sampler steps (default {d.steps})")
    p.add_argument("--flux-guidance", type=float, default=None,
                   help="Flux-dev's embedded guidance (default 3.5); lower it (1-2) when --cfg > 1 does the guiding")
    p.add_argument("--scheduler", default=None, choices=list(SCHEDULERS) + list(FLOW_SCHEDULERS),
                   help="default ddim; flow-euler for flow-matching models (SD3/SD3.5, Flux, SANA, the flow world)")
    p.add_argument("--sigma-min", type=float, default=d.sigma_min, help="negative offset on only for sigma >= this "
                                                                         "(default: no bound)")
    p.add_argument("--sigma-max", type=float, default=d.sigma_max, help="negative offset on only for sigma <= this "
                                                                         "(default: no bound)")
    p.add_argument("--height", type=int, default=d.height, help="pixels (default: the model's native size)")
    p.add_argument("--width", type=int, default=d.width, help="pixels (default: the model's native size)")
    p.add_argument("--seeds", type=int, nargs="+", default=list(d.seeds),
                   help=f"seeds of every prompt without its own (default: {' '.join(map(str, d.seeds))})")
    p.add_argument("--batch-size", type=int, default=d.batch_size,
                   help=f"images per forward (x2 rows for the two branches; default {d.batch_size})")
    p.add_argument("--npo-path", default=d.npo_path, choices=list(NPO_PATHS), help="fast: per-row offsets, one forward; "
                   f"two-model: merged copies (needed for offsets on norm layers; default {d.npo_path})")
    add_model_flags(p)
    p.add_argument("--family", choices=family_names(), default=None, help="model family (default: detected)")
    p.add_argument("--allow-pickle", action="store_true", help="allow .ckpt/.pt/.bin files (trusted files only)")
    p.add_argument("--dtype", default=d.dtype, choices=["float32", "float16", "bfloat16"], help=f"default {d.dtype}")
    p.add_argument("--device", default=device, help=f"default {device}")
    p.add_argument("--out", required=True, help="output folder: images, grid.png, manifest.json")


def job_from_args(args: argparse.Namespace):
    """The GenerateJob of parsed `generate` flags."""
    from ..diffusers_host.generate import GenerateJob

    return GenerateJob(model=args.model, out=args.out, prompt=tuple(args.prompt), prompts=args.prompts,
                       negative_prompt=args.negative_prompt, modes=tuple(args.modes), pos_offset=args.pos_offset,
                       neg_offset=args.neg_offset, snpo_offset=args.snpo_offset, alpha=args.alpha, beta=args.beta,
                       cfg=args.cfg, rescale=args.rescale, rescale_space=args.rescale_space, steps=args.steps,
                       scheduler=args.scheduler, flux_guidance=args.flux_guidance, sigma_min=args.sigma_min, sigma_max=args.sigma_max,
                       height=args.height, width=args.width, seeds=tuple(args.seeds), batch_size=args.batch_size,
                       npo_path=args.npo_path, tokenizer=args.tokenizer, vae=args.vae, model_config=args.model_config,
                       prediction_type=args.prediction_type, family=args.family,
                       allow_pickle=args.allow_pickle, dtype=args.dtype, device=str(args.device))


def main(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..diffusers_host.generate import run_generate

    manifest = run_generate(job_from_args(args))
    print(f"wrote {len(manifest['images'])} images, grid.png and manifest.json to {Path(args.out)}")
    return 0
