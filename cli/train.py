"""`python -m npo_suite train`: the CLI generated from `TrainConfig`'s fields.

    python -m npo_suite train --preset sd15_8gb --model ./sd15 --data-path pairs.jsonl
    python -m npo_suite train --config run.yaml --set lr=1e-4 --set method=snpo
    python -m npo_suite train --config run.yaml --resume latest
    python -m npo_suite train --config run.yaml --print-config

Precedence: --preset < --config < plain flags < --set key=value. Several processes (DDP):
`torchrun --nproc_per_node N -m npo_suite train ...` (CPU: gloo; GPUs: NCCL), or
`accelerate launch --multi_gpu --num_processes N -m npo_suite train ...` on GPUs.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import typing

from ..trainer.config import TrainConfig, field_types, load_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML or TOML file of config keys")
    parser.add_argument("--preset", help="a preset from configs/ (sd15_8gb, sdxl_12gb, datacenter_sd15, ...)")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config key (repeatable), typed by the field: --set lr=1e-4")
    parser.add_argument("--resume", help='continue a run: "latest" (output_dir\'s newest checkpoint) or a checkpoint folder')
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    parser.add_argument("--overwrite", action="store_true",
                        help="start a new run in an output_dir that holds a finished run (refused otherwise)")
    parser.add_argument("--dry-run", action="store_true",
                        help="estimate the run's device memory peak (cache fill and training step, traced on fake "
                             "tensors: no weights are loaded) and exit; --model may name a shipped config (sd15, sdxl)")
    parser.add_argument("--json", action="store_true", help="with --dry-run: print one JSON line")
    parser.add_argument("--processes", type=int, metavar="N",
                        help="with --dry-run: the processes the run is launched with (torchrun --nproc_per_node N); "
                             "the estimate is then one process's; needed with fsdp (each holds 1/N of the transformer)")
    group = parser.add_argument_group("config keys (each also settable in --config / --set)")
    types_ = field_types()
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        # argparse %-formats help strings: a literal % (e.g. "~30% slower") must be doubled
        help_ = (f.metadata.get("help", "") + _choices(f) + f" (default: {_default(f)!r})").replace("%", "%%")
        base = typing.get_args(types_[f.name])[0] if typing.get_origin(types_[f.name]) is list else None
        if types_[f.name] is bool:
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_)
        elif base is not None:
            group.add_argument(flag, dest=f.name, nargs="+", default=argparse.SUPPRESS, metavar=base.__name__.upper(), help=help_)
        else:
            group.add_argument(flag, dest=f.name, default=argparse.SUPPRESS, help=help_)


def _choices(f: dataclasses.Field) -> str:
    """' (one of: a, b)' from the field's `choices` metadata (a registry's keys), else ''."""
    c = f.metadata.get("choices")
    return f" (one of: {', '.join(c() if callable(c) else c)})" if c else ""


def _default(f: dataclasses.Field):
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    overrides = {k: v for k, v in vars(args).items() if k in names}
    return load_config(preset=args.preset, config=args.config, overrides=overrides, sets=args.sets)


def main(args: argparse.Namespace) -> int:
    try:
        cfg = config_from_args(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"train: {e}", file=sys.stderr)
        return 2
    if args.processes is not None and not args.dry_run:
        print("train: --processes is for --dry-run (a run counts its processes from its launcher: torchrun)",
              file=sys.stderr)
        return 2
    if args.print_config:
        print(cfg.to_yaml(), end="")
        return 0
    if args.dry_run:
        from ..trainer.memory_estimate import dry_run

        try:
            print(dry_run(cfg, as_json=args.json, processes=args.processes))
        except (ValueError, FileNotFoundError) as e:
            print(f"train --dry-run: {e}", file=sys.stderr)
            return 2
        return 0
    from ..trainer.loop import NonFiniteError, finished_run, train

    done = None if args.resume or args.overwrite else finished_run(cfg.output_dir)
    if done is not None:
        print(f"train: {cfg.output_dir} holds a finished run ({done.get('method')}, step {done.get('step')}/"
              f"{done.get('steps')}, LoRA {done.get('lora')}); refusing to overwrite it. Choose another --output-dir, "
              "pass --overwrite to start over there, or --resume latest (with more --steps) to continue it",
              file=sys.stderr)
        return 2
    try:
        result = train(cfg, resume=args.resume)
    except (NonFiniteError, OSError) as e:  # diverged / a write failed (disk full): the message names the files
        print(f"train: {e}", file=sys.stderr)
        return 1
    state = "interrupted at" if result.interrupted else "finished"
    skipped = f"; {result.skipped_nonfinite} non-finite step(s) skipped" if result.skipped_nonfinite else ""
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"train: {state} step {result.steps_done}/{cfg.steps}{skipped}; LoRA: {result.lora_path}")
    return 130 if result.interrupted else 0
