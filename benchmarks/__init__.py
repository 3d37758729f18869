"""Benchmarks (step time and memory), run by `python -m npo_suite bench <name>` (cli/bench.py).

  guidance   plain CFG vs the NPO fast path vs the NPO two-model path (benchmarks/guidance.py)
  train      training step time and memory (benchmarks/train.py)

Each module takes a typed config (`GuidanceBenchConfig`, `TrainBenchConfig`) and returns a dict;
the command line lives in cli/bench.py.
"""
