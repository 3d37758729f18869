"""The one JSONL reader and writer: every JSONL file of the suite (prompts, pairs, captions, samples,
manifests) is read by `iter_jsonl` and written by `write_jsonl` / `append_jsonl` (core.atomic).

Reading: blank lines are ignored; a line that is not a JSON object is skipped and counted in the
caller's summary (anything with `skip(reason, message)`, e.g. `core.summary.DataSummary`) as
"bad_row", or "torn_line" for a last line without its newline (a write cut short); without a
summary such a line raises ValueError (files the suite wrote itself and must not half-read).
"""
from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Iterable, Iterator

from .atomic import append_bytes, write_text


def iter_jsonl(path: str | os.PathLike, summary=None) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each JSON-object line of `path` (module docstring for bad lines)."""
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                problem = None if isinstance(obj, dict) else "not a JSON object"
            except json.JSONDecodeError as e:
                problem = str(e)
            if problem is None:
                yield n, obj
                continue
            message = f"{path}:{n}: {problem}"
            if summary is None:
                raise ValueError(f"{message} (a corrupt line)")
            summary.skip("bad_row" if line.endswith("\n") or problem == "not a JSON object" else "torn_line", message)


class _Counts:
    def __init__(self):
        self.skipped = Counter()

    def skip(self, reason: str, message: str = "") -> None:
        self.skipped[reason] += 1


def read_jsonl(path: str | os.PathLike) -> tuple[list[dict], Counter]:
    """(objects, skipped reasons) of a JSONL file; a missing file is empty."""
    if not Path(path).is_file():
        return [], Counter()
    counts = _Counts()
    return [obj for _, obj in iter_jsonl(path, counts)], counts.skipped


def _lines(rows: Iterable[dict], ensure_ascii: bool) -> str:
    return "".join(json.dumps(r, ensure_ascii=ensure_ascii) + "\n" for r in rows)


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict], ensure_ascii: bool = False) -> Path:
    """Replace `path` with `rows`, one JSON object a line, atomically (core.atomic.write_text)."""
    return write_text(path, _lines(rows, ensure_ascii))


def append_jsonl(path: str | os.PathLike, rows: list[dict], ensure_ascii: bool = False) -> None:
    """Append `rows` durably in one write (core.atomic.append_bytes: on error the file is cut back).

    A torn tail left by an earlier crash (no final newline) is cut first, so the new lines start
    on a line of their own.
    """
    if not rows:
        return
    path = Path(path)
    _cut_torn_tail(path)
    append_bytes(path, _lines(rows, ensure_ascii).encode("utf-8"))


def _cut_torn_tail(path: Path) -> None:
    if not path.is_file() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as fh:
        data = fh.read()
        if data.endswith(b"\n"):
            return
        fh.truncate(data.rfind(b"\n") + 1)
