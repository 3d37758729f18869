"""Runs to evaluate: a `manifest.json` written by `generate` or by the demo, or a folder holding one.

Accepted manifest shapes (image paths relative to the manifest's folder):
    {"images": [{"file"|"path"|"image": ..., "prompt": ..., "seed": ..., "mode"?: ...}, ...], ...}
    [{"file": ..., "prompt": ..., "seed": ...}, ...]
A manifest with several modes (generate --modes cfg npo snpo) is one run per mode: pick it with
`mode` (`RUN:mode` on the command line).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Entry:
    path: Path
    prompt: str
    seed: int | None
    mode: str | None

    @property
    def key(self) -> tuple:
        return (self.prompt, self.seed)


def manifest_path(path: Path) -> Path:
    """The manifest.json of a run given as the file or its folder (a missing one is a FileNotFoundError)."""
    if path.is_dir():
        path = path / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"run manifest not found: {path} (expected a manifest.json written by generate or demo)")
    return path


def _image_list(data, where: Path) -> list:
    if isinstance(data, list):
        return data
    if isinstance(data, dict):
        for key in ("images", "items", "entries"):
            if isinstance(data.get(key), list):
                return data[key]
    raise ValueError(f"{where}: no image list (expected a list or an 'images' list of {{file, prompt, seed}})")


def read_run(spec: str | Path, mode: str | None = None) -> list[Entry]:
    """Entries of a run; `spec` may be `PATH:mode` (mode filter) when `mode` is not given."""
    spec = str(spec)
    if mode is None and ":" in spec and not Path(spec).exists():
        spec, mode = spec.rsplit(":", 1)
    mpath = manifest_path(Path(spec))
    try:
        data = json.loads(mpath.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{mpath}: not valid JSON ({e})") from None
    entries = []
    for n, item in enumerate(_image_list(data, mpath)):
        f = item.get("file") or item.get("path") or item.get("image")
        if f is None or "prompt" not in item:
            raise ValueError(f"{mpath}: image entry {n} lacks 'file' or 'prompt'")
        e = Entry(mpath.parent / f, str(item["prompt"]), None if item.get("seed") is None else int(item["seed"]), item.get("mode"))
        if mode is None or e.mode == mode:
            entries.append(e)
    if not entries:
        modes = sorted({str(i.get("mode")) for i in _image_list(data, mpath)})
        raise ValueError(f"{mpath}: no images" + (f" with mode {mode!r} (modes present: {', '.join(modes)})" if mode else ""))
    modes = {e.mode for e in entries}
    if mode is None and len(modes) > 1:
        raise ValueError(f"{mpath}: holds several modes ({', '.join(sorted(map(str, modes)))}); pick one as {spec}:MODE")
    return entries


def pair_runs(a: list[Entry], b: list[Entry]) -> list[tuple[Entry, Entry]]:
    """Match entries by (prompt, seed); every key must appear once in each run."""
    def index(run, name):
        out = {}
        for e in run:
            if e.key in out:
                raise ValueError(f"run {name}: prompt {e.prompt!r} seed {e.seed} appears twice")
            out[e.key] = e
        return out
    ia, ib = index(a, "A"), index(b, "B")
    common = [k for k in ia if k in ib]
    if not common:
        raise ValueError("the two runs share no (prompt, seed): a paired comparison needs the same prompts and seeds")
    return [(ia[k], ib[k]) for k in common]


def load_images(entries: list[Entry]) -> list:
    """The run's images as RGB, decoded as training does (`trainer.data.records.load_image`: EXIF
    orientation, 16-bit and float scaled, alpha on white); one that cannot be decoded faithfully
    is refused (ValueError naming it), since skipping it would unpair the comparison."""
    from ..trainer.data.records import load_image

    out = []
    for e in entries:
        if not e.path.is_file():
            raise FileNotFoundError(f"image listed in the manifest is missing: {e.path}")
        out.append(load_image(e.path))
    return out
