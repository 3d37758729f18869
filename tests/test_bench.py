"""bench train: runs every requested method against the least-work baseline, with --set overrides;
bench guidance: the full-size path finds SD1.5's config (built on meta tensors, no weights)."""
import argparse

import pytest

from npo_suite.benchmarks import train as bench
from npo_suite.benchmarks.train import TrainBenchConfig


def test_bench_train_applies_set_overrides_and_reports_ratios():
    out = bench.run(TrainBenchConfig(methods=("dpo", "tdft"), iters=1, warmup=0, sets=("tdft_k=2",)))
    assert out["set"] == ["tdft_k=2"]
    assert set(out["methods"]) == {"dpo", "tdft"}
    for m in out["methods"].values():
        assert m["step_s"] > 0 and abs(m["ratio"] - m["step_s"] / m["least_work_s"]) < 2e-3


def test_bench_flags_become_typed_configs():
    from npo_suite.cli import bench as cli

    p = argparse.ArgumentParser()
    cli.add_arguments(p)
    tc = cli.train_config(p.parse_args(["train", "--methods", "dpo", "tdft", "--iters", "1", "--warmup", "0",
                                        "--set", "tdft_k=2", "--device", "cpu"]))
    assert tc == TrainBenchConfig(methods=("dpo", "tdft"), iters=1, warmup=0, sets=("tdft_k=2",), device="cpu")
    gc = cli.guidance_config(p.parse_args(["guidance", "--full-size", "--device", "cpu", "--threads", "2"]))
    assert gc.resolved() == {"full_size": True, "steps": 5, "warmup": 2, "rank": 32, "latent": 32, "batch": 1,
                             "alpha": 0.5, "beta": 1.0, "device": "cpu", "dtype": "float32", "threads": 2}
    with pytest.raises(ValueError, match="unknown method"):
        bench.run(TrainBenchConfig(methods=("no_such_method",)))


def test_bench_guidance_full_size_finds_sd15_config_on_meta():
    """`bench guidance --full-size` looked for SD1.5's config under benchmarks/configs/ (the configs live in the
    root configs/): build the UNet it would time on the meta device (shapes only, no memory, no init)."""
    from npo_suite.benchmarks.guidance import SD15_UNET_CONFIG, full_size_unet_on_meta

    assert (SD15_UNET_CONFIG / "config.json").is_file()
    unet = full_size_unet_on_meta()
    assert all(p.is_meta for p in unet.parameters())
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964  # SD1.5's UNet
    assert unet.config.cross_attention_dim == 768 and unet.config.sample_size == 64
