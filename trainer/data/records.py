"""Record types of the training data (`PromptRecord`: core/prompts.py; the skip counters `DataSummary`:
core/summary.py), and image decoding.

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
  unsupported_image  decodable, but no faithful 8-bit RGB exists (float / 32-bit values outside
                   [0, 1] / [0, 65535], NaN, an exotic mode): refused, never guessed
  unreadable_shard a Pick-a-Pic parquet file (or one of its row groups) that cannot be read
  bad_row          a JSONL line that is not a JSON object / lacks a required field
  torn_line        a last JSONL line without its newline that is not JSON (a write cut short)
  empty_prompt     a blank line or empty prompt in a prompts file
  duplicate_id     an id already seen in the same pass
"""
from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path

from ...core.prompts import ImageSource

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


@dataclass(frozen=True)
class PairRecord:
    """One preference pair, winner first: `chosen` is preferred over `rejected` for `prompt`."""

    id: str
    prompt: str
    chosen: ImageSource
    rejected: ImageSource


class BadRecord(ValueError):
    """An item that must be skipped; `reason` is one of the DataSummary keys (module docstring)."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


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


ALPHA_BACKGROUND = (255, 255, 255)  # transparent pixels are composited on white, as viewers show them
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
_SCALED_MODES = {"I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535, "I": 65535, "F": 1.0}


def load_image(src: ImageSource, what: str = "image"):
    """Decode `src` to the 8-bit RGB PIL image a viewer shows (`to_rgb`); the one decoder of
    training, the caches, evaluation and the ComfyUI nodes. Raises BadRecord('missing_file' |
    'corrupt_image' | 'unsupported_image')."""
    from PIL import Image

    data = read_source_bytes(src)
    name = src if isinstance(src, (str, os.PathLike)) else what
    if isinstance(data, Image.Image):
        img = data
    else:
        try:
            img = Image.open(io.BytesIO(data))
            img.load()  # force the full decode now: truncated files fail here, not later
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            raise BadRecord("corrupt_image", f"{name}: cannot decode image ({e})") from None
    return to_rgb(img, name)


def to_rgb(img, name: str = "image"):
    """8-bit RGB as an image viewer shows it:
    - EXIF orientation applied (a phone photo is upright, `ImageOps.exif_transpose`);
    - 16-bit grey ("I;16*", or "I" with values in 0..65535) scaled by 255/65535, not clipped;
    - float ("F", e.g. a float TIFF) with values in [0, 1] scaled by 255;
    - alpha ("RGBA", "LA", "PA", "P" with transparency) composited on `ALPHA_BACKGROUND` (white);
    - other modes (L, P, CMYK, YCbCr, 1) through PIL's convert.
    Anything else (float or 32-bit values out of range, NaN, modes PIL cannot convert) raises
    BadRecord('unsupported_image') naming the reason."""
    from PIL import Image, ImageOps

    try:
        img = ImageOps.exif_transpose(img)
    except (OSError, ValueError, SyntaxError) as e:  # a broken EXIF block
        raise BadRecord("corrupt_image", f"{name}: cannot read its EXIF orientation ({e})") from None
    if img.mode in _SCALED_MODES:
        img = Image.fromarray(_scaled_to_uint8(img, _SCALED_MODES[img.mode], name), mode="L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in _ALPHA_MODES:
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (*ALPHA_BACKGROUND, 255))
        img = Image.alpha_composite(bg, rgba)
    if img.mode == "RGB":
        return img
    try:
        return img.convert("RGB")
    except ValueError as e:
        raise BadRecord("unsupported_image", f"{name}: image mode {img.mode} has no RGB conversion ({e})") from None


def _scaled_to_uint8(img, full_scale: float, name: str):
    """uint8 [H, W] of a high-bit-depth grey image, `full_scale` mapping to 255; refuses out-of-range values."""
    import numpy as np

    a = np.asarray(img, dtype=np.float64)
    if a.size and not np.isfinite(a).all():
        raise BadRecord("unsupported_image", f"{name}: {img.mode} image holds NaN or inf values")
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if lo < 0 or hi > full_scale:
        raise BadRecord("unsupported_image", f"{name}: {img.mode} image values span [{lo:g}, {hi:g}], outside "
                                             f"[0, {full_scale:g}]: no faithful 8-bit rendering (convert it first)")
    return np.round(a * (255.0 / full_scale)).astype(np.uint8)
