"""Names that users type into front ends (ComfyUI nodes, the WebUI panel) and must stay inside a folder.

A ComfyUI or WebUI server may be reachable by others: a node never reads or writes outside the
application's own folders, so every user-supplied name is checked here before it is joined to one.
"""
from __future__ import annotations

import os
from pathlib import Path


def safe_relative_name(name: str, what: str = "file name") -> str:
    """`name` as a relative, '/'-separated path; ValueError for empty, absolute, drive or '..' names."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"{what}: empty name")
    norm = name.strip().replace("\\", "/")
    if norm.startswith("/") or os.path.isabs(name) or (len(norm) > 1 and norm[1] == ":"):
        raise ValueError(f"{what} {name!r}: absolute paths are not allowed, give a name inside the folder")
    if any(part == ".." for part in norm.split("/")):
        raise ValueError(f"{what} {name!r}: '..' is not allowed")
    return norm


def inside(root: str | os.PathLike, name: str, what: str = "file name") -> Path:
    """root/name, checked to stay inside root after resolving links."""
    root_p = Path(root).resolve()
    p = (root_p / safe_relative_name(name, what)).resolve()
    if p != root_p and root_p not in p.parents:
        raise ValueError(f"{what} {name!r}: resolves outside {root_p}")
    return p
