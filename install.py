"""Forge / Automatic1111 extension installer: installs the least the extension needs, never
upgrading or replacing anything the WebUI already has.

The WebUI runs this file at start-up (`launch.run_extension_installer`, with the WebUI folder on
PYTHONPATH). It reads `requirements-webui.txt` next to it (what the WebUI path needs beyond
torch: not the ComfyUI / trainer `requirements.txt`) and, for every requirement whose
distribution is ABSENT, calls the WebUI's own pip helper (`launch.run_pip`) with a constraints
file that pins every installed distribution to its installed version: pip then picks a version
compatible with the WebUI's pins, or fails, but never upgrades what the WebUI pinned (an
unbounded `transformers` pulled pydantic 2 into A1111 and broke it). A requirement that is
installed but older than asked is reported, not upgraded. torch, torchvision, torchaudio and
xformers are never installed here.
"""
from __future__ import annotations

import os
import re
import sys
import tempfile
from importlib import metadata

NEVER_INSTALL = {"torch", "torchvision", "torchaudio", "xformers"}
REQUIREMENTS = "requirements-webui.txt"
_REQ = re.compile(r"^\s*([A-Za-z0-9_.\-]+)\s*(?:>=\s*([0-9][0-9A-Za-z.]*))?")


def _version_tuple(v: str) -> tuple[int, ...]:
    parts = []
    for p in v.split("."):
        m = re.match(r"\d+", p)
        if not m:
            break
        parts.append(int(m.group()))
    return tuple(parts)


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_requirements(requirements_path: str) -> list[tuple[str, str, str | None]]:
    """(line, name, minimum version or None) per requirement line; torch family excluded."""
    out = []
    with open(requirements_path, encoding="utf-8") as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            m = _REQ.match(line)
            if line and m and _norm(m.group(1)) not in NEVER_INSTALL:
                out.append((line, m.group(1), m.group(2)))
    return out


def plan(requirements_path: str) -> tuple[list[str], list[str]]:
    """(requirement lines to install: distribution absent, notes on installed-but-older ones)."""
    todo, notes = [], []
    for line, name, minimum in read_requirements(requirements_path):
        try:
            have = metadata.version(name)
        except metadata.PackageNotFoundError:
            todo.append(line)
            continue
        if minimum and _version_tuple(have) < _version_tuple(minimum):
            notes.append(f"NPO Suite: {name} {have} is older than {minimum}; not upgraded (the WebUI's version is "
                         "kept), NPO may fail and says so in the infotext")
    return todo, notes


def installed_pins() -> list[str]:
    """`name==version` for every installed distribution (constraints: nothing installed may change)."""
    pins = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name and dist.version:
            pins.setdefault(_norm(name), f"{name}=={dist.version}")
    return [pins[k] for k in sorted(pins)]


def install(requirements_path: str, run_pip) -> list[str]:
    """Install each absent requirement with the WebUI's `run_pip(args, desc)`, the installed
    versions as constraints; returns the requirement lines asked for."""
    todo, notes = plan(requirements_path)
    for n in notes:
        print(n)
    if not todo:
        return todo
    fd, constraints = tempfile.mkstemp(prefix="npo_suite_constraints_", suffix=".txt")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write("\n".join(installed_pins()) + "\n")
        for req in todo:
            run_pip(f'install "{req}" -c "{constraints}"', f"NPO Suite requirement: {req}")
    finally:
        os.unlink(constraints)
    return todo


def main() -> None:
    try:
        import launch  # the WebUI's module; absent outside the WebUI (e.g. ComfyUI-Manager runs install.py too)
    except ImportError:
        return
    if hasattr(launch, "run_pip"):
        install(os.path.join(os.path.dirname(os.path.abspath(__file__)), REQUIREMENTS), launch.run_pip)


if __name__ == "__main__" and os.environ.get("NPO_SUITE_SKIP_INSTALL") is None:
    main()
    sys.stdout.flush()
