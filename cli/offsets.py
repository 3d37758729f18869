"""`python -m npo_suite offsets`: inspect, convert, extract and merge weight offsets.

  offsets inspect FILE [--base MODEL_DIR] [--json] [--no-strict]
  offsets convert IN OUT --format kohya|peft|diff [--base MODEL_DIR]
  offsets extract --tuned A --base B --rank R [--conv-rank R] --out F [--format kohya|peft]
  offsets merge --base DIR --offset F:SCALE [--offset F:SCALE ...] --out DIR
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..core import offsets as O
from ..core.offsets.schema import metadata_lines, npo_metadata, read_npo_metadata
from ..core.atomic import atomic_dir


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = sub.add_parser("inspect", help="print what a file holds (format, family, modules, metadata)")
    p.add_argument("file")
    p.add_argument("--base", help="diffusers model folder or single-file checkpoint (.safetensors, its UNet) to check "
                                  "names and shapes against (without it nothing is checked: the file's own module "
                                  "names, format, detected family, metadata)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--no-strict", action="store_true", help="with --base: list unmatched keys instead of failing")
    p.add_argument("--allow-pickle", action="store_true", help="allow .ckpt/.pt/.bin files (runs no code: weights_only)")
    p = sub.add_parser("convert", help="rewrite an offset in another format")
    p.add_argument("input")
    p.add_argument("output")
    p.add_argument("--format", choices=O.FORMATS, default="kohya")
    p.add_argument("--base", help="diffusers model folder (needed for non-standard SDXL-shaped UNets)")
    p.add_argument("--allow-pickle", action="store_true")
    p = sub.add_parser("extract", help="SVD-extract a LoRA from a fine-tuned UNet minus its base")
    p.add_argument("--tuned", required=True, help="diffusers folder or UNet .safetensors (diffusers or LDM names)")
    p.add_argument("--base", required=True, help="diffusers folder or UNet .safetensors")
    p.add_argument("--rank", type=int, required=True, help="rank of Linear and 1x1 conv LoRAs")
    p.add_argument("--conv-rank", type=int, default=None, help="rank of 3x3 conv LoRAs (default: --rank)")
    p.add_argument("--out", required=True, help="output .safetensors")
    p.add_argument("--format", choices=("kohya", "peft"), default="kohya")
    p.add_argument("--json", action="store_true", help="print the error report as JSON")
    p = sub.add_parser("merge", help="write a diffusers folder with theta + sum scale_i * offset_i")
    p.add_argument("--base", required=True, help="diffusers model folder")
    p.add_argument("--offset", action="append", required=True, metavar="FILE[:SCALE]", help="offset and its scale (default 1)")
    p.add_argument("--out", required=True, help="output folder (must not exist unless --overwrite)")
    p.add_argument("--overwrite", action="store_true")


def main(args) -> int:
    try:
        return {"inspect": _inspect, "convert": _convert, "extract": _extract, "merge": _merge}[args.action](args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def parse_offset_arg(text: str) -> tuple[str, float]:
    """'file.safetensors:0.8' -> (file, 0.8); a missing or non-numeric tail means scale 1."""
    head, sep, tail = text.rpartition(":")
    if sep:
        try:
            return head, float(tail)
        except ValueError:
            pass
    return text, 1.0


def _report_dict(off: O.Offset) -> dict:
    r = off.report
    comps = {}
    for c, mods in off.components().items():
        if mods:
            ranks = sorted({d.rank for d in mods.values() if isinstance(d, O.LowRankDelta)})
            comps[c] = {"modules": len(mods), "ranks": ranks, "dense": sum(isinstance(d, O.DenseDelta) for d in mods.values())}
    return {"path": r.path, "format": r.format, "family": r.family, "matched": r.matched, "components": comps,
            "unmatched_keys": r.unmatched_keys, "notes": r.notes, "npo": read_npo_metadata(off.metadata),
            "metadata": off.metadata}


def method_fields_only(meta: dict[str, str]) -> dict[str, str]:
    """`meta` without the β / λ fields that the file's training method does not have (the method
    registry's `beta_key` / `lambda_key`: no λ for dpo, npo, tdft, ddspo; no β for tdft). Files of
    older trainers wrote both for every method. Unknown methods (extract, other tools) keep all."""
    from ..core.offsets.schema import LEGACY_METADATA_PREFIX, METADATA_PREFIX
    from ..trainer.methods import METHODS

    method = METHODS.get(read_npo_metadata(meta).get("method", ""))
    if method is None:
        return dict(meta)
    drop = {f for f, key in (("beta", method.beta_key), ("lambda", method.lambda_key)) if key is None}
    return {k: v for k, v in meta.items()
            if not any(k in (METADATA_PREFIX + f, LEGACY_METADATA_PREFIX + f) for f in drop)}


def _inspect(args) -> int:
    """With --base: names and shapes checked against that model (a diffusers folder, or a single-file
    checkpoint: its UNet); without: what the file holds (scan_offset)."""
    if args.base:
        base = O.load_unet_state_dict(args.base, allow_pickle=args.allow_pickle) if Path(args.base).is_file() else args.base
        off = O.load_offset(args.file, base=base, strict=not args.no_strict, allow_pickle=args.allow_pickle)
    else:
        off = O.scan_offset(args.file, allow_pickle=args.allow_pickle)
    off.metadata = method_fields_only(off.metadata or {})
    info = _report_dict(off)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(off.report.summary())
    for c, v in info["components"].items():
        print(f"  {c}: {v['modules']} modules, ranks {v['ranks'] or '-'}" + (f", {v['dense']} dense" if v["dense"] else ""))
    for n in info["notes"]:
        print(f"  note: {n}")
    for k in info["unmatched_keys"][:20]:
        print(f"  unmatched: {k}")
    for line in metadata_lines(off.metadata):
        print(f"  {line}")
    for k, v in sorted(info["metadata"].items()):
        if k.startswith(("ss_network", "ss_base", "ss_output")):
            print(f"  {k} = {v}")
    return 0


def _convert(args) -> int:
    off = O.load_offset(args.input, base=args.base, allow_pickle=args.allow_pickle)
    O.save_offset(off, args.output, format=args.format, base=args.base, metadata=off.metadata)
    print(f"wrote {args.output} ({args.format}, {off.report.matched} modules)")
    return 0


def _extract(args) -> int:
    dense = O.diff_between(O.load_unet_state_dict(args.tuned), O.load_unet_state_dict(args.base))
    lora, rep = O.extract_lora(dense, args.rank, conv_rank=args.conv_rank)
    base = args.base if Path(args.base).is_dir() else None
    meta = npo_metadata(method="extract", base_model_hash=O.model_hash(O.load_unet_state_dict(args.base)))
    O.save_offset(lora, args.out, format=args.format, base=base, family=dense.report.family, metadata=meta)
    if args.json:
        print(json.dumps(rep, indent=2))
    else:
        print(f"wrote {args.out}: {len(lora.unet)} modules, rank {args.rank}, relative error {rep['overall']:.4g}")
        if rep["dropped"]:
            print(f"  not representable as LoRA (dropped): {len(rep['dropped'])} modules, e.g. {rep['dropped'][:3]}")
        if rep["dropped_bias"]:
            print(f"  bias changes dropped: {len(rep['dropped_bias'])} modules")
    return 0


def _merge(args) -> int:
    from diffusers import DiffusionPipeline

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise ValueError(f"{out}: output folder exists (pass --overwrite)")
    pipe = DiffusionPipeline.from_pretrained(args.base)
    terms = []
    for spec in args.offset:
        path, scale = parse_offset_arg(spec)
        terms.append((O.load_offset(path, base=pipe), scale))
    for comp in ("unet", "te1", "te2"):
        if any(o.components().get(comp) for o, _ in terms):
            module = O.component_module(pipe, comp)
            module.load_state_dict(O.merged_state_dict(module, terms, comp))
    with atomic_dir(out) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
    print(f"wrote {out} ({', '.join(f'{p}:{s:g}' for p, s in map(parse_offset_arg, args.offset))})")
    return 0
