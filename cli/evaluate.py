"""`python -m npo_suite evaluate score|compare`: score a run's images, compare two runs paired by
prompt and seed (mean difference and win rate with seeded bootstrap 95% CIs, Markdown table, PNG plot).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


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


def main(args) -> int:
    try:
        return _score(args) if args.action == "score" else _compare(args)
    except (FileNotFoundError, ValueError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
