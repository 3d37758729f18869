"""Preference-pair sources: Pick-a-Pic parquet shards (or an HF dataset, streamed), JSONL, folders.

Each source is an iterable of `PairRecord`s, winner first, produced lazily; each pass fills a
fresh `source.summary` (`DataSummary`) and prints it when the pass ends. Structural problems
(ties, missing captions, missing partner files, bad JSON lines) are counted here; undecodable
image bytes are counted where images are decoded (`LatentCache.fill`, the datasets).

Caption files for image folders (`captions_for`), first match wins:
  1. `captions.jsonl`: one `{"file": "<name or stem>", "caption": "..."}` per line
     (keys `stem`/`id`/`image` and `prompt`/`text` are accepted too);
  2. `captions.txt`: one `stem<TAB>caption` per line;
  3. a sidecar `<stem>.txt` next to the image (the chosen image for pair folders).
"""
from __future__ import annotations

import functools
import glob
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from ...core.jsonl import iter_jsonl
from ...core.prompts import first_of
from ...core.summary import DataSummary
from .records import IMAGE_EXTS, PairRecord

PICKAPIC_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0", "label_1")


def _shard_errors() -> tuple[type[BaseException], ...]:
    try:
        import pyarrow as pa
    except ImportError:
        return (OSError,)
    return (OSError, pa.ArrowException)


SHARD_ERRORS = _shard_errors()  # what pyarrow raises for a truncated or corrupt parquet file


class Source:
    """Base of all sources: de-duplicates ids, counts, prints the summary at the end of a pass."""

    name = "source"

    def __init__(self, verbose: bool = True):
        self.verbose = verbose
        self.summary = DataSummary(self.name)

    def _records(self, summary: DataSummary) -> Iterator:
        raise NotImplementedError

    def __iter__(self):
        summary = self.summary = DataSummary(self.name)
        seen: set[str] = set()
        for rec in self._records(summary):
            if rec.id in seen:
                summary.skip("duplicate_id", f"id {rec.id!r}")
                continue
            seen.add(rec.id)
            summary.keep()
            yield rec
        if self.verbose:
            summary.print()


# ---------------------------------------------------------------------------------------------
# Pick-a-Pic


def pickapic_winner(caption, label_0, label_1, summary: DataSummary, where: str) -> int | None:
    """Index (0 or 1) of the preferred image of a Pick-a-Pic row, or None (counted) to skip it."""
    if caption is None or not str(caption).strip():
        summary.skip("missing_caption", where)
        return None
    if label_0 is None or label_1 is None:
        summary.skip("no_label", where)
        return None
    l0, l1 = float(label_0), float(label_1)
    if l0 == l1:
        summary.skip("tie", f"{where}: label_0 = label_1 = {l0}")
        return None
    if (l0, l1) == (1.0, 0.0):
        return 0
    if (l0, l1) == (0.0, 1.0):
        return 1
    summary.skip("no_label", f"{where}: labels ({l0}, {l1})")
    return None


@functools.lru_cache(maxsize=4)
def _row_group_column(path: str, row_group: int, column: str):
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).read_row_group(row_group, columns=[column]).column(0)


@dataclass(frozen=True)
class ParquetCell:
    """Lazy reference to one image cell of a parquet file (picklable, for DataLoader workers).

    Reading it loads that row group's column once (a small per-process LRU keeps the last 4),
    so reading cells in file order (as `LatentCache.fill` does) costs one read per row group.
    """

    path: str
    row_group: int
    row: int
    column: str

    def __call__(self) -> bytes:
        from .records import BadRecord

        try:
            value = _row_group_column(self.path, self.row_group, self.column)[self.row].as_py()
        except SHARD_ERRORS as e:
            raise BadRecord("unreadable_shard", f"{self.path}: row group {self.row_group}: {e}") from None
        if isinstance(value, dict):  # HF `Image` feature stored as {"bytes": ..., "path": ...}
            value = value.get("bytes")
        if not value:
            raise BadRecord("missing_file", f"{self.path}: row group {self.row_group} row {self.row}: "
                                            f"{self.column} is empty")
        return value


