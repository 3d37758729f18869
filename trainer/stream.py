"""The trainer's batch stream: trainer/data's sources -> cache -> resumable sampler -> collate.

`build_batches(cfg, backend, kind, rank, world_size)` (the CLI trainer) and
`nodes.comfy.session.build_stream` (the ComfyUI nodes, over in-memory records) both end in `stream_of`: it returns an endless iterator of this
process's micro-batches (`PairBatch` / `PromptBatch`) whose `state_dict()` is the sampler's data
position (exact: no prefetching workers), so a checkpoint resumes on the very next pair.
`kind` is the method's `data_kind`: "pairs" reads pair sources (JSONL, chosen/rejected folders,
Pick-a-Pic parquet); the prompt kinds read prompts files or captioned image folders; DDSPO
("prompts_with_winners") also reads a `ddspo-prepare` folder, and its loser images follow
`ddspo_loser` (the data layer draws "other"; "generated" needs them in the data).
"""
from __future__ import annotations

from functools import partial

import torch

from .data.cache import LatentCache, fingerprint_modules
from .data.dataset import (PairDataset, PromptDataset, ResumableSampler, collate_pairs, collate_prompts,
                           other_loser_seed)
from ..core.ddspo_format import is_prepared
from .data.ddspo_dataset import DdspoDataset
from .data.pairs import open_pairs
from .data.prompts import open_prompts
from .data.transforms import ImageTransform


class BatchStream:
    """Endless micro-batches of `batch_size` keys from `sampler` (epochs roll over)."""

    def __init__(self, dataset, sampler: ResumableSampler, collate, batch_size: int):
        self.dataset, self.sampler, self.collate, self.batch_size = dataset, sampler, collate, batch_size
        self._it = None

    def __iter__(self):
        return self

    def _key(self):
        for _ in range(2):  # at most one epoch boundary per key
            if self._it is None:
                self._it = iter(self.sampler)
            try:
                return next(self._it)
            except StopIteration:
                self._it = None
        raise RuntimeError("data sampler yielded an empty epoch")

    def __next__(self):
        for _ in range(1000):
            batch = self.collate([self.dataset[self._key()] for _ in range(self.batch_size)])
            if batch is not None:  # a batch of only unreadable items is skipped (counted in the summary)
                return batch
        raise RuntimeError("1000 consecutive batches of unreadable items: check the data source")

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)
        self._it = None


def image_transform(cfg) -> ImageTransform:
    """The training images' resize / crop / flip of `cfg` (seeded)."""
    return ImageTransform(cfg.resolution, cfg.crop, "random" if cfg.random_flip else "none", seed=cfg.seed)


def latent_shape(backend, resolution: int) -> tuple[int, ...]:
    """(C, h, w) of the backend's latents for `resolution`-pixel images, from its own encoder (never guessed)."""
    return tuple(backend.encode_images(torch.zeros(1, 3, resolution, resolution)).shape[1:])


def stream_of(records: list, cache: LatentCache, cfg, backend, kind: str, rank: int = 0, world_size: int = 1
              ) -> BatchStream:
    """The resumable stream over records already in `cache` (`cache.fill`): pairs or prompts.

    kind: the method's `data_kind` (`METHODS[cfg.method].data_kind`)."""
    sampler = ResumableSampler(len(records), seed=cfg.seed, rank=rank, world_size=world_size, batch_size=cfg.batch_size)
    if kind == "pairs":
        return BatchStream(PairDataset(records, cache), sampler, collate_pairs, cfg.batch_size)
    collate = partial(collate_prompts, latent_shape=latent_shape(backend, cfg.resolution))
    return BatchStream(PromptDataset(records, cache, other_loser_seed(cfg, kind)), sampler, collate, cfg.batch_size)


def _prepared_folder(cfg, kind: str) -> str | None:
    """The one data_path when it is a `ddspo-prepare` folder (only DDSPO trains on it), else None."""
    prepared = [p for p in cfg.data_path if is_prepared(p)]
    if not prepared:
        return None
    if kind != "prompts_with_winners":
        raise ValueError(f"data {prepared[0]} is a ddspo-prepare folder: only method ddspo trains on it")
    if len(cfg.data_path) != 1:
        raise ValueError(f"data {cfg.data_path}: a ddspo-prepare folder must be the only data_path")
    return prepared[0]


def build_batches(cfg, backend, kind: str, rank: int = 0, world_size: int = 1) -> BatchStream:
    if not cfg.data_path:
        raise ValueError("config: `data_path` is empty; give a pairs/prompts file or folder")
    prepared = _prepared_folder(cfg, kind)
    opener = open_pairs if kind == "pairs" else open_prompts
    encoders = [getattr(backend, "vae", None), *getattr(backend, "text_encoders", [])]
    tag = getattr(getattr(backend, "spec", None), "cache_tag", lambda: "")()  # e.g. SANA's instruction prefix
    cache = LatentCache.from_backend(cfg.cache_dir or None, fingerprint_modules(*encoders, extra=backend.family + tag),
                                     backend, image_transform(cfg), encode_batch=cfg.cache_batch_size)
    if prepared is not None:
        ds = DdspoDataset.for_config(prepared, cache, cfg)
        sampler = ResumableSampler(len(ds), seed=cfg.seed, rank=rank, world_size=world_size, batch_size=cfg.batch_size)
        return BatchStream(ds, sampler, collate_prompts, cfg.batch_size)
    records = [r for p in cfg.data_path for r in opener(p, verbose=rank == 0)]
    records = cache.fill(records, verbose=rank == 0)
    if not records:
        raise ValueError(f"data {cfg.data_path}: no usable records")
    return stream_of(records, cache, cfg, backend, kind, rank, world_size)
