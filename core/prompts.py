"""The one prompts-file reader: the same file trains (trainer/data/prompts.py) and generates
(diffusers_host/generate.py, ddspo-prepare) with the same rules and the same counted skips.

  *.txt    one prompt per line; blank lines are counted as `empty_prompt` and skipped.
           Id: `<line number>-<first 8 hex of sha1(prompt)>` (stable when lines are appended,
           and an edited line gets a new id).
  *.jsonl  `{"prompt": ..., "id"?: ..., "negative_prompt"?: ..., "image"?: <path relative to the file>,
           "loser_image"?: <path>}` (`caption`/`text` accepted for prompt, `neg_prompt` for negative_prompt:
           `negative_prompt_of`; `loser_image`, DDSPO's loser generated from the negative prompt, needs
           `image`: a row with it alone is a `bad_row`; a line that is not a JSON object is a `bad_row`,
           core/jsonl.py). Default id as for .txt. Other keys (e.g. generate's `seed`) are the caller's.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Union

from .jsonl import iter_jsonl

# an image field: a path, raw encoded bytes, or a zero-argument callable returning either (or a PIL image)
ImageSource = Union[str, os.PathLike, bytes, Callable[[], object]]

PROMPT_KEYS = ("prompt", "caption", "text")  # the documented name, then its aliases
NEGATIVE_PROMPT_KEYS = ("negative_prompt", "neg_prompt")  # the documented name, then its alias


@dataclass(frozen=True)
class PromptRecord:
    """A prompt for the data-free methods (Self-NPO/TDFT, DDSPO) and for generation; `image` optional (a
    real image to start from / DDSPO's winner), `neg_prompt` optional (DDSPO's degraded prompt c⁻, the
    negative prompt of generation), `loser_image` optional (DDSPO's loser: the reference model's image for
    c⁻; needs `image`)."""

    id: str
    prompt: str
    image: ImageSource | None = None
    neg_prompt: str | None = None
    loser_image: ImageSource | None = None


def first_of(d: dict, keys) -> object:
    """The value of the first of `keys` that `d` holds (not None), else None."""
    for k in keys:
        if d.get(k) is not None:
            return d[k]
    return None


def negative_prompt_of(obj: dict, where: str = "prompts line") -> str | None:
    """The negative prompt of one JSONL prompts line (`negative_prompt`, alias `neg_prompt`), or None.

    A line that gives both spellings with different values is refused (ValueError), not resolved.
    """
    given = {k: str(obj[k]) for k in NEGATIVE_PROMPT_KEYS if obj.get(k) is not None}
    if len(set(given.values())) > 1:
        raise ValueError(f"{where}: both {' and '.join(given)} are given and differ: keep one")
    return next(iter(given.values()), None)


def line_id(n: int, prompt: str) -> str:
    return f"{n}-{hashlib.sha1(prompt.encode('utf-8')).hexdigest()[:8]}"


def check_prompts_file(path: str | os.PathLike) -> Path:
    """`path` as a Path; FileNotFoundError / ValueError unless it is an existing .txt or .jsonl file."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such prompts file")
    if p.suffix.lower() not in (".txt", ".jsonl"):
        raise ValueError(f"{p}: prompts file must be .txt (one per line) or .jsonl")
    return p


def iter_prompts_file(path: str | os.PathLike, summary) -> Iterator[tuple[PromptRecord, dict]]:
    """(record, its JSONL object; {} for .txt) for each good line; bad lines are counted in `summary`
    (`skip(reason, message)`) and skipped. Duplicate ids are the caller's (trainer `Source`, `read_prompts_file`)."""
    path = check_prompts_file(path)
    if path.suffix.lower() == ".txt":
        with open(path, encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                prompt = line.strip()
                if not prompt:
                    summary.skip("empty_prompt", f"{path.name}:{n}")
                    continue
                yield PromptRecord(line_id(n, prompt), prompt), {}
        return
    root = path.parent
    for n, obj in iter_jsonl(path, summary):
        prompt = first_of(obj, PROMPT_KEYS)
        prompt = str(prompt).strip() if prompt is not None else ""
        if not prompt:
            summary.skip("empty_prompt", f"{path.name}:{n}")
            continue
        image, loser = (root / str(obj[k]) if obj.get(k) is not None else None for k in ("image", "loser_image"))
        missing = [f for f in (image, loser) if f is not None and not f.is_file()]
        if missing:
            summary.skip("missing_file", f"{path.name}:{n}: {missing[0]}")
            continue
        if loser is not None and image is None:
            summary.skip("bad_row", f"{path.name}:{n}: loser_image without image (the winner)")
            continue
        try:
            neg = negative_prompt_of(obj, f"{path.name}:{n}")
        except ValueError as e:
            summary.skip("bad_row", str(e))
            continue
        rid = str(obj["id"]) if obj.get("id") is not None else line_id(n, prompt)
        yield PromptRecord(rid, prompt, image, neg, loser), obj


def read_prompts_file(path: str | os.PathLike, summary) -> list[tuple[PromptRecord, dict]]:
    """`iter_prompts_file` with the trainer sources' contract: a repeated id is skipped as
    `duplicate_id`, each kept line counted (`summary.keep()`)."""
    out, seen = [], set()
    for rec, obj in iter_prompts_file(path, summary):
        if rec.id in seen:
            summary.skip("duplicate_id", f"id {rec.id!r}")
            continue
        seen.add(rec.id)
        summary.keep()
        out.append((rec, obj))
    return out