def expand_paths(paths: str | os.PathLike | Sequence[str | os.PathLike], what: str = "parquet") -> list[Path]:
    """Files named by paths / globs / directories (a directory means its `*.<what>` files), sorted."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out: list[Path] = []
    for p in paths:
        p = str(p)
        if os.path.isdir(p):
            out += sorted(Path(p).glob(f"*.{what}"))
        elif glob.has_magic(p):
            out += sorted(Path(x) for x in glob.glob(p))
        elif os.path.isfile(p):
            out.append(Path(p))
        else:
            raise FileNotFoundError(f"{p}: no such file or directory")
    if not out:
        raise FileNotFoundError(f"no .{what} files in {list(map(str, paths))}")
    return out


class PickAPicParquet(Source):
    """Pick-a-Pic v2 parquet shards (columns caption, jpg_0, jpg_1, label_0, label_1).

    label_0 = 1 -> jpg_0 wins; ties (0.5/0.5) and unlabelled rows are skipped. Only the caption,
    label and id columns are read while indexing, one row group at a time; images stay in the
    file as `ParquetCell` references. Ids: `ranking_id` when the column exists, else
    `<file stem>:<row number>`.
    """

    name = "pickapic"

    def __init__(self, paths, verbose: bool = True):
        super().__init__(verbose)
        self.files = expand_paths(paths, "parquet")
        import pyarrow.parquet as pq

        for f in self.files:
            try:
                names = set(pq.ParquetFile(f).schema_arrow.names)
            except SHARD_ERRORS:
                continue  # unreadable: skipped and counted in every pass (_records)
            missing = [c for c in PICKAPIC_COLUMNS if c not in names]
            if missing:
                raise ValueError(f"{f}: not a Pick-a-Pic shard, missing column(s) {missing} "
                                 f"(needs {list(PICKAPIC_COLUMNS)})")

    def _records(self, summary):
        import pyarrow.parquet as pq

        for f in self.files:
            try:
                pf = pq.ParquetFile(f)
            except SHARD_ERRORS as e:
                summary.skip("unreadable_shard", f"{f}: {e}")
                continue
            cols = ["caption", "label_0", "label_1"]
            has_id = "ranking_id" in pf.schema_arrow.names
            offset = 0
            for rg in range(pf.num_row_groups):
                try:
                    table = pf.read_row_group(rg, columns=cols + (["ranking_id"] if has_id else []))
                except SHARD_ERRORS as e:
                    summary.skip("unreadable_shard", f"{f} row group {rg}: {e}")
                    offset += pf.metadata.row_group(rg).num_rows
                    continue
                rows = table.to_pydict()
                for i in range(table.num_rows):
                    rid = str(rows["ranking_id"][i]) if has_id else f"{f.stem}:{offset + i}"
                    where = f"{f.name} row {offset + i}"
                    w = pickapic_winner(rows["caption"][i], rows["label_0"][i], rows["label_1"][i], summary, where)
                    if w is None:
                        continue
                    cells = [ParquetCell(str(f), rg, i, c) for c in ("jpg_0", "jpg_1")]
                    yield PairRecord(rid, str(rows["caption"][i]).strip(), cells[w], cells[1 - w])
                offset += table.num_rows


class PickAPicHF(Source):
    """Pick-a-Pic streamed with HF `datasets` (`pip install datasets`), e.g. name
    "yuvalkirstain/pickapic_v2". Records carry the image bytes, so consume it in one streaming
    pass (`LatentCache.fill`) rather than collecting it in a list."""

    name = "pickapic-hf"

    def __init__(self, name: str, split: str = "train", verbose: bool = True, **load_kwargs):
        super().__init__(verbose)
        try:
            import datasets  # noqa: F401
        except ImportError:
            raise ImportError("streaming a Pick-a-Pic dataset by name needs `pip install datasets`; "
                              "or download the parquet shards and pass their paths") from None
        self.dataset_name, self.split, self.load_kwargs = name, split, load_kwargs

    def _records(self, summary):
        import datasets

        ds = datasets.load_dataset(self.dataset_name, split=self.split, streaming=True, **self.load_kwargs)
        for i, row in enumerate(ds):
            where = f"{self.dataset_name}[{self.split}] row {i}"
            w = pickapic_winner(row.get("caption"), row.get("label_0"), row.get("label_1"), summary, where)
            if w is None:
                continue
            rid = str(row["ranking_id"]) if row.get("ranking_id") is not None else f"{self.split}:{i}"
            imgs = [row.get("jpg_0"), row.get("jpg_1")]
            yield PairRecord(rid, str(row["caption"]).strip(), imgs[w], imgs[1 - w])


# ---------------------------------------------------------------------------------------------
# JSONL and folders


class JsonlPairs(Source):
    """JSONL lines `{"prompt", "chosen", "rejected"}` (optional "id"); image paths relative to the
    JSONL file's folder (absolute paths work too). Default id: `<file stem>:<line number>`."""

    name = "jsonl-pairs"

    def __init__(self, path, verbose: bool = True):
        super().__init__(verbose)
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no such JSONL file")

    def _records(self, summary):
        root = self.path.parent
        for n, obj in iter_jsonl(self.path, summary):
            where = f"{self.path.name}:{n}"
            prompt = first_of(obj, ("prompt", "caption"))
            if prompt is None or not str(prompt).strip():
                summary.skip("missing_caption", where)
                continue
            if obj.get("chosen") is None or obj.get("rejected") is None:
                summary.skip("bad_row", f"{where}: needs both 'chosen' and 'rejected'")
                continue
            paths = [root / str(obj["chosen"]), root / str(obj["rejected"])]
            missing = [str(p) for p in paths if not p.is_file()]
            if missing:
                summary.skip("missing_file", f"{where}: {missing[0]}")
                continue
            rid = str(obj["id"]) if obj.get("id") is not None else f"{self.path.stem}:{n}"
            yield PairRecord(rid, str(prompt).strip(), paths[0], paths[1])


