"""`python -m npo_suite world build|info|results|probe`: the embedded digits world (docs/world.md).

  world build     train the world's base model and reward models into a folder (world/build.py)
  world info      print a world's manifest summary
  world results   every method of the registry over training seeds, pooled (world/results.py; docs/RESULTS.md)
  world probe     what one method's LoRA does beyond its win rate (world/probe.py)
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from dataclasses import fields
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..world.build import WorldConfig

    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    b = sub.add_parser("build", help="train the world's base model and reward models into a folder")
    b.add_argument("--out", default=None, help="output folder (default: the cache, ~/.cache/npo_suite/world/digits_v2; "
                                                "the shipped copy is world/assets/digits_world)")
    for f in fields(WorldConfig):
        if f.name == "block_out_channels":
            b.add_argument("--block-out-channels", type=int, nargs="+", default=None, help=f.metadata["help"])
            continue
        b.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=None, help=f.metadata["help"])
    b.add_argument("--quick", action="store_true", help="a small, fast build for tests (60 steps, batch 32)")
    b.add_argument("--diagnose-samples", type=int, default=300, help="base-model samples scored after the build (0: skip)")
    b.add_argument("--force", action="store_true", help="rebuild even if the folder already holds a world")
    i = sub.add_parser("info", help="print a world's manifest summary")
    i.add_argument("--path", default=None, help="world folder (default: the shipped world, else the cache)")
    i.add_argument("--json", action="store_true", help="print the whole manifest as JSON")
    _results_arguments(sub)
    _probe_arguments(sub)


def _results_arguments(sub) -> None:
    from ..trainer.methods import METHODS
    from ..world.results import ResultsConfig

    d = ResultsConfig()
    r = sub.add_parser("results", help="train and sample every listed method over training seeds; pooled figures",
                       description="Every method of the registry on the digits world, over several training seeds "
                                   "(docs/RESULTS.md).")
    r.add_argument("--methods", nargs="+", default=list(d.methods), choices=list(METHODS),
                   help=f"methods of the registry (default: {' '.join(d.methods)})")
    r.add_argument("--seeds", nargs="+", type=int, default=list(d.seeds), help="training seeds (default 0 1 2)")
    r.add_argument("--out", default=None, help=f"output folder (runs, data, results.json, results.md; default {d.out}, "
                                               f"{d.out}_flow for the flow world)")
    r.add_argument("--json", action="store_true", help="print ONE JSON line with the pooled figures")
    r.add_argument("--report", default=None, help="also write the tables into this Markdown file between the markers")
    r.add_argument("--world", default=None, help="eps (the default: the shipped eps world), flow (the flow-matching "
                                                 "world: shipped, else built into the cache), or a world folder")
    r.add_argument("--quick", action="store_true", help="tiny step counts (a smoke test; numbers mean nothing)")
    r.add_argument("--train-steps", type=int, default=None, help=f"LoRA training steps (default {d.train_steps})")
    r.add_argument("--eval-seeds", type=int, default=None, help=f"evaluation seeds per prompt (default {d.eval_seeds})")


def _probe_arguments(sub) -> None:
    from ..trainer.methods import METHODS

    p = sub.add_parser("probe", help="what one method's LoRA does beyond its win rate (role, alone, null branch)",
                       description="What a trained LoRA does on the digits world beyond its win rate "
                                   "(docs/RESULTS.md).")
    p.add_argument("--method", required=True, choices=list(METHODS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="training seeds (default 0 1 2)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a TrainConfig override for this method (repeatable), e.g. tdft_start=noise")
    p.add_argument("--out", default="runs/probe", help="output folder (the runs are cached there as world results does)")
    p.add_argument("--world", default=None, help="eps (default), flow, or a world folder (as world results)")
    p.add_argument("--strengths", nargs="+", type=float, default=None, metavar="B",
                   help="a negative LoRA's extra strengths beta on the null branch (default 0.25 0.5; 1 is always run)")
    p.add_argument("--sigma-max", nargs="+", type=float, default=None, metavar="S",
                   help="a negative LoRA also sampled with its offset on the null branch only while the noise level "
                        "sigma_t <= S (generate's sigma gate; flow: sigma = t/(1 - t)); one row per S")
    p.add_argument("--quick", action="store_true", help="tiny step counts (a smoke test; numbers mean nothing)")


def _world_kw(world) -> tuple[str, dict]:
    """(kind, ResultsConfig keywords) of a --world argument: eps (the default world, same stamps as no
    argument), flow, or a folder; a flow world samples with core.flow's Euler solver."""
    from ..world.results import world_kind

    world = None if world == "eps" else world
    kind = world_kind(world)
    kw = {"world": world} if world is not None else {}
    if kind == "flow":
        kw["scheduler"] = "flow-euler"  # generate.FLOW_SCHEDULERS
    return kind, kw


