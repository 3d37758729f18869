"""Smoke runs of the training loop (trainer/loop.py): one per registered method (read from
METHODS), SDXL, validation output, interrupt hooks and the `train` CLI. Tiny models, 2 steps."""
from __future__ import annotations

import copy
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from train_fixtures import data_for, load_pipe, tiny_cfg, train_two_steps  # noqa: E402

from npo_suite.trainer.methods import METHODS  # noqa: E402

_PIPES: dict = {}


def backend_for(model_dir, cfg):
    """A fresh backend on a deep copy of the (once-loaded) pipeline, configured like build_backend."""
    from npo_suite.trainer.backends.diffusers import BackendOptions, DiffusersBackend, LoraOptions

    if str(model_dir) not in _PIPES:
        _PIPES[str(model_dir)] = load_pipe(model_dir)
    opts = BackendOptions(lora=LoraOptions(cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, None, cfg.seed),
                          resolution=cfg.resolution)
    return DiffusersBackend.from_pipeline(copy.deepcopy(_PIPES[str(model_dir)]), options=opts)


def _check_lora(result, cfg, backend, role):
    from npo_suite.core.offsets import load_offset

    assert result.lora_path is not None and result.lora_path.is_file()
    off = load_offset(result.lora_path, base=backend.unet)
    assert len(off.unet) == len(backend._layers) and off.is_low_rank()
    meta = off.metadata
    assert meta["npo_method"] == cfg.method and meta["npo_role"] == role
    beta = getattr(cfg, METHODS[cfg.method].beta_key or "beta")  # the β the method read (ddspo: ddspo_beta)
    assert meta["npo_steps"] == str(result.steps_done) and float(meta["npo_beta"]) == beta
    assert len(meta["npo_base_model_hash"]) == 64
    assert not any(k.startswith("npo_suite.") for k in meta), "one spelling: core/offsets/schema.py"
    return off


@pytest.mark.parametrize("method", list(METHODS))
def test_smoke_every_method(method, sd15_dir, tmp_path):
    from npo_suite.trainer.validation import method_role

    cfg = tiny_cfg(sd15_dir, data_for(method, tmp_path / "data"), tmp_path / "out", method=method, steps=2)
    backend = backend_for(sd15_dir, cfg)
    result = train_two_steps(cfg, backend)
    _check_lora(result, cfg, backend, method_role(METHODS[method], cfg))
    rows = (tmp_path / "out" / "metrics.csv").read_text().strip().splitlines()
    assert rows[0].startswith("step,loss") and len(rows) == 3


def test_ddspo_loser_sources_through_the_loop(sd15_dir, tmp_path):
    """Winner-only data: ddspo_loser 'generated' is refused with a clear error; 'other' trains."""
    from npo_suite.trainer.loop import train
    from train_fixtures import make_prompts

    data = make_prompts(tmp_path / "winners")  # {prompt, image} only
    cfg = tiny_cfg(sd15_dir, data, tmp_path / "gen", method="ddspo", steps=1)
    with pytest.raises(ValueError, match="ddspo_loser='generated'.*winner images only"):
        train(cfg, backend=backend_for(sd15_dir, cfg))
    cfg = tiny_cfg(sd15_dir, data, tmp_path / "other", method="ddspo", steps=2, ddspo_loser="other")
    result = train(cfg, backend=backend_for(sd15_dir, cfg))
    assert result.steps_done == 2 and math.isfinite(result.last_metrics["loss"])
    assert 0 <= result.last_metrics["logit/saturated_frac"] <= 1


def test_smoke_sdxl(sdxl_dir, tmp_path):
    from npo_suite.trainer.loop import train

    cfg = tiny_cfg(sdxl_dir, data_for("snpo", tmp_path / "data"), tmp_path / "out", method="snpo", steps=2)
    backend = backend_for(sdxl_dir, cfg)
    result = train(cfg, backend=backend)
    assert math.isfinite(result.last_metrics["loss"])
    _check_lora(result, cfg, backend, "snpo")


