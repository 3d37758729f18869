"""bench train: runs every requested method against the least-work baseline, with --set overrides."""
import argparse

from npo_suite.benchmarks import train as bench


def test_bench_train_applies_set_overrides_and_reports_ratios():
    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    args = p.parse_args(["--methods", "dpo", "tdft", "--iters", "1", "--warmup", "0", "--set", "tdft_k=2"])
    out = bench.run(args)
    assert out["set"] == ["tdft_k=2"]
    assert set(out["methods"]) == {"dpo", "tdft"}
    for m in out["methods"].values():
        assert m["step_s"] > 0 and abs(m["ratio"] - m["step_s"] / m["least_work_s"]) < 2e-3
