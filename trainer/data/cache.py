"""On-disk cache of VAE latents and text-encoder outputs, so epochs after the first skip the VAE
and the text encoders.

Layout (one file per item, content addressed):

    <cache_dir>/<model_hash>/<transform key>/<h[:2]>/<h>[_v<k>].safetensors
    h = sha1("<kind>\\0<record id>"), kind "pair" or "prompt"; k = augmentation variant

`model_hash` names the encoders (VAE + text encoders + tokenizers; the UNet does not matter:
`fingerprint_modules` computes one); the transform key holds resolution, crop mode, flip and,
for random augmentation, the seed and variant count (`ImageTransform.key`). Random crops are
cached per (seed, variant): epoch e uses variant e % variants, so `variants` fixed random
crops/flips per image are cached and reused, never one stale crop for every epoch.

Each file holds `latents_w`/`latents_l` (pairs) or `latents` (prompt records with an image;
`latents_l` too for a `loser_image`, whose tag is then part of the metadata),
`hidden` and `added.<key>` of the `Cond`, `neg_hidden`/`neg_added.<key>` for a `neg_prompt`,
and the SDXL size conditioning (`size_w`, `size_l`, [6] ints); metadata holds the record id,
prompt and a tag of each image source (path + size + mtime, or a bytes digest). A file whose
metadata no longer matches its record (prompt edited, image replaced) is recomputed. Files are
written atomically (`core.atomic`), so a killed run or a full disk leaves no torn item.

SDXL: the pair's `time_ids` are the winner's size conditioning (both images of a pair get the
same crop fractions and flip; Pick-a-Pic pairs have equal sizes, so they are then identical).
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable, Iterable, NamedTuple, Sequence

import torch

from ...core.atomic import save_item
from ...core.cond import Cond
from ...core.prompts import PromptRecord
from ...core.summary import DataSummary
from .pairs import ParquetCell
from .records import BadRecord, PairRecord, load_image
from .transforms import ImageTransform, SizeCond

FORMAT = "npo-suite-latent-cache-1"
FILL_BATCH = 8  # records `LatentCache.fill` reads and encodes together (its images go to the VAE in chunks)


class CachedPair(NamedTuple):
    """A batch of one pair: latents_w, latents_l [1, C, h, w]; cond a Cond of one row."""

    latents_w: torch.Tensor
    latents_l: torch.Tensor
    cond: Cond


class CachedPrompt(NamedTuple):
    """A batch of one prompt: cond (one row), latents [1, C, h, w] or None, neg_cond or None,
    latents_l [1, C, h, w] (a record's `loser_image`) or None."""

    cond: Cond
    latents: torch.Tensor | None
    neg_cond: Cond | None
    latents_l: torch.Tensor | None = None


def fingerprint_modules(*modules: torch.nn.Module | None, extra: str = "") -> str:
    """16 hex chars identifying the weights of `modules` (VAE, text encoders): every parameter's
    name, shape, dtype and a strided sample of at most 4096 values (cheap even for SDXL)."""
    h = hashlib.sha256(extra.encode("utf-8"))
    for i, m in enumerate(modules):
        if m is None:
            continue
        h.update(f"#{i}:{type(m).__name__}".encode())
        for name, t in sorted(m.state_dict().items()):
            flat = t.detach().reshape(-1)
            step = max(1, flat.numel() // 4096)
            sample = flat[::step][:4096].to("cpu", torch.float64)
            h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
            h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


def source_tag(src) -> str:
    """A cheap identity of an image source: path+size+mtime, parquet cell+file mtime, bytes digest."""
    if src is None:
        return "none"
    if isinstance(src, (str, os.PathLike)):
        try:
            st = os.stat(src)
            return f"file:{os.fspath(src)}:{st.st_size}:{st.st_mtime_ns}"
        except OSError:
            return f"file:{os.fspath(src)}:missing"
    if isinstance(src, ParquetCell):
        try:
            mtime = os.stat(src.path).st_mtime_ns
        except OSError:
            mtime = "missing"
        return f"parquet:{src.path}:{mtime}:{src.row_group}:{src.row}:{src.column}"
    if isinstance(src, (bytes, bytearray, memoryview)):
        b = bytes(src)
        return f"bytes:{len(b)}:{hashlib.sha1(b).hexdigest()}"
    return f"obj:{src!r}"


def _cond_tensors(cond: Cond, row: int, prefix: str = "") -> dict[str, torch.Tensor]:
    out = {f"{prefix}hidden": cond.hidden[row]}  # [L, D]
    out.update({f"{prefix}added.{k}": v[row] for k, v in cond.added.items()})
    return out


def _cond_from(tensors: dict[str, torch.Tensor], prefix: str = "") -> Cond:
    pre = f"{prefix}added."
    added = {k[len(pre):]: v[None] for k, v in tensors.items() if k.startswith(pre)}
    return Cond(tensors[f"{prefix}hidden"][None], added)  # [1, L, D]


def _with_time_ids(cond: Cond, sizes: Sequence[SizeCond]) -> Cond:
    """Replace SDXL `time_ids` [B, 6] by each row's own size conditioning (SD1.x: unchanged)."""
    t = cond.added.get("time_ids")
    if t is None or t.ndim != 2 or t.shape[-1] != 6:
        return cond
    rows = torch.stack([s.time_ids() for s in sizes]).to(t.device, t.dtype)  # [B, 6]
    return Cond(cond.hidden, {**cond.added, "time_ids": rows})


def _as_read(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What every read returns: CPU tensors, floating point as float32 (store_dtype is a disk format)."""
    return {k: v.detach().to("cpu", torch.float32) if v.is_floating_point() else v.detach().to("cpu")
            for k, v in tensors.items()}


class LatentCache:
    """Encode-once store of latents + conditioning (module docstring for the layout).

    encode_images_fn: pixels [B, 3, H, W] in [-1, 1] -> scaled latents [B, C, h, w]
    encode_prompts_fn: list[str] -> Cond
    cache_dir=None: nothing is stored, every call encodes (same interface, for quick runs).
    store_dtype: e.g. torch.float16 to halve the disk use (default: as encoded). Reads always return
    float32 CPU tensors, and a miss returns the values as they were stored (rounded to
    store_dtype), so the first epoch sees exactly what later epochs read.
    encode_batch: at most this many images per `encode_images_fn` call (a fill batch of 8 pairs is
    16 images; at 512 px in one VAE call that was a run's memory peak); each chunk's latents move
    to the CPU at once, so the device holds one chunk's pixels and activations at a time.
    """

    def __init__(self, cache_dir: str | os.PathLike | None, model_hash: str,
                 encode_images_fn: Callable[[torch.Tensor], torch.Tensor] | None,
                 encode_prompts_fn: Callable[[list[str]], Cond],
                 transform: ImageTransform | None = None, store_dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None, encode_batch: int = 4):
        if encode_batch < 1:
            raise ValueError(f"encode_batch must be >= 1, got {encode_batch}")
        if not model_hash or any(c in model_hash for c in "/\\\0") or model_hash in (".", ".."):
            raise ValueError(f"model_hash must be a non-empty file-name-safe string, got {model_hash!r}")
        self.transform = transform or ImageTransform()
        self.model_hash = model_hash
        self.root = Path(cache_dir) / model_hash / self.transform.key() if cache_dir is not None else None
        self.encode_images_fn, self.encode_prompts_fn = encode_images_fn, encode_prompts_fn
        self.store_dtype, self.device, self.encode_batch = store_dtype, device, encode_batch
        self.hits = self.misses = 0

    @classmethod
    def from_backend(cls, cache_dir, model_hash: str, backend, transform: ImageTransform | None = None,
                     **kwargs) -> "LatentCache":
        """Encode with any `Backend` (trainer/backends/base.py)."""
        return cls(cache_dir, model_hash, backend.encode_images, backend.encode_prompts, transform,
                   device=getattr(backend, "device", None), **kwargs)

    # ----------------------------------------------------------------- addressing
    def item_path(self, kind: str, record_id: str, variant: int = 0) -> Path | None:
        if self.root is None:
            return None
        h = hashlib.sha1(f"{kind}\0{record_id}".encode("utf-8")).hexdigest()
        v = variant % self.transform.num_variants
        suffix = f"_v{v}" if self.transform.num_variants > 1 else ""
        return self.root / h[:2] / f"{h}{suffix}.safetensors"

    @staticmethod
    def _metadata(kind: str, record) -> dict[str, str]:
        if kind == "pair":
            srcs = {"chosen": source_tag(record.chosen), "rejected": source_tag(record.rejected)}
        else:
            srcs = {"image": source_tag(record.image), "neg_prompt": repr(record.neg_prompt)}
            if record.loser_image is not None:  # only then: entries of records without one stay valid
                srcs["loser_image"] = source_tag(record.loser_image)
        return {"format": FORMAT, "kind": kind, "id": record.id, "prompt": record.prompt, **srcs}

    def _is_cached(self, kind: str, record, variant: int) -> bool:
        """True when the item's file exists and its metadata matches the record (header read only)."""
        path = self.item_path(kind, record.id, variant)
        if path is None or not path.is_file():
            return False
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                return (f.metadata() or {}) == self._metadata(kind, record)
        except Exception:  # unreadable cache file (disk error, foreign file): recompute it
            return False

    def _load(self, kind: str, record, variant: int) -> dict[str, torch.Tensor] | None:
        if not self._is_cached(kind, record, variant):
            return None  # missing or stale (record edited): recompute and overwrite
        from safetensors.torch import load_file

        try:
            return _as_read(load_file(str(self.item_path(kind, record.id, variant))))
        except Exception:
            return None

    def _store(self, kind: str, record, variant: int, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Write the item (in store_dtype); return it exactly as a later read will (`_as_read`)."""
        if self.store_dtype is not None:
            tensors = {k: v.to(self.store_dtype) if v.is_floating_point() else v for k, v in tensors.items()}
        path = self.item_path(kind, record.id, variant)
        if path is not None:
            save_item(path, tensors, self._metadata(kind, record))
        return _as_read(tensors)

    def contains(self, record: PairRecord | PromptRecord, variant: int = 0) -> bool:
        return self._is_cached(self._kind(record), record, variant)

    # ----------------------------------------------------------------- encoding
    def _prepare(self, record, variant: int) -> dict:
        """Decode + transform the record's image(s): {"px_w", "size_w"[, "px_l", "size_l"]} (BadRecord on failure)."""
        if isinstance(record, PairRecord):
            pw, sw = self.transform(load_image(record.chosen, f"{record.id} (chosen)"), record.id, variant)
            pl, sl = self.transform(load_image(record.rejected, f"{record.id} (rejected)"), record.id, variant)
            return {"px_w": pw, "size_w": sw, "px_l": pl, "size_l": sl}
        if record.image is None:
            return {}
        p, s = self.transform(load_image(record.image, record.id), record.id, variant)
        if record.loser_image is None:
            return {"px_w": p, "size_w": s}
        pl, sl = self.transform(load_image(record.loser_image, f"{record.id} (loser)"), record.id, variant)
        return {"px_w": p, "size_w": s, "px_l": pl, "size_l": sl}

    def _encode_images(self, pixels: list[torch.Tensor]) -> torch.Tensor:
        if self.encode_images_fn is None:
            raise ValueError("this LatentCache has no image encoder (encode_images_fn=None)")
        out = []
        for i in range(0, len(pixels), self.encode_batch):  # bounded chunks: the fill's memory peak
            x = torch.stack(pixels[i:i + self.encode_batch])  # [<=encode_batch, 3, H, W]
            if self.device is not None:
                x = x.to(self.device)
            out.append(self.encode_images_fn(x).to("cpu"))  # [n, C, h, w], off the device at once
            del x
        return torch.cat(out)  # [N, C, h, w] on the CPU (every read returns CPU tensors anyway)

    def encode_records(self, records: list, preps: list[dict]) -> list[dict[str, torch.Tensor]]:
        """Tensors to store for records of ONE kind, from their `_prepare` output ({"px_w": [3, H, W] pixels,
        "size_w": SizeCond[, "px_l", "size_l"]}); images in chunks of `encode_batch`, one text-encoder call."""
        if isinstance(records[0], PairRecord):
            return self._encode_pairs(records, preps)
        return self._encode_prompts(records, preps)

    def _encode_pairs(self, records: list[PairRecord], preps: list[dict]) -> list[dict[str, torch.Tensor]]:
        b = len(records)
        size_w = [p["size_w"] for p in preps]
        lat = self._encode_images([p["px_w"] for p in preps] + [p["px_l"] for p in preps])  # [2B, C, h, w]
        cond = _with_time_ids(self.encode_prompts_fn([r.prompt for r in records]), size_w)
        return [{"latents_w": lat[i], "latents_l": lat[b + i], **_cond_tensors(cond, i),
                 "size_w": preps[i]["size_w"].time_ids().long(), "size_l": preps[i]["size_l"].time_ids().long()}
                for i in range(b)]

    def _encode_prompts(self, records: list[PromptRecord], preps: list[dict]) -> list[dict[str, torch.Tensor]]:
        out: list[dict[str, torch.Tensor]] = [{} for _ in records]
        with_img = [i for i, p in enumerate(preps) if p]
        if with_img:
            lat = self._encode_images([preps[i]["px_w"] for i in with_img])  # [N, C, h, w]
            for j, i in enumerate(with_img):
                out[i]["latents"] = lat[j]
                out[i]["size_w"] = preps[i]["size_w"].time_ids().long()
        with_loser = [i for i, p in enumerate(preps) if "px_l" in p]
        if with_loser:
            lat_l = self._encode_images([preps[i]["px_l"] for i in with_loser])  # [M, C, h, w]
            for j, i in enumerate(with_loser):
                out[i]["latents_l"] = lat_l[j]

        def one(cond: Cond, j: int, i: int) -> Cond:
            c = cond.index(slice(j, j + 1))
            return _with_time_ids(c, [preps[i]["size_w"]]) if preps[i] else c

        cond = self.encode_prompts_fn([r.prompt for r in records])
        for i in range(len(records)):
            out[i].update(_cond_tensors(one(cond, i, i), 0))
        neg = [i for i, r in enumerate(records) if r.neg_prompt is not None]
        if neg:
            ncond = self.encode_prompts_fn([records[i].neg_prompt for i in neg])
            for j, i in enumerate(neg):
                out[i].update(_cond_tensors(one(ncond, j, i), 0, "neg_"))
        return out

    # ----------------------------------------------------------------- public
    def get_pair(self, record: PairRecord, variant: int = 0) -> CachedPair:
        """(latents_w, latents_l, cond) of one pair, encoded at most once per variant.

        Raises BadRecord when an image cannot be read (the caller counts and skips it)."""
        t = self._get("pair", record, variant)
        return CachedPair(t["latents_w"][None], t["latents_l"][None], _cond_from(t))

    def get_prompt(self, record: PromptRecord, variant: int = 0) -> CachedPrompt:
        """(cond, latents or None, neg_cond or None) of one prompt record, encoded at most once."""
        t = self._get("prompt", record, variant)
        lat = t["latents"][None] if "latents" in t else None
        neg = _cond_from(t, "neg_") if "neg_hidden" in t else None
        return CachedPrompt(_cond_from(t), lat, neg, t["latents_l"][None] if "latents_l" in t else None)

    def _get(self, kind: str, record, variant: int) -> dict[str, torch.Tensor]:
        t = self._load(kind, record, variant)
        if t is not None:
            self.hits += 1
            return t
        self.misses += 1
        t = self.encode_records([record], [self._prepare(record, variant)])[0]
        return self._store(kind, record, variant, t)

    def fill(self, records: Iterable[PairRecord | PromptRecord], batch_size: int = FILL_BATCH,
             variants: Sequence[int] | None = None, summary: DataSummary | None = None,
             verbose: bool = True) -> list:
        """Encode every record not cached yet, in batches and in the source's order (parquet row
        groups are read once), for each augmentation variant; return the usable records, in order.

        Unreadable images are counted in `summary` (and printed at the end) and left out. With
        cache_dir=None nothing is stored: the pass only checks that every image decodes."""
        summary = summary if summary is not None else DataSummary("cache")
        variants = list(range(self.transform.num_variants)) if variants is None else list(variants)
        kept: list = []
        pending: list = []
        bad: set[str] = set()

        def flush():
            for v in variants:
                for grp in self._split_kinds([r for r in pending if r.id not in bad]):
                    todo = [r for r in grp if not self._is_cached(self._kind(r), r, v)]
                    self.hits += len(grp) - len(todo)
                    ready, preps = [], []
                    for r in todo:  # decode one by one, so one bad image does not sink the batch
                        try:
                            preps.append(self._prepare(r, v))
                            ready.append(r)
                        except BadRecord as e:
                            summary.skip(e.reason, str(e))
                            bad.add(r.id)
                    if ready and self.root is not None:
                        for r, t in zip(ready, self.encode_records(ready, preps)):
                            self._store(self._kind(r), r, v, t)
                        self.misses += len(ready)
            for r in pending:
                if r.id not in bad:
                    kept.append(r)
                    summary.keep()
            pending.clear()

        for rec in records:
            pending.append(rec)
            if len(pending) >= batch_size:
                flush()
        flush()
        if verbose:
            summary.print()
        return kept

    # ----------------------------------------------------------------- helpers
    @staticmethod
    def _kind(record) -> str:
        return "pair" if isinstance(record, PairRecord) else "prompt"

    @staticmethod
    def _split_kinds(records: list) -> list[list]:
        pairs = [r for r in records if isinstance(r, PairRecord)]
        prompts = [r for r in records if not isinstance(r, PairRecord)]
        return [g for g in (pairs, prompts) if g]