def list_images(folder: Path, recursive: bool = False) -> dict[str, Path]:
    """{relative stem: path} of the images in `folder` (sorted; first extension wins per stem)."""
    it = folder.rglob("*") if recursive else folder.glob("*")
    out: dict[str, Path] = {}
    for p in sorted(it):
        if p.is_file() and p.suffix.lower() in IMAGE_EXTS:
            out.setdefault(p.relative_to(folder).with_suffix("").as_posix(), p)
    return out


def captions_for(folder: Path, summary: DataSummary) -> tuple[str, dict[str, str] | None]:
    """(kind, {stem: caption}) from `captions.jsonl` / `captions.txt` in `folder`; ("sidecar", None)
    when neither exists (then each image's `<stem>.txt` is read)."""
    jl, txt = folder / "captions.jsonl", folder / "captions.txt"
    if jl.is_file():
        out = {}
        for n, obj in iter_jsonl(jl, summary):
            key, cap = first_of(obj, ("file", "stem", "id", "image")), first_of(obj, ("caption", "prompt", "text"))
            if key is None or cap is None:
                summary.skip("bad_row", f"{jl}:{n}: needs 'file' and 'caption'")
                continue
            key = str(key)
            out[str(Path(key).with_suffix("")) if Path(key).suffix.lower() in IMAGE_EXTS else key] = str(cap)
        return "captions.jsonl", out
    if txt.is_file():
        out = {}
        for n, line in enumerate(txt.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            if "\t" not in line:
                summary.skip("bad_row", f"{txt}:{n}: expected 'stem<TAB>caption'")
                continue
            stem, cap = line.split("\t", 1)
            out[stem.strip()] = cap
        return "captions.txt", out
    return "sidecar", None


def caption_of(stem: str, image: Path, table: dict[str, str] | None) -> str | None:
    if table is not None:
        cap = table.get(stem)
    else:
        side = image.with_suffix(".txt")
        cap = side.read_text(encoding="utf-8") if side.is_file() else None
    cap = cap.strip() if cap is not None else None
    return cap or None


class FolderPairs(Source):
    """`root/chosen/<stem>.<ext>` + `root/rejected/<stem>.<ext>` (matching stems), captions in
    `root/captions.jsonl`, `root/captions.txt` or sidecar `chosen/<stem>.txt`. Id: the stem."""

    name = "folder-pairs"

    def __init__(self, root, chosen: str = "chosen", rejected: str = "rejected", verbose: bool = True):
        super().__init__(verbose)
        self.root = Path(root)
        self.dirs = (self.root / chosen, self.root / rejected)
        for d in self.dirs:
            if not d.is_dir():
                raise FileNotFoundError(f"{d}: missing folder (expected {self.root}/{chosen}/ and {self.root}/{rejected}/)")

    def _records(self, summary):
        chosen, rejected = (list_images(d) for d in self.dirs)
        _, table = captions_for(self.root, summary)
        for stem in sorted(set(chosen) | set(rejected)):
            if stem not in chosen or stem not in rejected:
                have = self.dirs[0] if stem in chosen else self.dirs[1]
                summary.skip("missing_partner", f"{have.name}/{stem} has no partner")
                continue
            cap = caption_of(stem, chosen[stem], table)
            if cap is None:
                summary.skip("missing_caption", f"{stem}")
                continue
            yield PairRecord(stem, cap, chosen[stem], rejected[stem])


def open_pairs(spec, verbose: bool = True) -> Source:
    """A pair source from a path: a .jsonl file, a folder with chosen/ + rejected/, parquet
    files / globs / a folder of parquet shards; `hf:<dataset name>[:split]` streams with HF datasets."""
    if isinstance(spec, str) and spec.startswith("hf:"):
        name, _, split = spec[3:].partition(":")
        return PickAPicHF(name, split or "train", verbose=verbose)
    if isinstance(spec, (list, tuple)):
        return PickAPicParquet(spec, verbose=verbose)
    p = Path(spec)
    if p.suffix == ".jsonl":
        return JsonlPairs(p, verbose=verbose)
    if p.is_dir() and (p / "chosen").is_dir():
        return FolderPairs(p, verbose=verbose)
    if p.suffix == ".parquet" or glob.has_magic(str(spec)) or (p.is_dir() and any(p.glob("*.parquet"))):
        return PickAPicParquet(spec, verbose=verbose)
    raise ValueError(f"{spec}: not a pair source (expected a .jsonl file, a folder with chosen/ and "
                     f"rejected/, Pick-a-Pic .parquet files, or hf:<dataset name>)")
