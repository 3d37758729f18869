"""`python -m npo_suite bench <name>`: benchmarks (step time and memory).

  guidance   plain CFG vs the NPO fast path vs the NPO two-model path (benchmarks/guidance.py)
  train      training step time and memory (benchmarks/train.py)

Each benchmark module exposes `add_arguments(parser)` and `main(args)` like a command; it is
imported only when its benchmark runs.
"""
from __future__ import annotations

import argparse
import importlib

BENCHMARKS: dict[str, tuple[str, str]] = {
    "guidance": (".guidance", "per-step time and peak memory: CFG (LoRA merged), NPO fast path, NPO two-model path"),
    "train": (".train", "training step time and memory"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", choices=list(BENCHMARKS), help="which benchmark")
    parser.add_argument("rest", nargs=argparse.REMAINDER, help="the benchmark's own options (see `bench NAME --help`)")


def main(args) -> int:
    module_name, help_ = BENCHMARKS[args.name]
    try:
        module = importlib.import_module(module_name, __package__)
    except ModuleNotFoundError as e:
        if e.name and e.name.endswith(module_name.lstrip(".")):
            raise SystemExit(f"benchmark {args.name!r} is not available: module {module_name} is missing") from None
        raise
    parser = argparse.ArgumentParser(prog=f"python -m npo_suite bench {args.name}", description=help_)
    module.add_arguments(parser)
    return int(module.main(parser.parse_args(args.rest)) or 0)
