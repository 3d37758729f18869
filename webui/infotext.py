"""The NPO lines of a WebUI image's generation parameters (infotext): their keys, and the error line
written instead of them when NPO could not be applied.

A key equal to its value would be written bare by the WebUI (`create_infotext`) and lost when parsed
back, so every key is "NPO <field>"; "NPO mode" marks the feature as on. The panel's values are
written and read back by `webui.settings.NPOSettings.infotext` / `from_infotext`.
"""
from __future__ import annotations

import contextlib
import logging

INFOTEXT_KEYS = {
    "mode": "NPO mode",
    "positive": "NPO positive",
    "alpha": "NPO alpha",
    "negative": "NPO negative",
    "beta": "NPO beta",
    "sigma_min": "NPO sigma min",
    "sigma_max": "NPO sigma max",
}
ERROR_KEY = "NPO error"  # written instead of the keys above when NPO could not be applied
# SNPO encodes the empty prompt as the unconditional input: the infotext says so (the negative
# prompt line is empty, as encoded), and pasting it back needs nothing from this key.
SNPO_UNCOND = ("NPO uncond", "empty prompt")


def format_number(v: float) -> str:
    """A number as the infotext writes it (`0.25`, `10`)."""
    return f"{float(v):g}"


def error_text(e: BaseException) -> str:
    """The `NPO error` infotext value for `e` (commas would split the infotext)."""
    if isinstance(e, ModuleNotFoundError):
        msg = (f"the Python package {e.name or e} is not installed in the WebUI's environment "
               "(the extension's install.py installs it at the next WebUI start)")
    else:
        msg = str(e) or type(e).__name__
    return msg.replace(",", ";")[:300]


@contextlib.contextmanager
def reported_errors(params: dict, logger: logging.Logger):
    """Any exception inside is written to `params["NPO error"]` (the infotext), logged with its
    traceback, and re-raised: NPO never silently does nothing."""
    try:
        yield
    except Exception as e:
        params[ERROR_KEY] = error_text(e)
        logger.exception("NPO error: %s", params[ERROR_KEY])
        raise
