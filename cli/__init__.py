"""`python -m npo_suite <command>`: the one command line; `scripts/*.py` wrap it.

Each command lives in its own module of this package exposing `add_arguments(parser)` and
`main(args) -> int`; the module parses and calls typed library functions. Modules are imported
only when their command runs, so `--help` stays fast. A user error (a missing file, a bad value)
ends in one line `error: ...` on stderr and exit status 2; NPO_SUITE_DEBUG=1 shows the traceback.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

# command name -> (module of this package, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": (".demo", "build/load the embedded digits world, train NPO and SNPO LoRAs, write a report"),
    "world": (".world", "build or inspect the embedded digits world; its method table (results) and probe"),
    "train": (".train", "train a preference LoRA (the methods: train --help, --method)"),
    "generate": (".generate", "batch generation with cfg / npo / snpo guidance"),
    "pairs": (".pairs", "preference pairs from a model's own samples, scored by any scorer (resumable)"),
    "evaluate": (".evaluate", "score images and compare two runs"),
    "offsets": (".offsets", "inspect, convert, merge and extract weight offsets (LoRAs, diffs)"),
    "ddspo-prepare": (".ddspo_prepare", "generate DDSPO winner (and loser) latents from prompts"),
    "bench": (".bench", "benchmarks: guidance and training step time and memory"),
}

# What a user can cause (a path that does not exist, a value out of range, a file of the wrong kind):
# reported as one line. Anything else is a bug and keeps its traceback.
USER_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, ValueError)
DEBUG_ENV = "NPO_SUITE_DEBUG"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m npo_suite", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_) in COMMANDS.items():
        sub.add_parser(name, help=help_, add_help=False)
    return parser


def command_parser(name: str):
    """(module, parser) of command `name`: the module imported, its arguments added (plug-ins loaded first,
    so their names, e.g. scorers and rewriters, are in every command's choices)."""
    from ..core.plugins import load_plugins

    load_plugins()
    module = importlib.import_module(COMMANDS[name][0], __package__)
    parser = argparse.ArgumentParser(prog=f"python -m npo_suite {name}", description=COMMANDS[name][1])
    module.add_arguments(parser)
    return module, parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        build_parser().print_help()
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    name, rest = argv[0], argv[1:]
    module, parser = command_parser(name)
    args = parser.parse_args(rest)
    try:
        return int(module.main(args) or 0)
    except USER_ERRORS as e:
        if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            raise
        print(f"error: {error_line(e)}", file=sys.stderr)
        return 2
    finally:
        _truncation_note()


def _truncation_note() -> None:
    """Once per command: how many prompts were cut to the text encoder's length (core.conditioning.TRUNCATED)."""
    conditioning = sys.modules.get(f"{__package__.rsplit('.', 1)[0]}.core.conditioning")
    note = conditioning.TRUNCATED.take_note() if conditioning is not None else None
    if note:
        print(f"warning: {note}", file=sys.stderr)


def error_line(e: BaseException) -> str:
    """The message of `e` on one line (its type name when it has none)."""
    return " ".join(str(e).split()) or type(e).__name__