def test_validation_interrupt_and_hooks(sd15_dir, tmp_path):
    """npo (negative role: NPO-guided validation), stop_requested after step 2 of 5, progress hook."""
    from npo_suite.trainer import checkpoint as ckpt
    from npo_suite.trainer.loop import Callbacks, train

    cfg = tiny_cfg(sd15_dir, data_for("npo", tmp_path / "data"), tmp_path / "out", method="npo", steps=5,
                   validate_every=1, validation_prompts=["a cat"], validation_seeds=[0], validation_sample_steps=2)
    seen = []
    cb = Callbacks(stop_requested=lambda: len(seen) >= 2, progress=lambda s, n, loss: seen.append((s, n, loss)))
    result = train(cfg, backend=backend_for(sd15_dir, cfg), callbacks=cb)
    assert result.interrupted and result.steps_done == 2 and [s[:2] for s in seen] == [(1, 5), (2, 5)]
    assert ckpt.resolve("latest", cfg.output_dir).name == "step_000002"
    assert result.lora_path.is_file()
    out = Path(cfg.output_dir)
    from PIL import Image

    grid = Image.open(out / "validation" / "step_000002.png")
    assert grid.size == (2 * 16, 16)  # one prompt x (base, LoRA) for one seed
    assert (out / "curves.png").is_file() and (out / "curves.csv").read_text().startswith("step,loss,implicit_acc,lr")


def test_cli_train_from_yaml(sd15_dir, tmp_path):
    """The real front door: `train --config run.yaml --set ...` loads the model folder itself."""
    import argparse

    import yaml

    from npo_suite.cli import train as cli

    cfg = tiny_cfg(sd15_dir, data_for("dpo", tmp_path / "data"), tmp_path / "out", steps=1)
    run = tmp_path / "run.yaml"
    run.write_text(yaml.safe_dump(cfg.to_dict()))
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args(["--config", str(run), "--set", "method=bdpo", "--set", "output_name=mine", "--lora-rank", "3"])
    assert cli.main(args) == 0
    from npo_suite.core.offsets import load_offset

    off = load_offset(tmp_path / "out" / "mine.safetensors", base=load_pipe(sd15_dir).unet)
    assert off.metadata["npo_method"] == "bdpo" and off.metadata["npo_lora_rank"] == "3"
    assert cli.main(parser.parse_args(["--config", str(run), "--set", "lr=-1"])) == 2


def test_trained_lora_metadata_in_inspect_and_reports(sd15_dir, tmp_path, capsys):
    """Issue 13: the trainer's LoRA shows method, role, β, λ, base hash and steps in `offsets inspect
    --json` (with and without --base: the tiny model is not SD1.5-shaped) and in the reports."""
    import json

    from npo_suite.cli import main
    from npo_suite.core.offsets import load_offset
    from npo_suite.core.offsets.schema import metadata_lines
    from npo_suite.trainer.loop import train
    from npo_suite.webui.offset_notes import offset_summary

    cfg = tiny_cfg(sd15_dir, data_for("npo", tmp_path / "data"), tmp_path / "out", method="npo", steps=2, lam=0.8)
    backend = backend_for(sd15_dir, cfg)
    result = train(cfg, backend=backend)
    want = {"method": "npo", "role": "negative", "beta": "5000", "steps": "2"}
    for extra in ([], ["--base", str(sd15_dir)]):
        assert main(["offsets", "inspect", str(result.lora_path), "--json", *extra]) == 0
        info = json.loads(capsys.readouterr().out)
        assert info["format"] == "kohya" and info["components"]["unet"]["ranks"] == [cfg.lora_rank]
        assert {k: info["npo"][k] for k in want} == want and len(info["npo"]["base_model_hash"]) == 64
        assert "lambda" not in info["npo"]  # npo has no λ (it is DPO on swapped pairs)
    assert main(["offsets", "inspect", str(result.lora_path)]) == 0
    text = capsys.readouterr().out
    assert "role: negative" in text and "names and shapes not checked" in text
    off = load_offset(result.lora_path, base=backend.unet)
    lines = metadata_lines(off.metadata)
    assert lines[:5] == ["method: npo", "role: negative", "β: 5000",
                         f"base model hash: {off.metadata['npo_base_model_hash']}", "steps: 2"]
    assert ", ".join(lines[:5]) in offset_summary(off, "neg.safetensors")  # the WebUI panel's note


