"""Constants shared by the offset modules."""
from __future__ import annotations

from .types import Offset

FORMATS = ("kohya", "peft", "diff")
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
ROLES = ("positive", "negative", "snpo")
BASE_MODEL_VERSION = {"sd1": "sd_v1", "sdxl": "sdxl_base_v1-0"}
_MAX_LISTED = 10

Term = tuple[Offset, float]

