"""Offset files the panel offers: listing the offset folders, resolving a dropdown name to a file
(refusing names that leave the folders and pickle files), and a cache of loaded offsets."""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

from ..core.offsets.types import Offset
from ..core.paths import safe_relative_name
from .settings import NONE

OFFSET_SUFFIXES = (".safetensors",)


def list_offset_files(dirs: Sequence[str | os.PathLike]) -> list[str]:
    """Offset files (`.safetensors`) under `dirs`, as '/'-separated names relative to their folder,
    sorted, first folder wins on duplicates; missing folders are skipped."""
    seen: dict[str, None] = {}
    for d in dirs:
        root = Path(d)
        if not root.is_dir():
            continue
        for p in sorted(root.rglob("*")):
            if p.is_file() and p.suffix.lower() in OFFSET_SUFFIXES:
                seen.setdefault(p.relative_to(root).as_posix(), None)
    return sorted(seen, key=str.lower)


def resolve_offset_file(name: str, dirs: Sequence[str | os.PathLike]) -> Path:
    """The file a dropdown `name` refers to (searched in `dirs` in order).

    Raises ValueError for names that could leave the folders (absolute, drive, '..') or have a
    pickle suffix, FileNotFoundError (listing the folders searched) when no folder has it.
    """
    if name == NONE:
        raise ValueError("NPO: empty offset file name")
    norm = safe_relative_name(name, "NPO: offset file")  # no absolute, drive or '..' names
    if not norm.lower().endswith(OFFSET_SUFFIXES):
        raise ValueError(f"NPO: {name!r}: only .safetensors offsets are loaded (pickle files are refused)")
    for d in dirs:
        p = Path(d) / norm
        if p.is_file():
            return p
    raise FileNotFoundError(f"NPO: offset file {name!r} not found in {', '.join(str(d) for d in dirs)}")


class OffsetCache:
    """Loaded offsets keyed by (path, mtime, size, family): re-read only when the file changes."""

    def __init__(self, loader: Callable[..., Offset] | None = None, max_entries: int = 4):
        if loader is None:
            from ..core.offsets import load_offset as loader
        self.loader = loader
        self.max_entries = max_entries
        self._items: dict[tuple, Offset] = {}

    def get(self, path: str | os.PathLike, family: str | None) -> Offset:
        p = Path(path)
        st = p.stat()
        key = (str(p.resolve()), st.st_mtime_ns, st.st_size, family)
        if key not in self._items:
            if len(self._items) >= self.max_entries:
                self._items.pop(next(iter(self._items)))
            self._items[key] = self.loader(p, family=family, strict=False)
        return self._items[key]
