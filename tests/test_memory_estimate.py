"""`train --dry-run --json`: the run's device peak traced on fake tensors (trainer/memory_estimate.py).

- the JSON line's schema, from the CLI, on a tiny model folder and on a shipped config name;
- monotonic sanity: batch 2 >= batch 1, gradient checkpointing <= without, more images per VAE call
  (`cache_batch_size`, the one setting of the real fill) >= fewer;
- agreement with what a real step uses: the same trace on real tensors, measured by PyTorch's CPU
  allocator (profiler memory events, kernels' own buffers included), within 15% at tiny size
  (the full-size figure is in docs/BENCHMARKS.md);
- every preset fits the card its header states, cache fill included, with the CUDA context and
  allocator allowance of `Estimate.card_gib`, and its header's peak is the estimate's (SD1.5/SDXL and the
  flow transformers SD3.5-M and Flux.1-dev from their shipped configs);
- flow transformers (tiny SD3 / Flux folders): `--dry-run --json` estimates them; the text encoders the
  trainer releases after the cache fill leave the training step's count; the trace agrees with the
  allocator on real tensors as the UNet one does.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from flow_fixtures import build_flow_dirs  # noqa: E402

from npo_suite.trainer.config import load_config  # noqa: E402
from npo_suite.trainer.memory_estimate import (ALLOCATOR_SLACK, CONTEXT_GIB, measure_run, preset_model,  # noqa: E402
                                               stated_card_gib, trace_run)

TINY = {"resolution": 64, "batch_size": 1, "lora_rank": 4, "grad_accum": 2, "mixed_precision": "no"}
PRESETS = ["sd15_8gb", "sdxl_12gb", "datacenter_sd15", "tdft_sd15", "tdft_sdxl", "ddspo_sdxl", "sd35m_24gb",
           "flux_40gb", "sana_16gb"]


def tiny_cfg(model, **overrides):
    return load_config(overrides={"model": str(model), **TINY, **overrides})


def test_dry_run_json_schema(sd15_dir, tmp_path, capsys):
    from npo_suite.cli import main

    rc = main(["train", "--model", str(sd15_dir), "--method", "dpo", "--resolution", "64", "--lora-rank", "4",
               "--cache-dir", str(tmp_path / "cache"), "--dry-run", "--json"])
    assert rc == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    d = json.loads(lines[0])
    assert isinstance(d["peak_gib"], float) and d["peak_gib"] > 0
    assert set(d["phases"]) >= {"weights", "cache_fill", "train_step"}
    assert set(d["phases"]["train_step"]) == {"forward", "backward", "optimizer"}
    for ph in [d["phases"]["weights"], d["phases"]["cache_fill"], *d["phases"]["train_step"].values()]:
        assert set(ph) == {"start", "peak", "end"} and ph["start"] <= ph["peak"] and ph["end"] <= ph["peak"]
    peaks = [d["phases"]["cache_fill"]["peak"], *(v["peak"] for v in d["phases"]["train_step"].values())]
    assert d["peak_gib"] == pytest.approx(max(peaks), abs=1e-3)
    s = d["settings"]
    assert s["device"] == "cuda" and s["method"] == "dpo" and s["trainable_params"] > 0
    # with a cache_dir, `LatentCache.fill` encodes FILL_BATCH (8) pairs together, 4 images per VAE call
    assert (s["fill_records"], s["fill_images"], s["images_per_vae_call"], s["cache_batch_size"]) == (8, 16, 4, 4)
    assert s["cache_dir"] is True
    assert d["fake"] is True
    assert d["card_gib"] == pytest.approx(d["peak_gib"] * ALLOCATOR_SLACK + CONTEXT_GIB, abs=1e-2)
    assert d["allowance"] == {"cuda_context_gib": CONTEXT_GIB, "allocator_slack": ALLOCATOR_SLACK}
    assert not (tmp_path / "cache").exists()  # a dry run writes nothing
    # without one nothing is filled ahead: each pair is encoded alone when first read (`LatentCache._get`)
    assert main(["train", "--model", str(sd15_dir), "--method", "dpo", "--resolution", "64", "--lora-rank", "4",
                 "--dry-run", "--json"]) == 0
    s = json.loads(capsys.readouterr().out)["settings"]
    assert (s["cache_dir"], s["fill_records"], s["fill_images"], s["images_per_vae_call"]) == (False, 1, 2, 2)


def test_dry_run_text_counts_the_data(sd15_dir, tmp_path, capsys):
    """Without --json a few lines; a data set smaller than the fill chunk fills in one smaller batch."""
    from npo_suite.cli import main
    from PIL import Image

    for name in ("a.png", "b.png"):
        Image.new("RGB", (64, 64)).save(tmp_path / name)
    (tmp_path / "pairs.jsonl").write_text(json.dumps({"prompt": "x", "chosen": str(tmp_path / "a.png"),
                                                      "rejected": str(tmp_path / "b.png")}) + "\n")
    rc = main(["train", "--model", str(sd15_dir), "--resolution", "64", "--data-path", str(tmp_path / "pairs.jsonl"),
               "--dry-run", "--json"])
    assert rc == 0
    assert json.loads(capsys.readouterr().out)["settings"]["fill_images"] == 2
    with pytest.raises(SystemExit):
        main(["train", "--model", str(sd15_dir), "--resolution", "64", "--dry-run", "--fill-records", "1"])
    capsys.readouterr()  # the knob the run does not have is gone: --cache-batch-size is the one setting
    assert main(["train", "--model", str(sd15_dir), "--resolution", "64", "--dry-run"]) == 0
    assert "peak" in capsys.readouterr().out


def test_monotonic(sd15_dir):
    def step_peak(**kw):
        e = trace_run(tiny_cfg(sd15_dir, **kw), str(sd15_dir), device="cpu")
        return e, max(v["peak"] for v in e.phases["train_step"].values())

    e1, b1 = step_peak(batch_size=1)
    e2, b2 = step_peak(batch_size=2)
    assert b2 > b1 and e2.peak_gib >= e1.peak_gib
    _, ckpt = step_peak(batch_size=2, gradient_checkpointing=True)
    assert ckpt <= b2
    def filled(n):  # a cache_dir: FILL_BATCH (8) pairs = 16 images filled before training, n per VAE call
        return trace_run(tiny_cfg(sd15_dir, cache_batch_size=n, cache_dir="unused"), str(sd15_dir), device="cuda")

    small, big = filled(1), filled(16)
    assert big.phases["cache_fill"]["peak"] > small.phases["cache_fill"]["peak"]
    assert small.settings["images_per_vae_call"] == 1 and big.settings["images_per_vae_call"] == 16


@pytest.mark.parametrize("method", ["dpo", "tdft"])
def test_tiny_estimate_agrees_with_the_allocator(sd15_dir, method):
    """The fake trace against the same run on real tensors, measured by the CPU allocator."""
    cfg = tiny_cfg(sd15_dir, method=method, batch_size=2)
    est = trace_run(cfg, str(sd15_dir), device="cpu", fake=True)
    meas = measure_run(cfg, str(sd15_dir), device="cpu")
    assert est.peak_gib == pytest.approx(meas["tracker_peak_gib"], rel=1e-3)  # fake == real, same counter
    assert est.peak_gib == pytest.approx(meas["allocator_peak_gib"], rel=0.15)


def test_sdxl_shaped_and_mixed_precision(sdxl_dir):
    """SDXL conditioning, bf16 weights + autocast (as on a GPU) halve the weights against float32."""
    fp32 = trace_run(tiny_cfg(sdxl_dir, mixed_precision="bf16"), str(sdxl_dir), device="cpu")
    bf16 = trace_run(tiny_cfg(sdxl_dir, mixed_precision="bf16"), str(sdxl_dir), device="cuda")
    assert fp32.settings["weight_dtype"] == "float32" and bf16.settings["weight_dtype"] == "bfloat16"
    assert bf16.peak_gib < fp32.peak_gib


def test_stated_cards():
    assert stated_card_gib("sd15_8gb")[0] == 8 and stated_card_gib("sdxl_12gb")[0] == 12
    assert stated_card_gib("datacenter_sd15")[0] == 80
    assert stated_card_gib("sd35m_24gb")[0] == 24 and stated_card_gib("flux_40gb")[0] == 40
    for p in PRESETS:
        assert stated_card_gib(p)[0] > 0


@pytest.mark.slow
@pytest.mark.parametrize("preset", PRESETS)
def test_preset_fits_its_card(preset):
    """Each preset on its family's shipped config, on a GPU (weights in the preset's dtype), cache fill
    (at its cache_batch_size) included, plus the CUDA context and allocator slack, within the card its
    header states; the header's peak figure is this estimate's."""
    import re

    from npo_suite.trainer.memory_estimate import PRESET_DIR

    cfg = load_config(preset=preset)
    e = trace_run(cfg, preset_model(cfg, preset), device="cuda")
    _check_fits(preset, e)
    m = re.search(r"# peak ([\d.]+) GiB .*?, ([\d.]+) GiB with the CUDA",
                  (PRESET_DIR / f"{preset}.yaml").read_text(encoding="utf-8"), re.S)
    assert m, f"{preset}: the header gives no traced peak"
    assert (float(m.group(1)), float(m.group(2))) == (round(e.peak_gib, 2), round(e.card_gib(), 2))
    docs = Path(__file__).resolve().parent.parent / "docs"
    row = re.search(rf"^\| `{preset}` \|.*\| ([\d.]+) \(([\d.]+)\): (\d+) GB \|$",
                    (docs / "training.md").read_text(encoding="utf-8"), re.M)
    assert row, f"{preset}: no row in docs/training.md's preset table"
    assert (float(row[1]), float(row[2]), float(row[3])) == (round(e.peak_gib, 2), round(e.card_gib(), 2),
                                                             stated_card_gib(preset)[0])
    bench = re.search(rf"^\| {preset} \| (\d+) GB \| (\d+) \| ([\d.]+) \| ([\d.]+)[^|]* \| ([\d.]+) \| ([\d.]+) "
                      rf"\| ([\d.]+) \| yes \|$", (docs / "BENCHMARKS.md").read_text(encoding="utf-8"), re.M)
    assert bench, f"{preset}: no row in docs/BENCHMARKS.md's preset table"
    step = max(v["peak"] for v in e.phases["train_step"].values())
    assert [float(x) for x in bench.groups()] == [
        stated_card_gib(preset)[0], cfg.cache_batch_size, round(e.phases["weights"]["end"], 2),
        round(e.phases["cache_fill"]["peak"], 2), round(step, 2), round(e.peak_gib, 2), round(e.card_gib(), 2)]


@pytest.fixture(scope="module")
def flow_dirs(tmp_path_factory):
    return build_flow_dirs(tmp_path_factory.mktemp("tiny_flow_estimate"))


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_dry_run_json_on_a_transformer_folder(flow_dirs, family, capsys):
    """A flow transformer folder is estimated (it used to say "not estimated"): the cache fill holds the
    text encoders, which `loop.release_text_encoders` frees before training (cache_dir, no validation, dpo);
    with validation grids they stay, and the training step holds exactly their weights more."""
    from npo_suite.cli import main

    args = ["train", "--model", str(flow_dirs[family]), "--method", "dpo", "--resolution", "64", "--lora-rank", "4",
            "--cache-dir", "unused", "--dry-run", "--json"]
    assert main(args) == 0
    d = json.loads(capsys.readouterr().out)
    s = d["settings"]
    assert s["family"] == family and s["trainable_params"] > 0 and d["peak_gib"] > 0
    assert s["text_encoders_released"] is True and any("released after caching" in n for n in d["notes"])
    assert main(args + ["--set", "validate_every=5", "--set", "validation_prompts=[a]",
                        "--set", "validation_seeds=[0]"]) == 0
    kept = json.loads(capsys.readouterr().out)
    assert kept["settings"]["text_encoders_released"] is False
    assert any("kept in memory (validation grids" in n for n in kept["notes"])
    cfg = load_config(overrides={"model": str(flow_dirs[family])})
    from npo_suite.trainer.memory_estimate import BLOCK, GIB, build_components, resolve_model

    _, tes, _, _ = build_components(resolve_model(cfg.model))
    te_bytes = sum(-(-t.untyped_storage().nbytes() // BLOCK) * BLOCK
                   for te in tes for t in {id(x): x for x in [*te.parameters(), *te.buffers()]}.values())
    for ph in ("forward", "backward"):  # float32 weights on both sides (mixed_precision no): the encoders' bytes
        diff = kept["phases"]["train_step"][ph]["peak"] - d["phases"]["train_step"][ph]["peak"]
        assert diff == pytest.approx(te_bytes / GIB, abs=2e-4)  # the JSON rounds each figure to 1e-4 GiB


def test_transformer_estimate_agrees_with_the_allocator(flow_dirs):
    """As the UNet check: the fake trace of a tiny SD3 DPO run against the same run on real tensors,
    measured by the CPU allocator (kernels' own buffers included), 15% as for the UNet."""
    cfg = tiny_cfg(flow_dirs["sd3"], method="dpo", batch_size=2, cache_dir="unused")
    est = trace_run(cfg, str(flow_dirs["sd3"]), device="cpu", fake=True)
    meas = measure_run(cfg, str(flow_dirs["sd3"]), device="cpu")
    assert est.peak_gib == pytest.approx(meas["tracker_peak_gib"], rel=1e-3)
    assert est.peak_gib == pytest.approx(meas["allocator_peak_gib"], rel=0.15)


def test_preset_model_is_the_headers():
    assert preset_model(load_config(preset="sd35m_24gb"), "sd35m_24gb") == "sd35m"
    assert preset_model(load_config(preset="flux_40gb"), "flux_40gb") == "flux1dev"
    assert preset_model(load_config(preset="sana_16gb"), "sana_16gb") == "sana1600m"
    assert preset_model(load_config(preset="sdxl_12gb"), "sdxl_12gb") == "sdxl"


def _check_fits(preset, e):
    card, source = stated_card_gib(preset)
    assert e.fits(card), (f"{preset}: needs {e.card_gib():.2f} GiB (peak {e.peak_gib:.2f} GiB: weights "
                          f"{e.phases['weights']['end']:.2f}, cache fill {e.phases['cache_fill']['peak']:.2f}, "
                          f"step {max(v['peak'] for v in e.phases['train_step'].values()):.2f}), "
                          f"the preset states {source!r}")
