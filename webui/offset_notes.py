"""What the extension says about an offset in words: the panel's note on a chosen file, and the
coverage line printed when a generation maps the offsets onto the WebUI's UNet."""
from __future__ import annotations

from collections.abc import Mapping, Sequence

from ..core.offsets.schema import metadata_lines
from ..core.offsets.types import Delta, Offset, coverage_line


def offset_summary(offset: Offset, name: str) -> str:
    """The panel's note on a chosen file: what was recognised (LoadReport), its notes, and its NPO
    metadata (core/offsets/schema.py: method, role, β, λ, base model hash, steps)."""
    s = offset.report.summary() if offset.report is not None else name
    if offset.report is not None and offset.report.notes:
        s += " (" + "; ".join(offset.report.notes) + ")"
    meta = metadata_lines(offset.metadata)
    return s + ("; " + ", ".join(meta) if meta else "")


def describe(offset: Offset | None, mapped: Mapping[str, Delta], unmatched: Sequence[str], role: str) -> str:
    """One line for the panel / infotext-adjacent log (`core.offsets.types.coverage_line`)."""
    return coverage_line(offset, len(mapped), unmatched, role)
