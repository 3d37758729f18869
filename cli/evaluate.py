"""`python -m npo_suite evaluate score|compare|sweep`: score a run's images, compare two runs paired by
prompt and seed (mean difference and win rate with seeded bootstrap 95% CIs, Markdown table, PNG plot),
sweep the NPO strength (alpha, beta) against plain CFG with a guard scorer (evaluation/sweep.py).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from .model_flags import add_model_flags, load_kwargs


def _scorer_options(p: argparse.ArgumentParser, multiple: bool = True) -> None:
    """--scorer (one or, with `multiple`, several) and the options of every scorer, incl. --device, --allow-pickle."""
    from ..evaluation.scorers import SCORERS

    p.add_argument("--scorer", nargs="+" if multiple else None, default=["world_reward"] if multiple else "world_reward",
                   choices=list(SCORERS), help="scorer" + ("(s)" if multiple else "") + ": "
                   + "; ".join(f"{k}: {v[1]}" for k, v in SCORERS.items()))
    p.add_argument("--world", default=None, help="digits world folder for world_* scorers (default: shipped/cached world)")
    p.add_argument("--model-path", default=None, help="local model folder/file of an external scorer (never downloaded)")
    p.add_argument("--processor-path", default=None, help="local CLIP processor folder (default: --model-path)")
    p.add_argument("--head-path", default=None, help="laion_aesthetic: MLP head weights (.safetensors; .pth needs --allow-pickle)")
    p.add_argument("--med-config", default=None, help="image_reward: local med_config.json")
    p.add_argument("--device", default="cpu")
    p.add_argument("--allow-pickle", action="store_true", help="allow loading pickle checkpoints (.pt/.pth) you trust")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    s = sub.add_parser("score", help="score the images of one run")
    src = s.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", help="folder of images: with a manifest.json, or PNGs scored against --prompt")
    src.add_argument("--run", help="manifest.json (or its folder), optionally PATH:MODE")
    s.add_argument("--prompt", default=None, help="prompt for every image of an --images folder without manifest")
    s.add_argument("--out", default=None, help="write per-image scores as JSON here")
    s.add_argument("--json", action="store_true", help="print one JSON line")
    _scorer_options(s)
    c = sub.add_parser("compare", help="paired comparison of run B against run A (same prompts and seeds)")
    c.add_argument("run_a", help="baseline run: manifest.json or its folder, optionally PATH:MODE")
    c.add_argument("run_b", help="compared run, same forms")
    c.add_argument("--n-boot", type=int, default=5000, help="bootstrap resamples")
    c.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    c.add_argument("--out", default=None, help="folder for compare.md, compare.png, compare.json")
    c.add_argument("--json", action="store_true", help="print one JSON line")
    _scorer_options(c)
    _sweep_arguments(sub)


def _sweep_arguments(sub) -> None:
    from ..diffusers_host.generate import FLOW_SCHEDULERS, SCHEDULERS
    from ..families import family_names
    from ..evaluation.scorers import SCORERS

    w = sub.add_parser("sweep", help="sample an (alpha, beta) grid of NPO guidance on validation seeds; pick the "
                       "strongest setting that does not lower the guard scorer")
    w.add_argument("--model", required=True, help="diffusers folder, single-file .safetensors or world folder")
    w.add_argument("--neg-offset", required=True, help="negative offset delta (the NPO LoRA)")
    w.add_argument("--pos-offset", default=None, help="positive offset eta (conditional rows; alpha weighs it)")
    w.add_argument("--betas", type=float, nargs="+", default=[0.5, 1.0, 2.0], help="weights of delta")
    w.add_argument("--alphas", type=float, nargs="+", default=[1.0], help="weights of eta in the negative model")
    w.add_argument("--prompt", action="append", default=[], help="a validation prompt (repeatable)")
    w.add_argument("--prompts", help="validation prompts: .txt (one a line) or .jsonl")
    w.add_argument("--negative-prompt", default="")
    w.add_argument("--seeds", type=int, nargs="+", default=list(range(8)), help="validation seeds of every prompt")
    w.add_argument("--guard", default="world_correct", choices=list(SCORERS), help="guard scorer (must not drop)")
    w.add_argument("--guard-model-path", default=None, help="local weights of the guard scorer (default: --model-path)")
    w.add_argument("--tolerance", type=float, default=0.02, help="largest drop of the guard's mean that still passes")
    w.add_argument("--cfg", type=float, default=7.5)
    w.add_argument("--steps", type=int, default=20)
    w.add_argument("--scheduler", default=None, choices=list(SCHEDULERS) + list(FLOW_SCHEDULERS),
                   help="default ddim; flow-euler for flow-matching models (SD3/SD3.5, Flux, SANA, the flow world)")
    w.add_argument("--flux-guidance", type=float, default=None,
                   help="Flux-dev's embedded guidance (default 3.5); lower it (1-2) when --cfg > 1 does the guiding")
    w.add_argument("--height", type=int, default=None, help="default: the model's own size")
    w.add_argument("--width", type=int, default=None, help="default: the model's own size")
    w.add_argument("--batch-size", type=int, default=16)
    add_model_flags(w)
    w.add_argument("--family", choices=family_names(), default=None)
    w.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    w.add_argument("--n-boot", type=int, default=5000)
    w.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    w.add_argument("--out", default=None, help="folder for sweep.md, sweep.png, sweep.json")
    w.add_argument("--json", action="store_true", help="print one JSON line")
    _scorer_options(w, multiple=False)


def scorer_settings(args) -> dict:
    """The scorer options of parsed args (what `make_scorer` takes besides the name)."""
    return {"world": args.world, "model_path": args.model_path, "processor_path": args.processor_path,
            "head_path": args.head_path, "med_config": args.med_config, "device": args.device,
            "allow_pickle": args.allow_pickle}


def _make(name: str, args):
    from ..evaluation.scorers import make_scorer

    return make_scorer(name, **scorer_settings(args))


def _entries_for_score(args):
    from ..evaluation.runs import Entry, read_run

    if args.run:
        return read_run(args.run)
    d = Path(args.images)
    if (d / "manifest.json").is_file():
        return read_run(d)
    if not d.is_dir():
        raise FileNotFoundError(f"--images: folder not found: {d}")
    files = sorted(p for p in d.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))
    if not files:
        raise ValueError(f"--images: no images in {d}")
    if args.prompt is None:
        raise ValueError(f"--images {d}: no manifest.json there, so pass --prompt for the images")
    return [Entry(f, args.prompt, None, None) for f in files]


def _score(args) -> int:
    from ..evaluation.runs import load_images

    entries = _entries_for_score(args)
    images, prompts = load_images(entries), [e.prompt for e in entries]
    result = {"n": len(entries), "scores": {}}
    per_image = [{"file": str(e.path), "prompt": e.prompt, "seed": e.seed} for e in entries]
    for name in args.scorer:
        s = np.asarray(_make(name, args).score(images, prompts))
        result["scores"][name] = {"mean": float(s.mean()), "std": float(s.std())}
        for row, v in zip(per_image, s):
            row[name] = float(v)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({**result, "images": per_image}, indent=2) + "\n", encoding="utf-8")
    if args.json:
        print(json.dumps(result))
    else:
        for name, v in result["scores"].items():
            print(f"{name}: mean {v['mean']:.4f} (std {v['std']:.4f}, n={result['n']})")
    return 0


def compare_runs(run_a: str, run_b: str, scorers: dict, *, n_boot: int = 5000, seed: int = 0) -> dict:
    """Paired stats of B vs A for each scorer (+ right->wrong for world_correct). scorers: name -> Scorer."""
    from ..evaluation.runs import load_images, pair_runs, read_run
    from ..core.stats import paired_compare, right_to_wrong

    pairs = pair_runs(read_run(run_a), read_run(run_b))
    prompts = [a.prompt for a, _ in pairs]
    ims_a, ims_b = load_images([a for a, _ in pairs]), load_images([b for _, b in pairs])
    out = {"n": len(pairs), "run_a": str(run_a), "run_b": str(run_b), "scorers": {}}
    for name, scorer in scorers.items():
        sa, sb = np.asarray(scorer.score(ims_a, prompts)), np.asarray(scorer.score(ims_b, prompts))
        st = paired_compare(sa, sb, n_boot=n_boot, seed=seed).as_dict()
        if name == "world_correct":
            st["right_to_wrong"] = right_to_wrong(sa > 0.5, sb > 0.5)
            st["wrong_to_right"] = right_to_wrong(sb > 0.5, sa > 0.5)
        out["scorers"][name] = st
    return out


def _compare(args) -> int:
    from ..core.stats import PairedStats, markdown_table, plot_comparison

    names = list(dict.fromkeys(args.scorer))
    if any(n.startswith("world_") for n in names) and "world_correct" not in names:
        names.append("world_correct")  # reward-hacking guard: accuracy and right->wrong beside every world reward
    res = compare_runs(args.run_a, args.run_b, {n: _make(n, args) for n in names}, n_boot=args.n_boot, seed=args.seed)
    rows = [{"scorer": n, **st} for n, st in res["scorers"].items()]
    cols = [("scorer", "scorer"), ("n", "n"), ("mean_a", "mean A"), ("mean_b", "mean B"), ("mean_diff", "B - A"),
            ("diff_ci_low", "diff CI low"), ("diff_ci_high", "diff CI high"), ("win_rate", "win rate B"),
            ("ci_low", "win CI low"), ("ci_high", "win CI high"), ("right_to_wrong", "right->wrong")]
    table = markdown_table(rows, cols)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "compare.md").write_text(f"# {args.run_b} vs {args.run_a}\n\n{table}", encoding="utf-8")
        (out / "compare.json").write_text(json.dumps(res, indent=2) + "\n", encoding="utf-8")
        stats = {n: PairedStats(**{k: v for k, v in st.items() if k in PairedStats.__dataclass_fields__})
                 for n, st in res["scorers"].items()}
        plot_comparison(stats, out / "compare.png", title=f"B={args.run_b} vs A={args.run_a}")
        res["table"], res["plot"] = str(out / "compare.md"), str(out / "compare.png")
    print(json.dumps(res) if args.json else table, end="\n" if args.json else "")
    return 0


def sweep_setting(loaded, alpha: float | None, beta: float | None):
    """(mode, offsets) of one sweep setting: plain CFG for beta None (the baseline), else NPO guidance with
    the loaded eta and delta at weights alpha (None: the default) and beta. beta 0 stays 0 (no delta)."""
    from ..core.npo import ALPHA_DEFAULT
    from ..diffusers_host.generate import Offsets

    if beta is None:
        return "cfg", Offsets(loaded.eta, loaded.delta, None, ALPHA_DEFAULT if alpha is None else alpha)
    return "npo", Offsets(loaded.eta, loaded.delta, None, ALPHA_DEFAULT if alpha is None else alpha, beta)


def sweep_renderer(bundle, loaded, jobs, *, cfg_scale: float, steps: int, scheduler: str | None, batch_size: int,
                   flux_guidance: float | None = None, height: int | None = None, width: int | None = None):
    """render(alpha, beta) -> PIL images of `jobs` [(prompt, negative, seed)]: npo mode, or plain CFG for beta None.
    loaded: the NPOSpec of the offset files (its eta and delta; its weights are the setting's)."""
    from ..diffusers_host.generate import sample, to_pil

    def render(alpha, beta):
        mode, off = sweep_setting(loaded, alpha, beta)
        out = []
        for i in range(0, len(jobs), batch_size):
            ch = jobs[i:i + batch_size]
            res = sample(bundle, [j[0] for j in ch], [j[2] for j in ch], mode, negative_prompts=[j[1] for j in ch],
                         offsets=off, cfg_scale=cfg_scale, steps=steps, scheduler=scheduler,
                         flux_guidance=flux_guidance, height=height, width=width)
            out += [to_pil(im) for im in res.images]
        return out
    return render


def _sweep_render(args, jobs):
    import torch

    from ..diffusers_host.generate import load_offsets
    from ..families.loading import load_model

    bundle = load_model(args.model, family=args.family, dtype=getattr(torch, args.dtype), device=args.device,
                        allow_pickle=args.allow_pickle, **load_kwargs(args))
    loaded, _ = load_offsets(bundle, pos=args.pos_offset, neg=args.neg_offset, allow_pickle=args.allow_pickle)
    return sweep_renderer(bundle, loaded, jobs, cfg_scale=args.cfg, steps=args.steps, scheduler=args.scheduler,
                          batch_size=args.batch_size, flux_guidance=args.flux_guidance, height=args.height,
                          width=args.width)


def _sweep(args) -> int:
    from tqdm import tqdm

    from ..diffusers_host.generate import read_prompts
    from ..evaluation.sweep import choose, grid, plot_sweep, run_sweep, table

    settings = grid(args.alphas, args.betas)
    if args.world is None and (Path(args.model) / "reward").is_dir():
        args.world = args.model  # a world's own reward models
    from ..evaluation.scorers import make_scorer

    scorer = _make(args.scorer, args)
    guard = make_scorer(args.guard, **{**scorer_settings(args), "model_path": args.guard_model_path or args.model_path})
    items = read_prompts(args.prompt, args.prompts, args.negative_prompt, args.seeds)
    jobs = [(it["prompt"], it["negative_prompt"], s) for it in items for s in it["seeds"]]
    with tqdm(total=len(settings), desc="sweep", unit="setting", file=sys.stderr) as bar:
        res = run_sweep(settings, _sweep_render(args, jobs), [j[0] for j in jobs], scorer, guard, n_boot=args.n_boot,
                        seed=args.seed, progress=bar.update)
    best = choose(res["rows"], args.tolerance)
    res.update(scorer=args.scorer, guard=args.guard, tolerance=args.tolerance, chosen=best)
    md = (f"# NPO strength sweep: {args.scorer}, guard {args.guard}\n\n{len(jobs)} images per setting; plain CFG: "
          f"{args.scorer} {res['base_mean']:.3f}, {args.guard} {res['base_guard']:.3f}.\n\n{table(res)}\n"
          + (f"Strongest setting that beats plain CFG and keeps the guard (drop <= {args.tolerance}): "
             f"**{best['setting']}**.\n" if best else
             f"No setting both beats plain CFG and keeps the guard (drop <= {args.tolerance}): use plain CFG.\n"))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        plot_sweep(res, out / "sweep.png", args.scorer, args.guard, args.tolerance)
        (out / "sweep.md").write_text(md + "\n![sweep](sweep.png)\n", encoding="utf-8")
        (out / "sweep.json").write_text(json.dumps(res, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(res) if args.json else md, end="\n" if args.json else "")
    return 0


def main(args) -> int:
    try:
        return {"score": _score, "compare": _compare, "sweep": _sweep}[args.action](args)
    except (FileNotFoundError, ValueError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
