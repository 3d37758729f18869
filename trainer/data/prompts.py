"""Prompt sources for the data-free methods (Self-NPO/TDFT, DDSPO): prompt files and captioned
image folders, yielding `PromptRecord`s lazily (same `Source` contract as `pairs.py`).

Prompt files:
  *.txt    one prompt per line; blank lines are counted as `empty_prompt` and skipped.
           Id: `<line number>-<first 8 hex of sha1(prompt)>` (stable when lines are appended,
           and an edited line gets a new id).
  *.jsonl  `{"prompt": ..., "id"?: ..., "negative_prompt"?: ..., "image"?: <path relative to the file>,
           "loser_image"?: <path>}` (`caption`/`text` accepted for prompt, `neg_prompt` for negative_prompt:
           see `negative_prompt_of`, which `generate --prompts` reads too; `loser_image`, DDSPO's loser
           generated from the negative prompt, needs `image`: a row with it alone is a `bad_row`).
           Default id as for .txt.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from .pairs import Source, _first, caption_of, captions_for, iter_jsonl, list_images
from .records import PromptRecord


NEGATIVE_PROMPT_KEYS = ("negative_prompt", "neg_prompt")  # the documented name, then its alias


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


class PromptsFile(Source):
    """Prompts from a .txt (one per line) or .jsonl file (module docstring)."""

    name = "prompts"

    def __init__(self, path, verbose: bool = True):
        super().__init__(verbose)
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no such prompts file")
        if self.path.suffix.lower() not in (".txt", ".jsonl"):
            raise ValueError(f"{self.path}: prompts file must be .txt (one per line) or .jsonl")

    def _records(self, summary):
        if self.path.suffix.lower() == ".txt":
            with open(self.path, encoding="utf-8") as fh:
                for n, line in enumerate(fh, 1):
                    prompt = line.strip()
                    if not prompt:
                        summary.skip("empty_prompt", f"{self.path.name}:{n}")
                        continue
                    yield PromptRecord(line_id(n, prompt), prompt)
            return
        root = self.path.parent
        for n, obj in iter_jsonl(self.path, summary):
            prompt = _first(obj, ("prompt", "caption", "text"))
            prompt = str(prompt).strip() if prompt is not None else ""
            if not prompt:
                summary.skip("empty_prompt", f"{self.path.name}:{n}")
                continue
            image, loser = (root / str(obj[k]) if obj.get(k) is not None else None for k in ("image", "loser_image"))
            missing = [f for f in (image, loser) if f is not None and not f.is_file()]
            if missing:
                summary.skip("missing_file", f"{self.path.name}:{n}: {missing[0]}")
                continue
            if loser is not None and image is None:
                summary.skip("bad_row", f"{self.path.name}:{n}: loser_image without image (the winner)")
                continue
            try:
                neg = negative_prompt_of(obj, f"{self.path.name}:{n}")
            except ValueError as e:
                summary.skip("bad_row", str(e))
                continue
            rid = str(obj["id"]) if obj.get("id") is not None else line_id(n, prompt)
            yield PromptRecord(rid, prompt, image, neg, loser)


class ImageFolder(Source):
    """Captioned images (Self-NPO/TDFT from real images): captions as in `pairs.captions_for`.
    Id: the image's path relative to the folder, without extension."""

    name = "image-folder"

    def __init__(self, root, recursive: bool = False, verbose: bool = True):
        super().__init__(verbose)
        self.root, self.recursive = Path(root), recursive
        if not self.root.is_dir():
            raise FileNotFoundError(f"{self.root}: no such image folder")

    def _records(self, summary):
        _, table = captions_for(self.root, summary)
        for stem, path in list_images(self.root, self.recursive).items():
            cap = caption_of(stem, path, table)
            if cap is None:
                summary.skip("missing_caption", stem)
                continue
            yield PromptRecord(stem, cap, path)


def open_prompts(spec, verbose: bool = True) -> Source:
    """A prompt source from a path: a .txt/.jsonl prompts file or a captioned image folder."""
    p = Path(spec)
    if p.is_dir():
        return ImageFolder(p, verbose=verbose)
    return PromptsFile(p, verbose=verbose)