def test_inspect_shows_a_methods_own_fields_and_takes_a_single_file_base(sd15_dir, tmp_path, capsys):
    """`offsets inspect` printed "λ: 0.9" for a DPO LoRA (no λ) and said "base model folder not found"
    for `--base file.safetensors`. Fields come from the method registry (Method.beta_key /
    lambda_key): λ only for bdpo/snpo, DDSPO's β is ddspo_beta; a single-file checkpoint is a base."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from npo_suite.cli import main
    from npo_suite.trainer.loop import train

    loras = {}
    for method, kw in (("dpo", {}), ("bdpo", {"lam": 0.7}), ("ddspo", {"ddspo_beta": 8000.0})):
        cfg = tiny_cfg(sd15_dir, data_for(method, tmp_path / method), tmp_path / f"out_{method}", method=method, **kw)
        loras[method] = train(cfg, backend=backend_for(sd15_dir, cfg)).lora_path
    old_dpo = tmp_path / "old_dpo.safetensors"  # a DPO LoRA as the trainer wrote them before: npo_lambda 0.9
    with safe_open(str(loras["dpo"]), "pt") as f:
        save_file({k: f.get_tensor(k) for k in f.keys()}, str(old_dpo), metadata={**f.metadata(), "npo_lambda": "0.9"})
    for path, shown, hidden in ((loras["dpo"], ["β: 5000"], ["λ"]), (old_dpo, ["β: 5000"], ["λ"]),
                                (loras["bdpo"], ["β: 5000", "λ: 0.7"], []), (loras["ddspo"], ["β: 8000"], ["λ"])):
        assert main(["offsets", "inspect", str(path)]) == 0
        out = capsys.readouterr().out
        assert all(s in out for s in shown) and not any(h in out for h in hidden), (path, out)
    # a single file holding the UNet (diffusers names here: LDM names are read by the same
    # load_unet_state_dict, whose layout guess knows the SD1.x/SDXL shapes, not the tiny test UNet's)
    single = tmp_path / "base.safetensors"
    save_file({k: v.contiguous() for k, v in load_pipe(sd15_dir).unet.state_dict().items()}, str(single))
    assert main(["offsets", "inspect", str(loras["dpo"]), "--base", str(single)]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "not checked" not in out and "method: dpo" in out


def test_progress_counts_micro_batches_and_a_slow_run_logs_from_its_first_step(sd15_dir, tmp_path, monkeypatch):
    """grad_accum 16: the bar sat at 0/2 for the whole first step and metrics.csv had no row until step
    10. The bar counts micro-batches (with the optimizer step in its postfix, elapsed/remaining from
    tqdm); a row is written at least every LOG_SECONDS, so a slow run logs from its first step."""
    import csv

    from npo_suite.trainer import loop
    from npo_suite.trainer.loop import train

    bars, seen = [], []
    real_bar = loop._progress_bar
    monkeypatch.setattr(loop, "_progress_bar", lambda *a: bars.append(real_bar(*a)) or bars[-1])
    m = METHODS["dpo"]
    orig = m.compute
    monkeypatch.setattr(m, "compute", lambda *a, **k: seen.append(bars[-1].n) or orig(*a, **k))
    clock = iter(range(0, 10**6, 100))  # every reading 100 s later: each step is "slow"
    monkeypatch.setattr(loop, "_clock", lambda: float(next(clock)), raising=False)
    cfg = tiny_cfg(sd15_dir, data_for("dpo", tmp_path), tmp_path / "out", steps=2, grad_accum=4, batch_size=1,
                   log_every=10)
    train(cfg, backend=backend_for(sd15_dir, cfg))
    assert seen == list(range(8))  # the bar moved with every micro-batch, in the first step too
    assert bars[-1].total == 8 and bars[-1].n == 8 and "step" in bars[-1].postfix
    with open(Path(cfg.output_dir) / "metrics.csv", newline="") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == [1, 2]


def test_fast_runs_still_log_every_log_every_steps(sd15_dir, tmp_path):
    import csv

    from npo_suite.trainer.loop import train

    cfg = tiny_cfg(sd15_dir, data_for("dpo", tmp_path), tmp_path / "out", steps=4, log_every=3)
    train(cfg, backend=backend_for(sd15_dir, cfg))
    with open(Path(cfg.output_dir) / "metrics.csv", newline="") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == [3, 4]
