"""`ddspo-prepare`: DDSPO training data from a prompt list (seed 003 §3.3, app. G, "Efficient DDSPO").

For each prompt c: the winner x0_w is the reference model's image for c; the degraded prompt c⁻
comes from the record (`neg_prompt` in a JSONL prompts file) or from a rewriter of
`trainer.ddspo.REWRITERS` (default: drop 40-70% of the words); the loser x0_l is the reference
model's image for c⁻ from the same initial noise (`--losers generate`), or none at all
(`--losers none`, the efficient variant: training pairs c with another prompt's winner).
Sampling as in the paper: DDIM, CFG (7.5 for SD1.x, 5.0 for SDXL), 25 steps.

Output folder:
    ddspo_config.json               generation settings (a rerun with other settings is refused)
    latents/<h[:2]>/<h>.safetensors latents_w [C, h, w] (+ latents_l), h = sha1(id)
    manifest.d/part-*.jsonl         one file per finished chunk, written atomically
    manifest.jsonl                  all entries, written atomically when a run completes
Entry: {"id", "prompt", "neg_prompt", "seed", "files": {"latents": ..., "image_w"?, "image_l"?}}.
Resumable: ids already in the manifest (and whose latents file exists) are skipped; each item's
noise seed is derived from (seed, id), so an interrupted + resumed run equals an uninterrupted one.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

import torch

from ...core.conditioning import vae_decode
from ...families.loading import bundle_from_pipeline
from ...core.atomic import atomic_path, write_text
from .cache import LatentCache, save_item
from .records import DataSummary, PromptRecord

CONFIG_NAME, MANIFEST_NAME, PARTS_DIR = "ddspo_config.json", "manifest.jsonl", "manifest.d"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class PrepareConfig:
    """Settings that determine the generated data (stored in ddspo_config.json)."""

    model: str
    losers: str = "generate"  # "generate" | "none" (efficient variant)
    rewriter: str = "drop_words"
    min_frac: float = 0.4
    max_frac: float = 0.7
    rewriter_path: str | None = None
    steps: int = 25
    cfg: float | None = None  # None: 7.5 (SD1.x) / 5.0 (SDXL), the paper's settings
    height: int | None = None  # None: the model's default size
    width: int | None = None
    seed: int = 0
    store_dtype: str = "float16"

    def __post_init__(self):
        if self.losers not in ("generate", "none"):
            raise ValueError(f"losers must be 'generate' or 'none', got {self.losers!r}")
        if self.store_dtype not in DTYPES:
            raise ValueError(f"store_dtype must be one of {sorted(DTYPES)}, got {self.store_dtype!r}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")


def item_seed(seed: int, record_id: str) -> int:
    """The noise seed of one item: a pure function of (run seed, id), independent of batching."""
    return int.from_bytes(hashlib.sha256(f"{seed}\0{record_id}".encode("utf-8")).digest()[:7], "little")


def other_index(seed: int, epoch: int, i: int, n: int) -> int:
    """Another item's index j != i of n >= 2, a pure function of (seed, epoch, i): DDSPO's
    efficient variant pairs prompt i with another prompt's image, a new one each epoch."""
    return (i + 1 + item_seed(seed, f"{epoch}:{i}") % (n - 1)) % n


def latents_relpath(record_id: str) -> str:
    h = hashlib.sha1(record_id.encode("utf-8")).hexdigest()
    return f"latents/{h[:2]}/{h}.safetensors"




def read_manifest(out_dir: str | os.PathLike) -> list[dict]:
    """Finished entries (manifest.jsonl, then the parts), de-duplicated by id, in finishing order;
    entries whose latents file is gone are dropped (they will be redone)."""
    out = Path(out_dir)
    files = [out / MANIFEST_NAME] if (out / MANIFEST_NAME).is_file() else []
    files += sorted((out / PARTS_DIR).glob("part-*.jsonl")) if (out / PARTS_DIR).is_dir() else []
    entries: dict[str, dict] = {}
    for f in files:
        for n, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                e = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{f}:{n}: corrupt manifest line ({err})") from None
            if (out / e["files"]["latents"]).is_file():
                entries.setdefault(e["id"], e)
    return list(entries.values())


