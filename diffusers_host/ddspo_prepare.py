"""`ddspo-prepare`: DDSPO training data from a prompt list (seed 003 §3.3, app. G, "Efficient DDSPO").

For each prompt c: the winner x0_w is the reference model's image for c; the degraded prompt c⁻
comes from the record (`neg_prompt` in a JSONL prompts file) or from the rewriter the caller passes
(one of `trainer.ddspo.REWRITERS`, named in the settings; default: drop 40-70% of the words); the loser x0_l is the reference
model's image for c⁻ from the same initial noise (`--losers generate`), or none at all
(`--losers none`, the efficient variant: training pairs c with another prompt's winner).
Sampling as in the paper: DDIM, CFG (7.5 for SD1.x, 5.0 for SDXL), 25 steps.

The output folder is the format of core/ddspo_format.py (the trainer reads it: trainer/data/ddspo_dataset.py).
Resumable: ids already in the manifest (and whose latents file exists) are skipped; each item's
noise seed is derived from (seed, id), so an interrupted + resumed run equals an uninterrupted one.
"""
from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

from ..core.atomic import atomic_path, save_item
from ..core.conditioning import vae_decode
from ..core.ddspo_format import (DTYPES, MANIFEST_NAME, PARTS_DIR, PrepareConfig, check_config, item_seed,
                                 latents_relpath, read_manifest)
from ..core.jsonl import write_jsonl
from ..core.prompts import PromptRecord, read_prompts_file
from ..core.summary import DataSummary
from ..families.loading import ModelBundle, bundle_from_pipeline

# c⁻ for prompts without a neg_prompt: rewriter(prompts, seeds) -> degraded prompts (a trainer.ddspo.PromptRewriter)
Rewriter = Callable[[Sequence[str], Sequence[int]], list]


def _resolve_size(model, cfg: PrepareConfig) -> tuple[int, int]:
    """(height, width): the config's, else the model's native size (UNet sample size x pixels per latent)."""
    scale = getattr(model, "vae_scale_factor", None) or getattr(model, "latent_scale", 8)
    default = int(model.unet.config.sample_size) * scale
    return cfg.height or default, cfg.width or default


def _generate(bundle, prompts: list[str], seeds: list[int], cfg: PrepareConfig, size: tuple[int, int],
              guidance: float) -> torch.Tensor:
    """Reference-model samples as scaled latents [B, C, h, w]: DDIM + CFG (empty negative prompt) through
    the project's sampler (`diffusers_host.generate.sample`, the loop of the diffusers pipelines)."""
    from .generate import sample

    res = sample(bundle, prompts, seeds, "cfg", cfg_scale=guidance, steps=cfg.steps, scheduler="ddim",
                 height=size[0], width=size[1], decode=False)
    return res.latents.float().cpu()


def prepare(model, records: Iterable[PromptRecord], out_dir: str | os.PathLike, cfg: PrepareConfig,
            batch_size: int = 1, limit: int | None = None, save_images: bool = False,
            summary: DataSummary | None = None, verbose: bool = True, rewriter: Rewriter | None = None) -> dict:
    """Generate the DDSPO data for `records` into `out_dir` (module docstring); resumable.

    model: the reference model (left unchanged): a `families.loading.ModelBundle` (`load_reference`: any
      family `load_model` reads, the digits world included) or a diffusers StableDiffusion(XL)Pipeline.
    limit: stop after this many NEW items (a partial run; rerun to continue).
    rewriter: c⁻ of the records without a neg_prompt, the one `cfg.rewriter` names (e.g.
    `trainer.ddspo.build_rewriter(cfg.rewriter, cfg.min_frac, cfg.max_frac, cfg.rewriter_path)`);
    None: every record must carry its neg_prompt.
    Returns {"done": finished this run, "skipped_done": already there, "total": in the manifest}.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    check_config(out, cfg)
    done = {e["id"] for e in read_manifest(out)}
    bundle = model if isinstance(model, ModelBundle) else bundle_from_pipeline(model)
    size = _resolve_size(bundle, cfg)
    guidance = cfg.cfg if cfg.cfg is not None else bundle.family_spec.default_cfg
    dtype = DTYPES[cfg.store_dtype]
    stats = {"done": 0, "skipped_done": 0}
    pending: list[PromptRecord] = []
    t0 = time.time()

    def flush():
        seeds = [item_seed(cfg.seed, r.id) for r in pending]
        negs = [r.neg_prompt for r in pending]
        need = [i for i, n in enumerate(negs) if n is None]
        if need and rewriter is None:
            raise ValueError(f"ddspo-prepare: prompt {pending[need[0]].id!r} has no neg_prompt and no rewriter was given")
        if need:
            rewritten = rewriter([pending[i].prompt for i in need], [seeds[i] for i in need])
            for i, n in zip(need, rewritten):
                negs[i] = n
        lat_w = _generate(bundle, [r.prompt for r in pending], seeds, cfg, size, guidance)  # [B, C, h, w]
        lat_l = _generate(bundle, negs, seeds, cfg, size, guidance) if cfg.losers == "generate" else None
        rows = []
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
            rows.append({"id": r.id, "prompt": r.prompt, "neg_prompt": negs[i], "seed": seeds[i], "files": files})
        part = out / PARTS_DIR / f"part-{time.time_ns():020d}-{os.getpid()}.jsonl"
        write_jsonl(part, rows)  # the chunk counts as done only from here
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
    write_jsonl(out / MANIFEST_NAME, entries)
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


def load_reference(path: str, dtype: torch.dtype = torch.float32, device: str = "cpu", **load_kwargs):
    """The reference model as a `families.loading.ModelBundle`: a diffusers folder, a single-file checkpoint,
    or a plug-in family's folder (the digits world), through `load_model` (nothing is downloaded).
    load_kwargs: tokenizer, vae, prediction_type (`load_model`)."""
    from ..families.loading import load_model

    return load_model(path, dtype=dtype, device=device, **load_kwargs)