def _results(args) -> int:
    from ..world.results import ResultsConfig, json_summary, markdown, run_results, write_report

    kind, kw = _world_kw(args.world)
    out = args.out or (ResultsConfig.out + ("_flow" if kind == "flow" else ""))
    kw.update({k: v for k, v in (("out", out), ("train_steps", args.train_steps),
                                 ("eval_seeds", args.eval_seeds)) if v is not None})
    kw.update(methods=tuple(args.methods), seeds=tuple(args.seeds))
    rc = ResultsConfig.quick(**kw) if args.quick else ResultsConfig(**kw)
    res = run_results(rc)
    if args.report:
        write_report(Path(args.report), markdown(res, res["details"]), kind)
    if args.json:
        print(json.dumps(json_summary(res)))
    else:
        print(f"results: {Path(rc.out) / 'results.md'}")
    return 0


def _probe(args) -> int:
    from ..world.probe import markdown, parse_sets, probe
    from ..world.results import ResultsConfig

    _, kw = _world_kw(args.world)
    rc = ResultsConfig.quick(**kw) if args.quick else ResultsConfig(**kw)
    kw_p = {"strengths": tuple(args.strengths)} if args.strengths else {}
    if args.sigma_max:
        kw_p["sigma_maxes"] = tuple(args.sigma_max)
    res = probe(args.method, args.seeds, args.out, parse_sets(args.set), rc, world=args.world, **kw_p)
    print(markdown(res))
    return 0


def main(args) -> int:
    from ..world.build import WorldConfig, build_world, cache_dir, check_world_dir, default_world_dir

    if args.action == "results":
        return _results(args)
    if args.action == "probe":
        return _probe(args)
    if args.action == "info":
        path = Path(args.path) if args.path else default_world_dir()
        try:
            m = check_world_dir(path)
        except (FileNotFoundError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        if args.json:
            print(json.dumps(m))
            return 0
        print(f"world: {path}")
        print(f"built by: {m.get('command')}  (sklearn {m['versions'].get('sklearn')}, torch {m['versions'].get('torch')})")
        print(f"config: {m['config']}")
        print(f"splits: {m['splits']}")
        print(f"reward: {m['reward']}")
        if "diagnostics" in m:
            print(f"base model (build diagnostic): {m['diagnostics']}")
        return 0

    out = Path(args.out) if args.out else cache_dir()
    if (out / "world.json").is_file() and not args.force:
        print(f"world already built at {out} (use --force to rebuild)")
        return 0
    kwargs = {f.name: getattr(args, f.name) for f in fields(WorldConfig) if getattr(args, f.name, None) is not None}
    if args.quick:
        kwargs = {"steps": 60, "batch_size": 32, **kwargs}
    if args.block_out_channels:
        kwargs["block_out_channels"] = tuple(args.block_out_channels)
    try:
        cfg = WorldConfig(**kwargs)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    command = "python -m npo_suite world " + " ".join(shlex.quote(a) for a in sys.argv[2:]) if sys.argv[1:2] == ["world"] else None
    build_world(out, cfg, diagnose_samples=args.diagnose_samples, command=command)
    return 0