def check_config(out: Path, cfg: PrepareConfig) -> None:
    """Write `cfg` as the folder's ddspo_config.json, or refuse a folder generated with other settings."""
    path = out / CONFIG_NAME
    want = asdict(cfg)
    if path.is_file():
        have = json.loads(path.read_text(encoding="utf-8"))
        diff = {k: (have.get(k), v) for k, v in want.items() if have.get(k) != v}
        if diff:
            raise ValueError(f"{path}: this folder was generated with other settings {diff} "
                             f"(saved, requested); use another --out or the same settings")
    else:
        write_text(path, json.dumps(want, indent=2) + "\n")


def _resolve_size(pipe, cfg: PrepareConfig) -> tuple[int, int]:
    scale = getattr(pipe, "vae_scale_factor", 8)
    default = int(pipe.unet.config.sample_size) * scale
    return cfg.height or default, cfg.width or default


def _generate(bundle, prompts: list[str], seeds: list[int], cfg: PrepareConfig, size: tuple[int, int],
              guidance: float) -> torch.Tensor:
    """Reference-model samples as scaled latents [B, C, h, w]: DDIM + CFG (empty negative prompt) through
    the project's sampler (`diffusers_host.generate.sample`, the loop of the diffusers pipelines)."""
    from ...diffusers_host.generate import sample

    res = sample(bundle, prompts, seeds, "cfg", cfg_scale=guidance, steps=cfg.steps, scheduler="ddim",
                 height=size[0], width=size[1], decode=False)
    return res.latents.float().cpu()


def prepare(pipe, records: Iterable[PromptRecord], out_dir: str | os.PathLike, cfg: PrepareConfig,
            batch_size: int = 1, limit: int | None = None, save_images: bool = False,
            summary: DataSummary | None = None, verbose: bool = True) -> dict:
    """Generate the DDSPO data for `records` into `out_dir` (module docstring); resumable.

    pipe: a diffusers StableDiffusion(XL)Pipeline (the reference model; left unchanged).
    limit: stop after this many NEW items (a partial run; rerun to continue).
    Returns {"done": finished this run, "skipped_done": already there, "total": in the manifest}.
    """
    from ..ddspo import build_rewriter

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    check_config(out, cfg)
    done = {e["id"] for e in read_manifest(out)}
    rewriter = build_rewriter(cfg.rewriter, cfg.min_frac, cfg.max_frac, cfg.rewriter_path)
    bundle = bundle_from_pipeline(pipe)
    size = _resolve_size(pipe, cfg)
    guidance = cfg.cfg if cfg.cfg is not None else bundle.family_spec.default_cfg
    dtype = DTYPES[cfg.store_dtype]
    stats = {"done": 0, "skipped_done": 0}
    pending: list[PromptRecord] = []
    t0 = time.time()

    def flush():
        seeds = [item_seed(cfg.seed, r.id) for r in pending]
        negs = [r.neg_prompt for r in pending]
        need = [i for i, n in enumerate(negs) if n is None]
        if need:
            rewritten = rewriter([pending[i].prompt for i in need], [seeds[i] for i in need])
            for i, n in zip(need, rewritten):
                negs[i] = n
        lat_w = _generate(bundle, [r.prompt for r in pending], seeds, cfg, size, guidance)  # [B, C, h, w]
        lat_l = _generate(bundle, negs, seeds, cfg, size, guidance) if cfg.losers == "generate" else None
        lines = []
        for i, r in enumerate(pending):
            rel = latents_relpath(r.id)
            tensors = {"latents_w": lat_w[i].to(dtype)}
            if lat_l is not None:
                tensors["latents_l"] = lat_l[i].to(dtype)
            meta = {"id": r.id, "prompt": r.prompt, "neg_prompt": negs[i], "seed": str(seeds[i])}
            save_item(out / rel, tensors, meta)
            files = {"latents": rel}
            if save_images:
                files.update(_save_images(bundle.vae, out, r.id, lat_w[i], None if lat_l is None else lat_l[i]))
            lines.append(json.dumps({"id": r.id, "prompt": r.prompt, "neg_prompt": negs[i], "seed": seeds[i],
                                     "files": files}, ensure_ascii=False))
        part = out / PARTS_DIR / f"part-{time.time_ns():020d}-{os.getpid()}.jsonl"
        write_text(part, "\n".join(lines) + "\n")  # the chunk counts as done only from here
        stats["done"] += len(pending)
        done.update(r.id for r in pending)
        pending.clear()
        if verbose:
            print(f"ddspo-prepare: {stats['done']} new items ({time.time() - t0:.1f}s)", flush=True)

    for rec in records:
        if rec.id in done:
            stats["skipped_done"] += 1
            continue
        if limit is not None and stats["done"] + len(pending) >= limit:
            break
        pending.append(rec)
        if len(pending) >= batch_size:
            flush()
    else:
        if pending:
            flush()
        _consolidate(out)
        stats["total"] = len(read_manifest(out))
        return stats
    if pending:
        flush()
    stats["total"] = len(read_manifest(out))
    return stats


