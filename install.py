"""Forge / Automatic1111 extension installer: installs only what is missing, never torch.

The WebUI runs this file at start-up. It reads `requirements.txt` next to it and, for every
requirement whose distribution is absent (or too old), calls the WebUI's own pip helper
(`launch.run_pip`). torch, torchvision and torchaudio are never installed or upgraded here:
the WebUI already has the build that matches the user's GPU.
"""
from __future__ import annotations

import os
import re
from importlib import metadata

NEVER_INSTALL = {"torch", "torchvision", "torchaudio", "xformers"}
_REQ = re.compile(r"^\s*([A-Za-z0-9_.\-]+)\s*(?:>=\s*([0-9][0-9A-Za-z.]*))?")


def _version_tuple(v: str) -> tuple[int, ...]:
    parts = []
    for p in v.split("."):
        m = re.match(r"\d+", p)
        if not m:
            break
        parts.append(int(m.group()))
    return tuple(parts)


def missing_requirements(requirements_path: str) -> list[str]:
    """Requirement lines of `requirements_path` that are not satisfied (torch family excluded)."""
    todo = []
    with open(requirements_path, encoding="utf-8") as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            m = _REQ.match(line)
            if not line or not m:
                continue
            name, minimum = m.group(1), m.group(2)
            if name.lower() in NEVER_INSTALL:
                continue
            try:
                have = metadata.version(name)
            except metadata.PackageNotFoundError:
                todo.append(line)
                continue
            if minimum and _version_tuple(have) < _version_tuple(minimum):
                todo.append(line)
    return todo


def install(requirements_path: str, run_pip) -> list[str]:
    """Install each missing requirement with the WebUI's `run_pip(args, desc)`; returns what was asked for."""
    todo = missing_requirements(requirements_path)
    for req in todo:
        run_pip(f'install "{req}"', f"NPO Suite requirement: {req}")
    return todo


if os.environ.get("NPO_SUITE_SKIP_INSTALL") is None:  # the WebUI runs this file on start-up
    try:
        import launch  # the WebUI's module; absent outside the WebUI
    except ImportError:
        launch = None
    if launch is not None and hasattr(launch, "run_pip"):
        install(os.path.join(os.path.dirname(os.path.abspath(__file__)), "requirements.txt"), launch.run_pip)
