"""Record types of the training data, the skip counters, and image decoding.

Every source (`pairs.py`, `prompts.py`) yields records lazily; an image field is an
`ImageSource`: a path, raw encoded bytes, or a zero-argument callable returning either (or a
PIL image). Nothing is decoded until `load_image()` is called, so an index of a million
Pick-a-Pic pairs holds file offsets, not pixels.

Bad input is never fatal mid-run: the reason is counted in a `DataSummary` and the item is
dropped. Reasons (the keys of `DataSummary.skipped`):
  tie              Pick-a-Pic row with label_0 == label_1 (no preference)
  no_label         Pick-a-Pic row whose labels are not a 0/1 pair (unlabelled)
  missing_caption  no prompt for the item
  missing_partner  a chosen image without its rejected image (or the reverse)
  missing_file     an image path that does not exist
  corrupt_image    bytes PIL cannot decode (truncated, not an image, ...)
  bad_row          a JSONL line that is not a JSON object / lacks a required field
  empty_prompt     a blank line or empty prompt in a prompts file
  duplicate_id     an id already seen in the same pass
"""
from __future__ import annotations

import io
import os
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Union

ImageSource = Union[str, os.PathLike, bytes, Callable[[], object]]

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


@dataclass(frozen=True)
class PairRecord:
    """One preference pair, winner first: `chosen` is preferred over `rejected` for `prompt`."""

    id: str
    prompt: str
    chosen: ImageSource
    rejected: ImageSource


@dataclass(frozen=True)
class PromptRecord:
    """A prompt for the data-free methods (Self-NPO/TDFT, DDSPO); `image` optional (a real image
    to start from / DDSPO's winner), `neg_prompt` optional (DDSPO's degraded prompt c⁻),
    `loser_image` optional (DDSPO's loser: the reference model's image for c⁻; needs `image`)."""

    id: str
    prompt: str
    image: ImageSource | None = None
    neg_prompt: str | None = None
    loser_image: ImageSource | None = None


class BadRecord(ValueError):
    """An item that must be skipped; `reason` is one of the DataSummary keys (module docstring)."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass
class DataSummary:
    """Counters of one pass over a source: items kept and items skipped, by reason."""

    name: str = "data"
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)  # reason -> first message seen

    def keep(self, n: int = 1) -> None:
        self.kept += n

    def skip(self, reason: str, message: str = "") -> None:
        self.skipped[reason] += 1
        if message and reason not in self.examples:
            self.examples[reason] = message

    @property
    def total_skipped(self) -> int:
        return sum(self.skipped.values())

    def merge(self, other: "DataSummary") -> None:
        self.kept += other.kept
        self.skipped.update(other.skipped)
        for k, v in other.examples.items():
            self.examples.setdefault(k, v)

    def report(self) -> str:
        lines = [f"[{self.name}] kept {self.kept}, skipped {self.total_skipped}"]
        for reason, n in sorted(self.skipped.items()):
            ex = self.examples.get(reason)
            lines.append(f"  {reason}: {n}" + (f" (e.g. {ex})" if ex else ""))
        return "\n".join(lines)

    def print(self, file=None) -> None:
        print(self.report(), file=file or sys.stderr, flush=True)


def read_source_bytes(src: ImageSource) -> bytes | object:
    """The encoded bytes behind `src` (or a PIL image, when a callable returns one)."""
    if callable(src):
        src = src()
    if isinstance(src, (bytes, bytearray, memoryview)):
        return bytes(src)
    if isinstance(src, (str, os.PathLike)):
        path = Path(src)
        if not path.is_file():
            raise BadRecord("missing_file", f"{path}: no such image file")
        return path.read_bytes()
    return src  # a PIL image


def load_image(src: ImageSource, what: str = "image"):
    """Decode `src` to an RGB PIL image; raises BadRecord('missing_file' | 'corrupt_image')."""
    from PIL import Image

    data = read_source_bytes(src)
    if isinstance(data, Image.Image):
        img = data
    else:
        try:
            img = Image.open(io.BytesIO(data))
            img.load()  # force the full decode now: truncated files fail here, not later
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            name = src if isinstance(src, (str, os.PathLike)) else what
            raise BadRecord("corrupt_image", f"{name}: cannot decode image ({e})") from None
    if img.mode != "RGB":
        if img.mode in ("RGBA", "LA", "P"):
            img = img.convert("RGBA")
            bg = Image.new("RGBA", img.size, (255, 255, 255, 255))
            img = Image.alpha_composite(bg, img)
        img = img.convert("RGB")
    return img
