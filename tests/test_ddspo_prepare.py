"""`ddspo-prepare` on the tiny SD1.x model: resumable, deterministic, readable by DdspoDataset."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from npo_suite.core.cond import Cond
from npo_suite.trainer.config import TrainConfig
from npo_suite.trainer.data.cache import LatentCache
from npo_suite.trainer.data.dataset import ResumableSampler, collate_prompts
from npo_suite.core.ddspo_format import MANIFEST_NAME, PARTS_DIR, PrepareConfig, read_manifest
from npo_suite.diffusers_host import ddspo_prepare
from npo_suite.trainer.data.ddspo_dataset import DdspoDataset
from npo_suite.trainer.data.prompts import PromptsFile
from npo_suite.trainer.ddspo import build_rewriter


def prepare(*args, **kw):
    """ddspo_prepare.prepare with the default rewriter (drop_words 0.4-0.7), as the CLI builds it."""
    return ddspo_prepare.prepare(*args, rewriter=build_rewriter("drop_words"), **kw)

PROMPTS = ["a photo of a red cat", "a blue car in the house", "a thick green tree",
           "handwritten digit seven", "a neat painting of a dog"]


def write_prompts(tmp_path):
    p = tmp_path / "prompts.txt"
    p.write_text("\n".join(PROMPTS) + "\n")
    return p


def latents_by_id(out):
    return {e["id"]: load_file(str(out / e["files"]["latents"])) for e in read_manifest(out)}


@pytest.mark.slow
def test_prepare_resume_equals_uninterrupted(tmp_path, sd15):
    prompts = write_prompts(tmp_path)
    cfg = PrepareConfig(model="tiny-sd15", steps=2, seed=3)
    out = tmp_path / "run"
    s1 = prepare(sd15, PromptsFile(prompts, verbose=False), out, cfg, batch_size=2, limit=3, verbose=False)
    assert s1 == {"done": 3, "skipped_done": 0, "total": 3}
    assert not (out / MANIFEST_NAME).exists() and len(list((out / PARTS_DIR).glob("part-*.jsonl"))) == 2
    s2 = prepare(sd15, PromptsFile(prompts, verbose=False), out, cfg, batch_size=2, verbose=False)
    assert s2 == {"done": 2, "skipped_done": 3, "total": 5}  # nothing redone
    assert (out / MANIFEST_NAME).is_file() and not list((out / PARTS_DIR).glob("*.jsonl"))
    s3 = prepare(sd15, PromptsFile(prompts, verbose=False), out, cfg, verbose=False)
    assert s3 == {"done": 0, "skipped_done": 5, "total": 5}

    entries = read_manifest(out)
    assert [e["prompt"] for e in entries] == PROMPTS
    for e in entries:
        assert e["neg_prompt"] != e["prompt"] and set(e["neg_prompt"].split()) < set(e["prompt"].split())
    once = tmp_path / "once"
    prepare(sd15, PromptsFile(prompts, verbose=False), once, cfg, batch_size=1, verbose=False)
    a, b = latents_by_id(out), latents_by_id(once)
    assert a.keys() == b.keys() and len(a) == 5
    for k in a:  # interrupted + resumed == uninterrupted (float batching aside: same numerics up to fp16)
        assert a[k]["latents_w"].dtype == torch.float16 and a[k]["latents_w"].shape == (4, 8, 8)  # tiny model: 16 px, VAE factor 2
        for name in ("latents_w", "latents_l"):
            assert torch.allclose(a[k][name].float(), b[k][name].float(), atol=2e-2, rtol=1e-2)
        assert not torch.equal(a[k]["latents_w"], a[k]["latents_l"])  # c⁻ changes the image
    ws = torch.stack([v["latents_w"] for v in a.values()])
    assert ws.float().std(0).mean() > 0  # different prompts/seeds, different images

    with pytest.raises(ValueError, match="other settings"):
        prepare(sd15, PromptsFile(prompts, verbose=False), out, PrepareConfig(model="tiny-sd15", steps=3, seed=3))


def test_efficient_variant_and_dataset(tmp_path, sd15):
    p = tmp_path / "p.jsonl"
    p.write_text("\n".join(json.dumps({"id": f"k{i}", "prompt": t, **({"neg_prompt": "blurry"} if i == 0 else {})})
                           for i, t in enumerate(PROMPTS[:3])))
    out = tmp_path / "eff"
    prepare(sd15, PromptsFile(p, verbose=False), out, PrepareConfig(model="tiny", losers="none", steps=1),
            verbose=False)
    entries = read_manifest(out)
    assert entries[0]["neg_prompt"] == "blurry"  # the record's own c⁻ wins over the rewriter
    assert "latents_l" not in load_file(str(out / entries[0]["files"]["latents"]))

    calls = []

    def enc_prompts(prompts):
        calls.append(list(prompts))
        return Cond(torch.stack([torch.full((3, 4), float(len(q))) for q in prompts]))

    cache = LatentCache(tmp_path / "cache", "tiny", None, enc_prompts)
    with pytest.raises(ValueError, match="ddspo_loser 'other'"):
        DdspoDataset(out, cache)[0]
    assert DdspoDataset(out, cache, loser="none")[0]["latents_l"] is None  # ddspo_loser "same": no loser image
    cfg = TrainConfig(method="ddspo", ddspo_loser="other", seed=1)
    assert [DdspoDataset.for_config(out, cache, c).loser for c in
            (cfg, replace(cfg, ddspo_loser="generated"), replace(cfg, ddspo_loser="same"))] == ["other", "generated", "none"]
    ds = DdspoDataset.for_config(out, cache, cfg)
    sampler = ResumableSampler(len(ds), seed=0, batch_size=3)
    batch = collate_prompts([ds[k] for k in sampler])
    assert batch.latents.shape == batch.latents_l.shape == (3, 4, 8, 8)
    assert batch.neg_cond.hidden.shape == (3, 3, 4)
    for i in range(3):  # the loser is always another prompt's winner
        assert not torch.equal(batch.latents[i], batch.latents_l[i])
        assert any(torch.equal(batch.latents_l[i], batch.latents[j]) for j in range(3))
    n_calls = len(calls)
    collate_prompts([ds[k] for k in sampler])  # next epoch: text conditioning from the cache
    assert len(calls) == n_calls


def test_cli_limit_then_resume(tmp_path, sd15_dir, capsys):
    from npo_suite.cli import main

    prompts = write_prompts(tmp_path)
    out = tmp_path / "cli"
    argv = ["ddspo-prepare", "--model", str(sd15_dir), "--prompts", str(prompts), "--out", str(out),
            "--steps", "1", "--batch-size", "2", "--device", "cpu"]
    assert main(argv + ["--limit", "2"]) == 0
    assert "2 generated, 0 already done, 2 in" in capsys.readouterr().out
    assert main(argv) == 0
    assert "3 generated, 2 already done, 5 in" in capsys.readouterr().out
    cfg = json.loads((out / "ddspo_config.json").read_text())
    assert cfg["steps"] == 1 and cfg["losers"] == "generate"
    # a user error: one error line on stderr (after the prompts file's counts), exit status 2, no traceback
    assert main(["ddspo-prepare", "--model", str(tmp_path), "--prompts", str(prompts), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0] == "[prompts] kept 5, skipped 0" and len(err) == 2
    assert err[1].startswith("error: ") and "not a diffusers" in err[1]


def test_sampler_equals_the_diffusers_pipeline(sd15):
    """ddspo-prepare samples through the project's sampler (core.sampling via generate.sample); it must give
    exactly what the diffusers DDIM pipeline gives for the same noise, prompts and guidance."""
    from diffusers import DDIMScheduler

    from npo_suite.families.loading import bundle_from_pipeline
    from npo_suite.core.ddspo_format import PrepareConfig
    from npo_suite.diffusers_host.ddspo_prepare import _generate, _resolve_size

    cfg = PrepareConfig(model="x", steps=3, cfg=5.0)
    (h, w), f = _resolve_size(sd15, cfg), sd15.vae_scale_factor
    ours = _generate(bundle_from_pipeline(sd15), ["a cat", "a dog"], [1, 2], cfg, (h, w), 5.0)
    pipe = type(sd15)(**{**sd15.components, "scheduler": DDIMScheduler.from_config(sd15.scheduler.config)},
                      requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    noise = torch.stack([torch.randn(4, h // f, w // f, generator=torch.Generator().manual_seed(s)) for s in (1, 2)])
    ref = pipe(prompt=["a cat", "a dog"], height=h, width=w, num_inference_steps=3, guidance_scale=5.0, latents=noise,
               output_type="latent").images
    assert ours.shape == (2, 4, h // f, w // f) and torch.equal(ours, ref.float())


def test_train_stream_reads_a_prepared_folder(tmp_path, sd15):
    """`data_path` = a ddspo-prepare folder: the stream gives winners, generated losers and c⁻ (DdspoDataset)."""
    import sys
    from pathlib import Path

    from npo_suite.trainer.stream import build_batches

    sys.path.insert(0, str(Path(__file__).parent))
    from methods_fake_backend import FakeBackend

    out = tmp_path / "prep"
    prepare(sd15, PromptsFile(write_prompts(tmp_path), verbose=False), out, PrepareConfig(model="tiny", steps=1),
            verbose=False)
    lat = latents_by_id(out)
    be = FakeBackend()
    cfg = TrainConfig(method="ddspo", data_path=[str(out)], batch_size=2, seed=0)
    batch = next(build_batches(cfg, be, kind="prompts_with_winners"))
    assert batch.latents.shape == batch.latents_l.shape == (2, 4, 8, 8) and len(batch.neg_cond) == 2
    by_prompt = {e["prompt"]: lat[e["id"]] for e in read_manifest(out)}
    for i, p in enumerate(batch.prompts):  # the loser is this prompt's own generated loser
        assert torch.equal(batch.latents_l[i], by_prompt[p]["latents_l"].float())
    with pytest.raises(ValueError, match="only method ddspo"):
        build_batches(replace(cfg, method="tdft"), be, kind="images_or_prompts")