def _consolidate(out: Path) -> None:
    """All entries into manifest.jsonl (atomic), then remove the parts (a crash in between only
    leaves duplicates, which read_manifest drops)."""
    entries = read_manifest(out)
    write_text(out / MANIFEST_NAME, "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in entries))
    parts = out / PARTS_DIR
    if parts.is_dir():
        for p in parts.glob("part-*.jsonl"):
            p.unlink()


@torch.no_grad()
def _save_images(vae, out: Path, record_id: str, lat_w: torch.Tensor, lat_l: torch.Tensor | None) -> dict:
    from PIL import Image

    files = {}
    h = hashlib.sha1(record_id.encode("utf-8")).hexdigest()
    for name, lat in (("image_w", lat_w), ("image_l", lat_l)):
        if lat is None:
            continue
        px = vae_decode(vae, lat[None])[0].clamp(-1, 1)  # [3, H, W]
        arr = ((px + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
        rel = f"images/{h[:2]}/{h}_{name[-1]}.png"
        with atomic_path(out / rel) as tmp:
            Image.fromarray(arr).save(tmp)
        files[name] = rel
    return files


# ---------------------------------------------------------------------------------------------
# Reading the prepared data for training


class DdspoDataset(torch.utils.data.Dataset):
    """Prepared DDSPO data -> items for `collate_prompts` (PromptBatch with latents, latents_l, neg_cond).

    loser="generated": x0_l is the image generated from c⁻ (needs --losers generate);
    loser="other": x0_l is another prompt's winner (efficient variant "Random-positive"), drawn
    deterministically from (seed, epoch, index) (`dataset.other_index`);
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


def is_prepared(path: str | os.PathLike) -> bool:
    """True for a `ddspo-prepare` output folder (it holds ddspo_config.json)."""
    return (Path(path) / CONFIG_NAME).is_file()


def load_pipeline(path: str, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """A diffusers SD1.x / SDXL pipeline from a local diffusers folder (nothing is downloaded)."""
    p = Path(path)
    if not (p / "model_index.json").is_file():
        raise FileNotFoundError(f"{path}: not a diffusers folder (no model_index.json); convert a single-file "
                                f"checkpoint to a diffusers folder first")
    from diffusers import DiffusionPipeline

    index = json.loads((p / "model_index.json").read_text(encoding="utf-8"))
    kwargs = {"safety_checker": None, "requires_safety_checker": False} if "safety_checker" in index else {}
    pipe = DiffusionPipeline.from_pretrained(str(p), torch_dtype=dtype, local_files_only=True, **kwargs)
    return pipe.to(device)
