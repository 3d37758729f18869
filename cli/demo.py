"""`python -m npo_suite demo`: the whole loop on the embedded digits world (world/demo.py::run_demo).

`--json` prints ONE line: {"methods": {"npo": {...}, "snpo": {...}}, "base_mean_reward",
"base_accuracy", "report"}; the progress and the log go to stderr then.
"""
from __future__ import annotations

import argparse
import json
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..world.demo import DemoConfig

    d = DemoConfig()
    parser.add_argument("--out", default=d.out, help="output folder (report.md, images, LoRAs)")
    parser.add_argument("--json", action="store_true", help="print ONE JSON line with the results")
    parser.add_argument("--quick", action="store_true", help="tiny step counts (a smoke test; numbers mean nothing)")
    parser.add_argument("--world", default=None, help="world folder (default: shipped world, else the cache; built if missing)")
    parser.add_argument("--train-steps", type=int, default=None, help=f"LoRA training steps per method (default {d.train_steps})")
    parser.add_argument("--eval-seeds", type=int, default=None, help=f"seeds per prompt in the evaluation (default {d.eval_seeds})")
    parser.add_argument("--beta", type=float, default=None, help=f"DPO-family beta (Diffusion-DPO convention; default {d.beta})")
    parser.add_argument("--cfg", type=float, default=None, help=f"CFG scale (default {d.cfg_scale})")
    parser.add_argument("--seed", type=int, default=None, help=f"seed of training and bootstrap (default {d.seed})")


def demo_config(args: argparse.Namespace):
    """The DemoConfig the flags ask for (unset flags keep the config's defaults; --quick: DemoConfig.quick)."""
    from ..world.demo import DemoConfig

    kw = {k: v for k, v in (("out", args.out), ("world", args.world), ("train_steps", args.train_steps),
                            ("eval_seeds", args.eval_seeds), ("beta", args.beta), ("cfg_scale", args.cfg),
                            ("seed", args.seed)) if v is not None}
    return DemoConfig.quick(**kw) if args.quick else DemoConfig(**kw)


def main(args: argparse.Namespace) -> int:
    from ..world.demo import run_demo

    log = (lambda *a: print(*a, file=sys.stderr)) if args.json else print
    result = run_demo(demo_config(args), log=log)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"report: {result['report']}")
        print(f"base: mean reward {result['base_mean_reward']:.3f}, accuracy {result['base_accuracy']:.3f}")
        for m, r in result["methods"].items():
            print(f"{m}: win rate {r['win_rate']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}], mean reward "
                  f"{r['mean_reward']:.3f}, accuracy {r['accuracy']:.3f}, right->wrong {r['right_to_wrong']}")
    return 0
