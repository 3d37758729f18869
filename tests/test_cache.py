"""LatentCache: encode once, content-addressed files, stale detection, variants, skips (trainer/data/cache.py)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from npo_suite.core.cond import Cond
from npo_suite.trainer.data.cache import LatentCache, fingerprint_modules
from npo_suite.trainer.data.dataset import PairDataset, PromptDataset, ResumableSampler, collate_pairs, collate_prompts
from npo_suite.trainer.data.pairs import JsonlPairs
from npo_suite.core.prompts import PromptRecord
from npo_suite.core.summary import DataSummary
from npo_suite.trainer.data.records import PairRecord
from npo_suite.trainer.data.transforms import ImageTransform


def save_png(path, seed, size=(40, 48)):
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(arr).save(path, format="PNG")
    return path


class CountingEncoder:
    """Deterministic stand-in for a backend: latents = 8x average-pooled pixels, cond from prompt text."""

    def __init__(self, sdxl: bool = False):
        self.image_calls = self.prompt_calls = self.images = self.prompts = 0
        self.sdxl = sdxl

    def encode_images(self, pixels):
        self.image_calls += 1
        self.images += pixels.shape[0]
        lat = torch.nn.functional.avg_pool2d(pixels, 8)  # [B, 3, H/8, W/8]
        return torch.cat([lat, lat.mean(1, keepdim=True)], 1)  # [B, 4, h, w]

    def encode_prompts(self, prompts):
        self.prompt_calls += 1
        self.prompts += len(prompts)
        hidden = torch.stack([torch.full((5, 6), float(len(p))) + torch.arange(6.0) for p in prompts])  # [B, 5, 6]
        if not self.sdxl:
            return Cond(hidden)
        return Cond(hidden, {"text_embeds": hidden[:, 0], "time_ids": torch.zeros(len(prompts), 6)})


def make_pairs(root, n=4):
    recs = []
    for i in range(n):
        w = save_png(root / f"w{i}.png", 10 + i, size=(48, 40))
        lo = save_png(root / f"l{i}.png", 50 + i, size=(48, 40))
        recs.append(PairRecord(f"r{i}", f"prompt number {i}", w, lo))
    return recs


def test_cache_hit_skips_encoders(tmp_path):
    recs = make_pairs(tmp_path / "img")
    enc = CountingEncoder()
    cache = LatentCache(tmp_path / "cache", "m0", enc.encode_images, enc.encode_prompts, ImageTransform(32))
    first = [cache.get_pair(r) for r in recs]
    assert (enc.image_calls, enc.prompt_calls) == (4, 4) and cache.misses == 4
    assert first[0].latents_w.shape == (1, 4, 4, 4) and first[0].cond.hidden.shape == (1, 5, 6)
    # a fresh cache object on the same folder (the next epoch / the next run): no encoder call
    enc2 = CountingEncoder()
    cache2 = LatentCache(tmp_path / "cache", "m0", enc2.encode_images, enc2.encode_prompts, ImageTransform(32))
    again = [cache2.get_pair(r) for r in recs]
    assert (enc2.image_calls, enc2.prompt_calls) == (0, 0) and cache2.hits == 4
    for a, b in zip(first, again):
        assert torch.equal(a.latents_w, b.latents_w) and torch.equal(a.latents_l, b.latents_l)
        assert torch.equal(a.cond.hidden, b.cond.hidden)
    assert not torch.equal(first[0].latents_w, first[0].latents_l)  # winner and loser kept apart
    files = sorted((tmp_path / "cache" / "m0" / "32_center").rglob("*"))
    assert len([f for f in files if f.suffix == ".safetensors"]) == 4
    assert not [f for f in files if f.name.startswith(".tmp-")]  # atomic writes leave no temp files
    # another model hash or resolution is another key: encodes again
    enc3 = CountingEncoder()
    LatentCache(tmp_path / "cache", "m1", enc3.encode_images, enc3.encode_prompts, ImageTransform(32)).get_pair(recs[0])
    LatentCache(tmp_path / "cache", "m0", enc3.encode_images, enc3.encode_prompts, ImageTransform(16)).get_pair(recs[0])
    assert enc3.image_calls == 2


def test_fill_batches_counts_corrupt_and_is_idempotent(tmp_path):
    recs = make_pairs(tmp_path / "img", 5)
    (tmp_path / "img" / "l2.png").write_bytes(b"definitely not a png")
    enc = CountingEncoder()
    cache = LatentCache(tmp_path / "cache", "m0", enc.encode_images, enc.encode_prompts, ImageTransform(32))
    summary = DataSummary("fill")
    kept = cache.fill(recs, batch_size=3, summary=summary, verbose=False)
    assert [r.id for r in kept] == ["r0", "r1", "r3", "r4"]
    assert summary.kept == 4 and dict(summary.skipped) == {"corrupt_image": 1}
    assert "l2.png" in summary.examples["corrupt_image"]
    assert enc.image_calls == 2 and enc.images == 8  # two batches (2 good of 3, then 2): winners + losers
    calls = (enc.image_calls, enc.prompt_calls)
    assert [r.id for r in cache.fill(recs, batch_size=3, verbose=False)] == ["r0", "r1", "r3", "r4"]
    assert (enc.image_calls, enc.prompt_calls) == calls  # all cached: nothing encoded


def test_stale_entry_is_recomputed(tmp_path):
    recs = make_pairs(tmp_path / "img", 1)
    enc = CountingEncoder()
    cache = LatentCache(tmp_path / "cache", "m0", enc.encode_images, enc.encode_prompts, ImageTransform(32))
    a = cache.get_pair(recs[0])
    edited = PairRecord("r0", "a longer, edited prompt", recs[0].chosen, recs[0].rejected)
    b = cache.get_pair(edited)
    assert enc.prompt_calls == 2 and not torch.equal(a.cond.hidden, b.cond.hidden)
    save_png(recs[0].chosen, 999, size=(48, 40))  # image replaced in place (size/mtime change)
    import os
    os.utime(recs[0].chosen, ns=(1, 1))
    c = cache.get_pair(edited)
    assert enc.image_calls == 3 and not torch.equal(b.latents_w, c.latents_w)


def test_random_crop_cached_per_variant_and_epoch(tmp_path):
    recs = make_pairs(tmp_path / "img", 2)
    enc = CountingEncoder()
    t = ImageTransform(32, crop="random", seed=1, variants=3)
    cache = LatentCache(tmp_path / "cache", "m0", enc.encode_images, enc.encode_prompts, t)
    ds = PairDataset(recs, cache)
    by_epoch = [ds[(0, e)]["latents_w"] for e in range(4)]
    assert enc.image_calls == 3  # epochs 0, 1, 2 are 3 variants; epoch 3 reuses variant 0
    assert torch.equal(by_epoch[3], by_epoch[0])
    assert len({tuple(x.flatten().tolist()) for x in by_epoch[:3]}) > 1
    assert cache.item_path("pair", "r0", 1).name.endswith("_v1.safetensors")
    assert "32_random_s1n3" in str(cache.item_path("pair", "r0", 1))
    assert len(cache.fill(recs, verbose=False)) == 2
    assert enc.image_calls == 6  # fill: one batch per variant, holding only r1 (r0 was cached)
    assert all(cache.contains(r, v) for r in recs for v in range(3))


def test_sdxl_time_ids_are_per_sample_size_conditioning(tmp_path):
    w = save_png(tmp_path / "w.png", 1, size=(80, 40))  # 80 wide, 40 high
    lo = save_png(tmp_path / "l.png", 2, size=(80, 40))
    enc = CountingEncoder(sdxl=True)
    cache = LatentCache(tmp_path / "cache", "xl", enc.encode_images, enc.encode_prompts, ImageTransform(32))
    p = cache.get_pair(PairRecord("x", "a cat", w, lo))
    assert p.cond.added["time_ids"].tolist() == [[40, 80, 0, 16, 32, 32]]
    assert p.cond.added["text_embeds"].shape == (1, 6)
    q = cache.get_prompt(PromptRecord("y", "a cat", w, "cat"))
    assert q.cond.added["time_ids"].tolist() == [[40, 80, 0, 16, 32, 32]]
    assert q.neg_cond.added["time_ids"].tolist() == [[40, 80, 0, 16, 32, 32]]
    r = cache.get_prompt(PromptRecord("z", "prompt only"))
    assert r.latents is None and r.neg_cond is None and r.cond.added["time_ids"].eq(0).all()


def test_prompt_dataset_and_no_dir_mode(tmp_path):
    img = save_png(tmp_path / "a.png", 3, size=(32, 32))
    recs = [PromptRecord("a", "with image", img, "image"), PromptRecord("b", "plain", None, "pl")]
    enc = CountingEncoder()
    cache = LatentCache(None, "m0", enc.encode_images, enc.encode_prompts, ImageTransform(16), store_dtype=torch.float16)
    ds = PromptDataset(recs, cache)
    ds[0], ds[0]
    assert enc.image_calls == 2  # cache_dir=None: nothing stored, encodes every time
    batch = collate_prompts([ds[1]], latent_shape=(4, 2, 2))
    assert batch.latents is None and batch.neg_cond.hidden.shape == (1, 5, 6)
    with pytest.raises(ValueError, match="an image"):
        collate_prompts([ds[0], ds[1]], latent_shape=(4, 2, 2))
    half = LatentCache(tmp_path / "c", "m0", enc.encode_images, enc.encode_prompts, ImageTransform(16),
                       store_dtype=torch.float16)
    miss, hit = half.get_prompt(recs[0]), half.get_prompt(recs[0])
    assert half.misses == 1 and half.hits == 1
    assert hit.latents.dtype == torch.float32 and hit.latents.shape == (1, 4, 2, 2)
    assert torch.equal(miss.latents, hit.latents) and torch.equal(miss.neg_cond.hidden, hit.neg_cond.hidden)
    assert torch.equal(hit.latents, ds[0]["latents"].half().float())  # stored as float16
    from safetensors import safe_open
    with safe_open(str(half.item_path("prompt", "a")), framework="pt") as f:
        assert f.get_tensor("latents").dtype == torch.float16 and f.get_tensor("size_w").dtype == torch.int64
    with pytest.raises(ValueError, match="model_hash"):
        LatentCache(tmp_path, "../x", enc.encode_images, enc.encode_prompts)


def test_ddspo_loser_images_from_jsonl_and_from_another_prompt(tmp_path):
    """A prompts JSONL `loser_image` (DDSPO's generated loser) reaches PromptBatch.latents_l; without it
    the batch has none; `other_loser_seed` draws another record's image instead (never the own)."""
    from npo_suite.trainer.data.prompts import PromptsFile

    for k in range(3):
        save_png(tmp_path / f"w{k}.png", 10 + k, size=(32, 32))
        save_png(tmp_path / f"l{k}.png", 20 + k, size=(32, 32))
    rows = [{"id": f"r{k}", "prompt": f"a red cat {k}", "neg_prompt": "a cat", "image": f"w{k}.png",
             "loser_image": f"l{k}.png"} for k in range(3)]
    rows += [{"id": "bad", "prompt": "x", "loser_image": "l0.png"}, {"id": "gone", "prompt": "y", "image": "w0.png",
                                                                       "loser_image": "nope.png"}]
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    src = PromptsFile(tmp_path / "p.jsonl", verbose=False)
    recs = list(src)
    assert [r.id for r in recs] == ["r0", "r1", "r2"] and recs[0].loser_image == tmp_path / "l0.png"
    assert src.summary.skipped["bad_row"] == 1 and src.summary.skipped["missing_file"] == 1
    enc = CountingEncoder()
    cache = LatentCache(tmp_path / "cache", "m0", enc.encode_images, enc.encode_prompts, ImageTransform(16))
    kept = cache.fill(recs, verbose=False)
    ds = PromptDataset(kept, cache)
    batch = collate_prompts([ds[i] for i in range(3)])
    own = torch.cat([cache.get_prompt(r).latents for r in kept])
    loser = torch.stack([enc.encode_images(ImageTransform(16)(Image.open(tmp_path / f"l{k}.png"), f"r{k}", 0)[0][None])[0]
                         for k in range(3)])
    assert torch.allclose(batch.latents, own) and torch.allclose(batch.latents_l, loser)
    # records without a loser image: no latents_l (the method then refuses ddspo_loser='generated')
    plain = [PromptRecord(r.id + "p", r.prompt, r.image, r.neg_prompt) for r in kept]
    assert collate_prompts([PromptDataset(plain, cache)[i] for i in range(3)]).latents_l is None
    # ddspo_loser='other': another prompt's winner, a pure function of (seed, epoch, index)
    other = PromptDataset(plain, cache, other_loser_seed=7)
    for epoch in range(3):
        b = collate_prompts([other[(i, epoch)] for i in range(3)])
        for i in range(3):
            assert not torch.equal(b.latents_l[i], b.latents[i])
            assert any(torch.equal(b.latents_l[i], b.latents[j]) for j in range(3))
        assert torch.equal(b.latents_l, collate_prompts([other[(i, epoch)] for i in range(3)]).latents_l)
    with pytest.raises(ValueError, match="at least 2 records"):
        PromptDataset(plain[:1], cache, other_loser_seed=0)
    with pytest.raises(ValueError, match="has no image"):
        PromptDataset([plain[0], PromptRecord("t", "text only")], cache, other_loser_seed=0)[0]


def test_pair_dataset_loader_with_sampler(tmp_path):
    d = tmp_path / "ds"
    recs = make_pairs(d, 4)
    (d / "pairs.jsonl").write_text("\n".join(
        json.dumps({"id": r.id, "prompt": r.prompt, "chosen": r.chosen.name, "rejected": r.rejected.name}) for r in recs))
    enc = CountingEncoder()
    cache = LatentCache(tmp_path / "cache", "m0", enc.encode_images, enc.encode_prompts, ImageTransform(32))
    kept = cache.fill(JsonlPairs(d / "pairs.jsonl", verbose=False), batch_size=4, verbose=False)
    ds = PairDataset(kept, cache)
    loader = torch.utils.data.DataLoader(ds, batch_size=2, sampler=ResumableSampler(len(ds), seed=0, batch_size=2),
                                         collate_fn=collate_pairs)
    calls = enc.image_calls
    batches = list(loader)
    assert enc.image_calls == calls  # training epochs read the cache only
    assert len(batches) == 2 and batches[0].latents_w.shape == (2, 4, 4, 4) and len(batches[0].prompts) == 2
    assert sorted(p for b in batches for p in b.prompts) == sorted(r.prompt for r in recs)


def test_with_diffusers_backend(tmp_path, sd15_dir):
    from diffusers import StableDiffusionPipeline

    from npo_suite.trainer.backends.diffusers import DiffusersBackend

    # our own copy (the backend adds a LoRA adapter to the UNet): never the shared session pipeline
    pipe = StableDiffusionPipeline.from_pretrained(sd15_dir, safety_checker=None, requires_safety_checker=False)
    backend = DiffusersBackend.from_pipeline(pipe)
    mh = fingerprint_modules(pipe.vae, pipe.text_encoder)
    assert len(mh) == 16 and mh == fingerprint_modules(pipe.vae, pipe.text_encoder)
    assert mh != fingerprint_modules(pipe.text_encoder, pipe.vae)
    recs = make_pairs(tmp_path / "img", 2)
    cache = LatentCache.from_backend(tmp_path / "cache", mh, backend, ImageTransform(32))
    a = cache.get_pair(recs[0])
    assert a.latents_w.shape == (1, 4, 16, 16)  # the tiny VAE downsamples by 2
    assert torch.allclose(a.latents_w, backend.encode_images(cache._prepare(recs[0], 0)["px_w"][None]), atol=1e-5)
    assert torch.allclose(a.cond.hidden, backend.encode_prompts([recs[0].prompt]).hidden, atol=1e-5)


def test_fill_encodes_in_bounded_chunks_with_the_same_results(tmp_path, sd15_dir):
    """Filling the cache VAE-encoded the winners and losers of a whole fill batch in one call (16
    images at 512 px: the run's memory peak). The encoder sees at most `encode_batch` images per
    call, every chunk's latents leave the device at once, and the cached values equal one batch's."""
    from diffusers import StableDiffusionPipeline

    from npo_suite.trainer.backends.diffusers import DiffusersBackend

    pipe = StableDiffusionPipeline.from_pretrained(sd15_dir, safety_checker=None, requires_safety_checker=False)
    backend = DiffusersBackend.from_pipeline(pipe)
    recs = make_pairs(tmp_path / "img", 6)
    seen: list[int] = []

    def encode(px):
        seen.append(px.shape[0])
        return backend.encode_images(px)

    out = {}
    for name, chunk in (("chunked", 3), ("one_batch", 64)):
        cache = LatentCache(tmp_path / name, "m0", encode, backend.encode_prompts, ImageTransform(32), encode_batch=chunk)
        assert cache.fill(recs, batch_size=8, verbose=False) == recs
        out[name] = [cache.get_pair(r) for r in recs]
        if name == "chunked":
            assert seen and max(seen) <= 3 and sum(seen) == 12, seen
            seen.clear()
    assert seen == [12]  # the unbounded cache: every image of the fill batch in one call
    for a, b in zip(out["chunked"], out["one_batch"]):
        assert torch.equal(a.latents_w, b.latents_w) and torch.equal(a.latents_l, b.latents_l)
        assert torch.isfinite(a.latents_w).all() and a.latents_w.std() > 0
    assert LatentCache(None, "m0", encode, backend.encode_prompts).encode_batch == 4  # the default
