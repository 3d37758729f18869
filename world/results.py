"""Method table on the digits world (docs/RESULTS.md), every figure measured by this script.

    python -m npo_suite.world.results --out runs/results [--methods dpo npo bdpo snpo snpo_naive tdft]

Shares the demo's pieces (world/demo.py): pairs from the base model's own samples, LoRAs trained
by `trainer.loop.train`, samples by `generate.sample`, scores by the world's reward. Each method is
compared with plain CFG on the same prompts and seeds. Results are appended to
`OUT/results.json` after every method (a partial run keeps what it measured) and the Markdown
table `OUT/results.md` is rewritten from that file.

How each LoRA is used at sampling time (METHODS.md "NPO guidance at sampling time"):
    dpo, bdpo        positive offset on both CFG branches (mode cfg, pos=eta)
    npo              negative offset on the unconditional branch (mode npo, neg=delta, beta grid;
                     and alpha grid with eta = the dpo LoRA when dpo ran first)
    snpo, snpo_naive one LoRA on both branches, null prompt unconditional (mode snpo)
    tdft             Self-NPO: negative offset from TDFT, alpha = 0 (mode npo)
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import numpy as np

from ..trainer.methods import METHODS
from ..core.atomic import write_text

from .demo import DemoConfig, eval_prompts, sample_run, score_images, summarize, train_lora

ALL = tuple(METHODS)


def llr_trajectory(metrics_csv: Path) -> dict:
    """`llr/winner` (mse_policy_w - mse_ref_w, trainer metric) at the first and last logged steps and its minimum."""
    if not metrics_csv.is_file():
        return {}
    with open(metrics_csv, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("llr/winner") not in (None, "")]
    if not rows:
        return {}
    v = [float(r["llr/winner"]) for r in rows]
    return {"first": v[0], "last": v[-1], "max": max(v), "mean_last_quarter": float(np.mean(v[-max(1, len(v) // 4):])),
            "steps": [int(r["step"]) for r in rows], "values": v}


def variants(method: str, lora, loras: dict, dc: DemoConfig) -> list[tuple[str, str, object]]:
    """(label, mode, Offsets) to sample for a trained method."""
    from ..diffusers_host.generate import Offsets

    m = METHODS[method]
    if m.role == "positive":
        return [(method, "cfg", Offsets(pos=lora))]
    if m.role == "snpo":
        return [(method, "snpo", Offsets(snpo=lora))]
    if m.data_kind != "pairs":  # a data-free negative offset (Self-NPO)
        return [(f"{method} (Self-NPO, beta=1)", "npo", Offsets(neg=lora, alpha=0.0, beta=1.0))]
    out = [(f"npo (beta={b})", "npo", Offsets(neg=lora, beta=b)) for b in (0.5, 1.0, 2.0)]
    if "dpo" in loras:
        out += [(f"npo+dpo (alpha={a}, beta=1)", "npo", Offsets(pos=loras["dpo"], neg=lora, alpha=a, beta=1.0))
                for a in (0.0, 0.5, 1.0)]
    return out


def write_table(res: dict, path: Path) -> None:
    from ..core.stats import markdown_table

    rows = [{"run": "base (plain CFG)", "mean_reward": res["base"]["mean_reward"], "accuracy": res["base"]["accuracy"],
             "realism": res["base"]["realism"], "n": res["base"]["n"]}]
    for label, r in res["runs"].items():
        rows.append({"run": label, "mean_reward": r["mean_reward"], "win_rate": r["win_rate"],
                     "ci": f"[{r['ci_low']:.3f}, {r['ci_high']:.3f}]", "accuracy": r["accuracy"],
                     "right_to_wrong": r["right_to_wrong"], "wrong_to_right": r["wrong_to_right"],
                     "realism": r["realism"], "n": r["n"]})
    table = markdown_table(rows, [("run", "run"), ("mean_reward", "mean reward"), ("win_rate", "win rate vs base"),
                                  ("ci", "95% CI"), ("accuracy", "accuracy"), ("right_to_wrong", "right->wrong"),
                                  ("wrong_to_right", "wrong->right"), ("realism", "realism"), ("n", "images")])
    llr = [{"method": m, **{k: v for k, v in t.items() if k not in ("steps", "values")}}
           for m, t in res["llr"].items() if t]
    llr_table = markdown_table(llr, [("method", "method"), ("first", "llr/winner first log"), ("last", "last log"),
                                     ("max", "max"), ("mean_last_quarter", "mean of last quarter")]) if llr else ""
    path.write_text(table + "\n" + llr_table, encoding="utf-8")


def main(argv=None) -> int:
    from ..diffusers_host.loading import load_model
    from ..core.offsets import load_offset
    from .build import ensure_world
    from .pairs import make_pairs, read_pairs
    from .reward import DigitsReward

    ap = argparse.ArgumentParser(prog="python -m npo_suite.world.results", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/results")
    ap.add_argument("--world", default=None)
    ap.add_argument("--methods", nargs="+", default=[m for m in ALL if m != "ddspo"], choices=ALL)
    ap.add_argument("--train-steps", type=int, default=DemoConfig.train_steps)
    ap.add_argument("--eval-seeds", type=int, default=DemoConfig.eval_seeds)
    ap.add_argument("--beta", type=float, default=DemoConfig.beta)
    ap.add_argument("--pairs", default=None, help="reuse this pairs.jsonl (default: make them in OUT/pairs)")
    args = ap.parse_args(argv)
    dc = DemoConfig(out=args.out, world=args.world, train_steps=args.train_steps, eval_seeds=args.eval_seeds, beta=args.beta)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    world_dir = ensure_world(args.world)
    bundle = load_model(str(world_dir))
    reward = DigitsReward.for_world(world_dir)
    if args.pairs:
        pairs_path = Path(args.pairs)
    else:
        pairs_path = make_pairs(lambda ps, ss: sample_run(bundle, ps, ss, "cfg", None, dc), reward, out / "pairs",
                                samples_per_prompt=dc.pair_samples_per_prompt, tie_margin=dc.tie_margin).path
    prompts_file = out / "prompts.txt"  # data-free methods (tdft) read prompts only
    prompts_file.write_text("\n".join(eval_prompts("all")) + "\n", encoding="utf-8")
    base_prompts = eval_prompts(dc.eval_prompts)
    prompts = [p for p in base_prompts for _ in range(dc.eval_seeds)]
    seeds = [s for _ in base_prompts for s in range(dc.eval_seeds)]
    base = score_images(reward, sample_run(bundle, prompts, seeds, "cfg", None, dc), prompts)
    res_path = out / "results.json"
    res = json.loads(res_path.read_text()) if res_path.is_file() else {}
    res.update({"command": "python -m npo_suite.world.results " + " ".join(sys.argv[1:] if argv is None else argv),
                "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in dc.__dict__.items()},
                "base": {"mean_reward": float(base["reward"].mean()), "accuracy": float(base["correct"].mean()),
                         "realism": float(base["realism"].mean()), "n": len(prompts)}})
    res.setdefault("runs", {})
    res.setdefault("llr", {})
    res.setdefault("train", {})
    unet_base = {"unet": bundle.unet, **{f"te{i + 1}": te for i, te in enumerate(bundle.text_encoders)}}
    loras = {}
    # DDSPO (prompts_with_winners): prompt + the pair's winner image, paths relative to the pairs folder
    ddspo_file = pairs_path.parent / "ddspo_winners.jsonl"
    ddspo_file.write_text("".join(json.dumps({"prompt": r["prompt"], "image": r["chosen"]}) + "\n"
                                  for r in read_pairs(pairs_path)), encoding="utf-8")
    data_for = {"pairs": pairs_path, "images_or_prompts": prompts_file, "prompts_with_winners": ddspo_file}
    for m in args.methods:
        data = data_for[METHODS[m].data_kind]
        try:
            tr, secs = train_lora(world_dir, m, data, out / f"train_{m}", dc)
        except Exception as e:  # record the failure, go on with the other methods
            res["train"][m] = {"error": f"{type(e).__name__}: {e}"}
            print(f"results: {m} failed: {e}", file=sys.stderr)
            res_path.write_text(json.dumps(res, indent=2) + "\n")
            continue
        loras[m] = load_offset(str(tr.lora_path), unet_base)
        res["train"][m] = {"steps": tr.steps_done, "seconds": round(secs, 1), "lora": str(tr.lora_path)}
        res["llr"][m] = llr_trajectory(out / f"train_{m}" / "metrics.csv")
        for label, mode, offs in variants(m, loras[m], loras, dc):
            t0 = time.time()
            imgs = sample_run(bundle, prompts, seeds, mode, offs, dc)
            res["runs"][label] = {**summarize(base, score_images(reward, imgs, prompts), dc.n_boot, dc.seed),
                                  "method": m, "mode": mode, "sample_seconds": round(time.time() - t0, 1)}
            write_text(res_path, json.dumps(res, indent=2) + "\n")
            write_table(res, out / "results.md")
            r = res["runs"][label]
            print(f"results: {label}: win {r['win_rate']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}] "
                  f"reward {r['mean_reward']:.3f} acc {r['accuracy']:.3f} r->w {r['right_to_wrong']}", flush=True)
    write_table(res, out / "results.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
