"""Prompt sources for the data-free methods (Self-NPO/TDFT, DDSPO): prompt files and captioned
image folders, yielding `PromptRecord`s lazily (same `Source` contract as `pairs.py`).

Prompt files (.txt, .jsonl): read by the one prompts reader, core/prompts.py (its rules there).
"""
from __future__ import annotations

from pathlib import Path

from ...core.prompts import PromptRecord, check_prompts_file, iter_prompts_file
from .pairs import Source, caption_of, captions_for, list_images


class PromptsFile(Source):
    """Prompts from a .txt (one per line) or .jsonl file (core/prompts.py)."""

    name = "prompts"

    def __init__(self, path, verbose: bool = True):
        super().__init__(verbose)
        self.path = check_prompts_file(path)

    def _records(self, summary):
        for rec, _ in iter_prompts_file(self.path, summary):
            yield rec


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
