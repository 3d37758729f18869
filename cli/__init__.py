"""`python -m npo_suite <command>`: the one command line; `scripts/*.py` wrap it.

Each command lives in its own module exposing `add_arguments(parser)` and `main(args) -> int`;
modules are imported only when their command runs, so `--help` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# command name -> (module relative to this package, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("..world.demo", "build/load the embedded digits world, train NPO and SNPO LoRAs, write a report"),
    "world": (".world", "build or inspect the embedded digits world"),
    "train": (".train", "train a preference LoRA (the methods: train --help, --method)"),
    "generate": ("..diffusers_host.generate", "batch generation with cfg / npo / snpo guidance"),
    "pairs": (".pairs", "preference pairs from a model's own samples, scored by any scorer (resumable)"),
    "evaluate": (".evaluate", "score images and compare two runs"),
    "offsets": (".offsets", "inspect, convert, merge and extract weight offsets (LoRAs, diffs)"),
    "ddspo-prepare": ("..diffusers_host.ddspo_prepare", "generate DDSPO winner (and loser) latents from prompts"),
    "bench": ("..benchmarks", "benchmarks: guidance and training step time and memory"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m npo_suite", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_) in COMMANDS.items():
        sub.add_parser(name, help=help_, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        build_parser().print_help()
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    name, rest = argv[0], argv[1:]
    from ..core.plugins import load_plugins

    load_plugins()  # the plug-ins' names (scorers, rewriters, ...) in every command's choices
    module = importlib.import_module(COMMANDS[name][0], __package__)
    parser = argparse.ArgumentParser(prog=f"python -m npo_suite {name}", description=COMMANDS[name][1])
    module.add_arguments(parser)
    args = parser.parse_args(rest)
    return int(module.main(args) or 0)
