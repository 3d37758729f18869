"""Map-style datasets over (cached) records, a deterministic resumable sampler, and the collates
to `PairBatch` / `PromptBatch` (defined in `trainer/batches.py`).

Order: epoch e visits the records in `randperm(n, seed + e)` (or 0..n-1 with shuffle=False).
The sampler yields `(index, epoch)` keys; the dataset uses the epoch to pick the augmentation
variant (e % transform.variants, see `transforms.py`). With world_size W, the epoch's stream is
cut to whole global batches (W·B, B the per-rank batch size given to the sampler and to the
DataLoader) and rank r takes positions r, r+W, r+2W, ...: the union of the ranks' k-th batches
of size B is exactly the k-th batch of size B·W of one process, whatever W is. Every yielded
sample is consumed (use DataLoader(drop_last=False): the sampler already dropped the tail).

Position = (epoch, index): `index` global samples of epoch `epoch` consumed. `state_dict()`
returns the position after what the sampler has yielded, which is exact with num_workers=0;
with DataLoader workers (which prefetch) pass the count the trainer really consumed:
`state_dict(consumed=global_samples_since_start)`.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import torch

from ...core.cond import Cond
from ..batches import PairBatch, PromptBatch
from .cache import LatentCache
from ...core.ddspo_format import other_index
from ...core.prompts import PromptRecord
from ...core.summary import DataSummary
from .records import BadRecord, PairRecord



def _key(key) -> tuple[int, int]:
    return (int(key[0]), int(key[1])) if isinstance(key, (tuple, list)) else (int(key), 0)


class _RecordDataset(torch.utils.data.Dataset):
    def __init__(self, records: Sequence, cache: LatentCache):
        self.records, self.cache = list(records), cache
        self.summary = DataSummary(type(self).__name__)

    def __len__(self) -> int:
        return len(self.records)

    def _variant(self, epoch: int) -> int:
        return epoch % self.cache.transform.num_variants


class PairDataset(_RecordDataset):
    """Pairs through a LatentCache; item = {"id", "prompt", "latents_w", "latents_l", "cond"} or None
    for an unreadable pair (counted in `self.summary`; run `cache.fill(records)` first to drop them)."""

    def __getitem__(self, key):
        i, epoch = _key(key)
        rec: PairRecord = self.records[i]
        try:
            lw, ll, cond = self.cache.get_pair(rec, self._variant(epoch))
        except BadRecord as e:
            self.summary.skip(e.reason, str(e))
            return None
        return {"id": rec.id, "prompt": rec.prompt, "latents_w": lw, "latents_l": ll, "cond": cond}


def other_loser_seed(cfg, data_kind: str) -> int | None:
    """The seed of the other-prompt loser draw when the method trains on winners (DDSPO) with
    `ddspo_loser` "other", else None (no loser drawn by the data layer)."""
    return cfg.seed if data_kind == "prompts_with_winners" and cfg.ddspo_loser == "other" else None


class PromptDataset(_RecordDataset):
    """Prompt records through a LatentCache; item = {"id", "prompt", "cond", "latents", "neg_cond",
    "latents_l"}: "latents_l" is the record's `loser_image` latents (or None).

    other_loser_seed: when set (DDSPO, ddspo_loser="other"), "latents_l" is instead the image
    latents of record `other_index(seed, epoch, i, n)`; every record then needs an image."""

    def __init__(self, records: Sequence, cache: LatentCache, other_loser_seed: int | None = None):
        super().__init__(records, cache)
        if other_loser_seed is not None and len(self.records) < 2:
            raise ValueError(f"ddspo_loser='other' takes another prompt's image: needs at least 2 records, "
                             f"got {len(self.records)}")
        self.other_loser_seed = other_loser_seed

    def __getitem__(self, key):
        i, epoch = _key(key)
        rec: PromptRecord = self.records[i]
        try:
            c = self.cache.get_prompt(rec, self._variant(epoch))
            item = {"id": rec.id, "prompt": rec.prompt, "cond": c.cond, "latents": c.latents, "neg_cond": c.neg_cond,
                    "latents_l": c.latents_l}
            if self.other_loser_seed is not None:
                item["latents_l"] = self._other_latents(other_index(self.other_loser_seed, epoch, i, len(self)), epoch)
        except BadRecord as e:
            self.summary.skip(e.reason, str(e))
            return None
        return item

    def _other_latents(self, j: int, epoch: int) -> torch.Tensor:
        rec = self.records[j]
        lat = self.cache.get_prompt(rec, self._variant(epoch)).latents
        if lat is None:
            raise ValueError(f"ddspo_loser='other': record {rec.id!r} has no image; every prompt needs one "
                             f"(its winner) to serve as another prompt's loser")
        return lat


def _cat_optional(items: list[dict], key: str, what: str):
    vals = [it.get(key) for it in items]
    if all(v is None for v in vals):
        return None
    if any(v is None for v in vals):
        ids = [it["id"] for it, v in zip(items, vals) if v is None]
        raise ValueError(f"batch mixes records with and without {what}: {ids[:3]} have none")
    return Cond.cat(vals) if isinstance(vals[0], Cond) else torch.cat(vals)


def collate_pairs(items: list) -> PairBatch | None:
    """Items of PairDataset -> PairBatch (None items dropped; None if nothing is left)."""
    items = [it for it in items if it is not None]
    if not items:
        return None
    return PairBatch(latents_w=torch.cat([it["latents_w"] for it in items]),  # [B, C, h, w]
                     latents_l=torch.cat([it["latents_l"] for it in items]),  # [B, C, h, w]
                     cond=Cond.cat([it["cond"] for it in items]), prompts=[it["prompt"] for it in items])


def collate_prompts(items: list, latent_shape: tuple[int, ...] | None = None) -> PromptBatch | None:
    """Items of PromptDataset (or DDSPO data) -> PromptBatch (None items dropped). latent_shape
    (C, h, w) is passed on for prompt-only batches (PromptBatch needs it to draw pure noise);
    bind it with functools.partial for a DataLoader."""
    items = [it for it in items if it is not None]
    if not items:
        return None
    return PromptBatch(prompts=[it["prompt"] for it in items], cond=Cond.cat([it["cond"] for it in items]),
                       latents=_cat_optional(items, "latents", "an image"),
                       latents_l=_cat_optional(items, "latents_l", "a loser image"),
                       neg_cond=_cat_optional(items, "neg_cond", "a neg_prompt"), latent_shape=latent_shape)


class ResumableSampler(torch.utils.data.Sampler):
    """Deterministic, resumable, DDP-sharded order over `num_samples` items (module docstring).

    Yields `(index, epoch)`; iterating once runs from the current position to the end of the
    epoch, then moves to the next epoch (so `for epoch: for batch in loader` just works).
    """

    def __init__(self, num_samples: int, seed: int = 0, shuffle: bool = True, rank: int = 0, world_size: int = 1,
                 batch_size: int = 1):
        if num_samples < 1:
            raise ValueError(f"ResumableSampler needs at least one sample, got {num_samples}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} out of range for world_size {world_size}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_samples < world_size * batch_size:
            raise ValueError(f"{num_samples} samples are fewer than one global batch "
                             f"({world_size} ranks x batch {batch_size})")
        self.n, self.seed, self.shuffle, self.rank, self.world_size = num_samples, seed, shuffle, rank, world_size
        self.batch_size = batch_size
        self.epoch = self.index = 0  # position: global samples of `epoch` consumed
        self._start = (0, 0)  # position at construction / load_state_dict, for state_dict(consumed=...)

    @property
    def epoch_length(self) -> int:
        """Global samples per epoch: num_samples cut to whole global batches (world_size x batch_size)."""
        return self.n - self.n % (self.world_size * self.batch_size)

    def order(self, epoch: int) -> list[int]:
        """The global order of `epoch` (identical on every rank)."""
        if not self.shuffle:
            return list(range(self.n))
        g = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def __len__(self) -> int:
        """Samples this rank yields in the rest of the current epoch."""
        return (self.epoch_length - self.index) // self.world_size

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch, start = self.epoch, self.index
        order = self.order(epoch)[:self.epoch_length]
        for pos in range(start, self.epoch_length, self.world_size):
            self.index = pos + self.world_size  # the global position once this sample is consumed
            yield order[pos + self.rank], epoch
        self.epoch, self.index = epoch + 1, 0

    def state_dict(self, consumed: int | None = None) -> dict:
        """Data position: {"epoch", "index", "seed", "num_samples", "world_size", "shuffle"}.

        consumed: global samples (all ranks together) the trainer consumed since this sampler was
        built or last `load_state_dict`-ed; default: what the sampler yielded (exact with
        num_workers=0)."""
        epoch, index = self.epoch, self.index
        if consumed is not None:
            total = self._start[1] + consumed
            epoch, index = self._start[0] + total // self.epoch_length, total % self.epoch_length
        return {"epoch": epoch, "index": index, "seed": self.seed, "num_samples": self.n,
                "world_size": self.world_size, "shuffle": self.shuffle}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved position; the data (num_samples), seed and shuffle must match."""
        if state["num_samples"] != self.n or state["seed"] != self.seed or state.get("shuffle", True) != self.shuffle:
            raise ValueError(f"data position was saved for num_samples={state['num_samples']}, seed={state['seed']}, "
                             f"shuffle={state.get('shuffle', True)}; this run has num_samples={self.n}, "
                             f"seed={self.seed}, shuffle={self.shuffle}: the order would differ")
        epoch, index = int(state["epoch"]), int(state["index"])
        if state.get("world_size", self.world_size) != self.world_size:
            # resharding: keep the global position, rounded down to a multiple of the new world size
            index -= index % self.world_size
        elif index % self.world_size:
            raise ValueError(f"data position index {index} is not a multiple of world_size {self.world_size}")
        if index >= self.epoch_length:
            epoch, index = epoch + 1, 0
        self.epoch, self.index = epoch, index
        self._start = (epoch, index)
