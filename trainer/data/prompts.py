"""Prompt sources for the data-free methods (Self-NPO/TDFT, DDSPO): prompt files and captioned
image folders, yielding `PromptRecord`s lazily (same `Source` contract as `pairs.py`).

Prompt files:
  *.txt    one prompt per line; blank lines are counted as `empty_prompt` and skipped.
           Id: `<line number>-<first 8 hex of sha1(prompt)>` (stable when lines are appended,
           and an edited line gets a new id).
  *.jsonl  `{"prompt": ..., "id"?: ..., "neg_prompt"?: ..., "image"?: <path relative to the file>,
           "loser_image"?: <path>}` (`caption`/`text` accepted for prompt; `loser_image`, DDSPO's
           loser generated from `neg_prompt`, needs `image`: a row with it alone is a `bad_row`).
           Default id as for .txt.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from .pairs import Source, _first, caption_of, captions_for, iter_jsonl, list_images
from .records import PromptRecord


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
            neg = obj.get("neg_prompt")
            rid = str(obj["id"]) if obj.get("id") is not None else line_id(n, prompt)
            yield PromptRecord(rid, prompt, image, str(neg) if neg is not None else None, loser)


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
