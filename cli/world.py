"""`python -m npo_suite world build|info`: build or inspect the embedded digits world (docs/world.md)."""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from dataclasses import fields
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..world.build import WorldConfig

    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    b = sub.add_parser("build", help="train the world's base model and reward models into a folder")
    b.add_argument("--out", default=None, help="output folder (default: the cache, ~/.cache/npo_suite/world/digits_v2; "
                                                "the shipped copy is world/assets/digits_world)")
    for f in fields(WorldConfig):
        if f.name == "block_out_channels":
            b.add_argument("--block-out-channels", type=int, nargs="+", default=None, help=f.metadata["help"])
            continue
        b.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=None, help=f.metadata["help"])
    b.add_argument("--quick", action="store_true", help="a small, fast build for tests (60 steps, batch 32)")
    b.add_argument("--diagnose-samples", type=int, default=300, help="base-model samples scored after the build (0: skip)")
    b.add_argument("--force", action="store_true", help="rebuild even if the folder already holds a world")
    i = sub.add_parser("info", help="print a world's manifest summary")
    i.add_argument("--path", default=None, help="world folder (default: the shipped world, else the cache)")
    i.add_argument("--json", action="store_true", help="print the whole manifest as JSON")


def main(args) -> int:
    from ..world.build import WorldConfig, build_world, cache_dir, check_world_dir, default_world_dir

    if args.action == "info":
        path = Path(args.path) if args.path else default_world_dir()
        try:
            m = check_world_dir(path)
        except (FileNotFoundError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        if args.json:
            print(json.dumps(m))
            return 0
        print(f"world: {path}")
        print(f"built by: {m.get('command')}  (sklearn {m['versions'].get('sklearn')}, torch {m['versions'].get('torch')})")
        print(f"config: {m['config']}")
        print(f"splits: {m['splits']}")
        print(f"reward: {m['reward']}")
        if "diagnostics" in m:
            print(f"base model (build diagnostic): {m['diagnostics']}")
        return 0

    out = Path(args.out) if args.out else cache_dir()
    if (out / "world.json").is_file() and not args.force:
        print(f"world already built at {out} (use --force to rebuild)")
        return 0
    kwargs = {f.name: getattr(args, f.name) for f in fields(WorldConfig) if getattr(args, f.name, None) is not None}
    if args.quick:
        kwargs = {"steps": 60, "batch_size": 32, **kwargs}
    if args.block_out_channels:
        kwargs["block_out_channels"] = tuple(args.block_out_channels)
    try:
        cfg = WorldConfig(**kwargs)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    command = "python -m npo_suite world " + " ".join(shlex.quote(a) for a in sys.argv[2:]) if sys.argv[1:2] == ["world"] else None
    build_world(out, cfg, diagnose_samples=args.diagnose_samples, command=command)
    return 0
