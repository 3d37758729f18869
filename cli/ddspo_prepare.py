"""`python -m npo_suite ddspo-prepare --model M --prompts P --out DIR`: DDSPO winner (and loser) latents from
prompts (core/ddspo_format.py describes the folder it writes; a rerun into the same --out resumes).
"""
from __future__ import annotations

import argparse

from .model_flags import add_model_flags, load_kwargs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    import torch

    from ..core.ddspo_format import DTYPES
    from ..trainer.ddspo import rewriter_names

    device = "cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument("--model", required=True, help="reference model: a diffusers folder, a single-file .safetensors (SD1.x / SDXL) or a "
                        "plug-in family's folder (the digits world)")
    add_model_flags(parser)
    parser.add_argument("--prompts", required=True, help="prompts file: .txt (one per line) or .jsonl "
                        "({prompt, id?, negative_prompt? (alias neg_prompt)})")
    parser.add_argument("--out", required=True, help="output folder (rerun with the same folder to resume)")
    parser.add_argument("--losers", choices=("generate", "none"), default="generate",
                        help="generate loser images from the degraded prompts, or none (efficient variant)")
    parser.add_argument("--rewriter", choices=sorted(rewriter_names()), default="drop_words",
                        help="how c⁻ is made when a record has no neg_prompt")
    parser.add_argument("--min-frac", type=float, default=0.4, help="drop_words: least fraction of words removed")
    parser.add_argument("--max-frac", type=float, default=0.7, help="drop_words: largest fraction of words removed")
    parser.add_argument("--rewriter-path", default=None, help="local_lm: local transformers model folder")
    parser.add_argument("--steps", type=int, default=25, help="DDIM steps (paper: 25)")
    parser.add_argument("--cfg", type=float, default=None, help="guidance scale (default 7.5 SD1.x, 5.0 SDXL)")
    parser.add_argument("--height", type=int, default=None, help="image height (default: the model's)")
    parser.add_argument("--width", type=int, default=None, help="image width (default: the model's)")
    parser.add_argument("--seed", type=int, default=0, help="run seed; each item's noise seed derives from (seed, id)")
    parser.add_argument("--batch-size", type=int, default=1, help="prompts per generation batch (= manifest chunk)")
    parser.add_argument("--limit", type=int, default=None, help="stop after this many new items")
    parser.add_argument("--store-dtype", choices=sorted(DTYPES), default="float16", help="dtype of stored latents")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="model dtype for generation")
    parser.add_argument("--device", default=device, help=f"default {device}")
    parser.add_argument("--save-images", action="store_true", help="also decode and save PNGs")


def config_from_args(args: argparse.Namespace):
    """The PrepareConfig (the settings recorded in ddspo_config.json) of parsed flags."""
    from pathlib import Path

    from ..core.ddspo_format import PrepareConfig

    return PrepareConfig(model=str(Path(args.model).resolve()), losers=args.losers, rewriter=args.rewriter,
                         min_frac=args.min_frac, max_frac=args.max_frac, rewriter_path=args.rewriter_path,
                         steps=args.steps, cfg=args.cfg, height=args.height, width=args.width, seed=args.seed,
                         store_dtype=args.store_dtype)


def main(args: argparse.Namespace) -> int:
    from ..core.ddspo_format import DTYPES
    from ..core.prompts import read_prompts_file
    from ..core.summary import DataSummary
    from ..diffusers_host.ddspo_prepare import load_reference, prepare
    from ..trainer.ddspo import build_rewriter

    cfg = config_from_args(args)
    summary = DataSummary("prompts")
    records = [rec for rec, _ in read_prompts_file(args.prompts, summary)]
    summary.print()
    rewriter = build_rewriter(cfg.rewriter, cfg.min_frac, cfg.max_frac, cfg.rewriter_path)
    bundle = load_reference(args.model, DTYPES[args.dtype], args.device, **load_kwargs(args))
    stats = prepare(bundle, records, args.out, cfg, batch_size=args.batch_size, limit=args.limit,
                    save_images=args.save_images, rewriter=rewriter)
    print(f"ddspo-prepare: {stats['done']} generated, {stats['skipped_done']} already done, "
          f"{stats['total']} in {args.out}")
    return 0
