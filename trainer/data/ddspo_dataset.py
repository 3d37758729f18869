"""Reading a `ddspo-prepare` folder (core/ddspo_format.py) for training: `DdspoDataset`."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from ...core.ddspo_format import other_index, read_manifest
from ...core.prompts import PromptRecord
from .cache import LatentCache


class DdspoDataset(torch.utils.data.Dataset):
    """Prepared DDSPO data -> items for `collate_prompts` (PromptBatch with latents, latents_l, neg_cond).

    loser="generated": x0_l is the image generated from c⁻ (needs --losers generate);
    loser="other": x0_l is another prompt's winner (efficient variant "Random-positive"), drawn
    deterministically from (seed, epoch, index) (`core.ddspo_format.other_index`);
    loser="none": no x0_l (the method's ddspo_loser="same" uses the winner).
    Text conditioning (c and c⁻) goes through `cache.get_prompt`, so it is encoded once. Keys: an
    index or (index, epoch) from ResumableSampler.
    """

    LOSERS = ("generated", "other", "none")

    def __init__(self, out_dir: str | os.PathLike, cache: LatentCache, loser: str = "generated", seed: int = 0):
        if loser not in self.LOSERS:
            raise ValueError(f"loser must be one of {self.LOSERS}, got {loser!r}")
        self.out, self.cache, self.loser, self.seed = Path(out_dir), cache, loser, seed
        self.entries = read_manifest(self.out)
        if not self.entries:
            raise ValueError(f"{self.out}: no prepared DDSPO items (run `python -m npo_suite ddspo-prepare` first)")
        if loser == "other" and len(self.entries) < 2:
            raise ValueError(f"{self.out}: loser='other' needs at least 2 items")

    @classmethod
    def for_config(cls, out_dir: str | os.PathLike, cache: LatentCache, cfg) -> "DdspoDataset":
        """The dataset for MethodConfig.ddspo_loser: generated -> "generated", other -> "other", same -> "none"."""
        loser = {"generated": "generated", "other": "other", "same": "none"}[cfg.ddspo_loser]
        return cls(out_dir, cache, loser=loser, seed=cfg.seed)

    def __len__(self) -> int:
        return len(self.entries)

    def _latents(self, i: int) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        return load_file(str(self.out / self.entries[i]["files"]["latents"]))

    def _loser(self, i: int, epoch: int, t: dict[str, torch.Tensor]) -> torch.Tensor | None:
        if self.loser == "none":
            return None
        if self.loser == "other":
            return self._latents(other_index(self.seed, epoch, i, len(self.entries)))["latents_w"]
        if "latents_l" not in t:
            raise ValueError(f"{self.out / self.entries[i]['files']['latents']}: no loser latents (prepared with "
                             f"--losers none): use ddspo_loser 'other' (another prompt's image)")
        return t["latents_l"]

    def __getitem__(self, key):
        i, epoch = (int(key[0]), int(key[1])) if isinstance(key, (tuple, list)) else (int(key), 0)
        e = self.entries[i]
        t = self._latents(i)
        lat_l = self._loser(i, epoch, t)
        c = self.cache.get_prompt(PromptRecord(e["id"], e["prompt"], None, e["neg_prompt"]))
        cond, neg = c.cond, c.neg_cond
        return {"id": e["id"], "prompt": e["prompt"], "cond": cond, "neg_cond": neg,
                "latents": t["latents_w"].float()[None],
                "latents_l": None if lat_l is None else lat_l.float()[None]}
