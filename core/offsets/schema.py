"""Constants shared by the offset modules, and the one schema of an offset file's NPO metadata.

Metadata (safetensors header, all strings) is `npo_<field>` (docs/offsets.md "Metadata"). The
writer (`save_offset`, fed by the trainer and the CLI), the validator, and every reader (the
`offsets inspect` CLI, the Load Weight Offset node, the WebUI panel, the demo) go through
`npo_metadata` / `read_npo_metadata` / `metadata_lines` below; nothing else spells a key.

Files written by the trainer before the schema existed spell the same fields `npo_suite.<field>`;
`read_npo_metadata` still reads them (the current spelling wins when a file has both).
"""
from __future__ import annotations

from typing import Any, Mapping

from .types import Offset

FORMATS = ("kohya", "peft", "diff")
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
ROLES = ("positive", "negative", "snpo")
_MAX_LISTED = 10

Term = tuple[Offset, float]

METADATA_PREFIX = "npo_"
LEGACY_METADATA_PREFIX = "npo_suite."  # trainer output before the schema (still read)
# field -> label in reports; the order is the report order. Other `npo_*` fields (lora_rank,
# lora_targets, family, trained_in, ...) are kept and listed after these.
REPORTED_FIELDS: dict[str, str] = {
    "method": "method", "role": "role", "beta": "β", "lambda": "λ", "base_model_hash": "base model hash",
    "steps": "steps",
}


def metadata_key(field: str) -> str:
    """'role' -> 'npo_role': the spelling every writer uses."""
    return METADATA_PREFIX + field


def metadata_value(v: Any) -> str:
    """A header value: numbers without a trailing .0 (2000.0 -> '2000'), anything else str()."""
    if not isinstance(v, (int, float)):
        return str(v)
    return str(int(v)) if float(v).is_integer() else repr(float(v))


def npo_metadata(**fields: Any) -> dict[str, str]:
    """The header entries for `fields` (None values left out): npo_metadata(role="negative", beta=2000.0)
    -> {"npo_role": "negative", "npo_beta": "2000"}. The role is validated."""
    meta = {metadata_key(k): metadata_value(v) for k, v in fields.items() if v is not None}
    validate_metadata(meta)
    return meta


def read_npo_metadata(meta: Mapping[str, str] | None) -> dict[str, str]:
    """field -> value of a file's NPO metadata, from either spelling (`npo_*` wins over `npo_suite.*`)."""
    meta = meta or {}
    old = {k[len(LEGACY_METADATA_PREFIX):]: str(v) for k, v in meta.items() if k.startswith(LEGACY_METADATA_PREFIX)}
    new = {k[len(METADATA_PREFIX):]: str(v) for k, v in meta.items()
           if k.startswith(METADATA_PREFIX) and not k.startswith(LEGACY_METADATA_PREFIX)}
    return {**old, **new}


def role_error(role: str | None) -> str | None:
    """Why `role` is not a valid role, or None (also for no role)."""
    if role is None or role in ROLES:
        return None
    return f"npo_role must be one of {ROLES}, got {role!r}"


def validate_metadata(meta: Mapping[str, str] | None, where: str = "metadata") -> None:
    """Raise ValueError (naming `where`) when the metadata's role is not one of ROLES."""
    err = role_error(read_npo_metadata(meta).get("role"))
    if err is not None:
        raise ValueError(f"{where}: {err}")


def metadata_lines(meta: Mapping[str, str] | None) -> list[str]:
    """'label: value' lines for a report (the REPORTED_FIELDS first, then the other npo fields);
    an invalid role is shown with the reason instead of being hidden."""
    fields = read_npo_metadata(meta)
    lines = []
    for k in (*REPORTED_FIELDS, *sorted(set(fields) - set(REPORTED_FIELDS))):
        if k in fields:
            err = role_error(fields[k]) if k == "role" else None
            lines.append(f"{REPORTED_FIELDS.get(k, k)}: {fields[k]}" + (f" (invalid: {err})" if err else ""))
    return lines
