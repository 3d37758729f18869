"""What a trained LoRA does on the digits world beyond its win rate (docs/RESULTS.md "Why Self-NPO ...").

    python -m npo_suite world probe --method tdft --seeds 0 1 2 [--set tdft_start=noise] --out runs/probe

Each training seed's LoRA is trained exactly as `world.results` trains it (`results.run_one`: the same
data, settings and cache, so a probe of a finished results folder retrains nothing) and sampled in
three ways, each against the base model on the same prompts and evaluation seeds:

    role, strength b   as `core.npo.role_spec` samples the method's role (core.guidance.ROLE_SAMPLING); a negative LoRA also at
                       b = 0.25 and 0.5 or `strengths` (NPO's beta: theta_neg = theta + b*delta on the null branch)
    alone              the LoRA on both CFG branches: the fine-tuned model itself. For a negative
                       LoRA this is the negative model, which Self-NPO and NPO expect to be WORSE
                       than the base (lower reward or realism): guidance pushes away from it.
    null               the null prompt at CFG 1 (the unconditional model), base and with the LoRA:
                       what the offset does on the branch that NPO guidance replaces (realism only,
                       there is no prompted digit).

Figures are pooled over training seeds as in `results.pooled_summary` (win rate against the base's image of
the same prompt and seed, 95% CI, accuracy, right->wrong / wrong->right, realism win rate) plus the mean
realism. Prints a Markdown table; writes OUT/probe.json and OUT/probe.md.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np

from ..core.atomic import write_text
from .demo import sample_run
from ..core.npo import role_spec
from .results import Context, ResultsConfig, _atomic_json, base_scores, pooled_summary, run_one

NEGATIVE_STRENGTHS = (0.25, 0.5)  # besides the role's own 1.0


def _value(text: str):
    """A --set value: JSON when it parses (numbers, true/false, null), else the string itself."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_sets(items) -> dict:
    """["k=v", ...] -> {k: v} (TrainConfig overrides); a malformed item is an error."""
    out = {}
    for it in items or ():
        key, sep, val = it.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects KEY=VALUE, got {it!r}")
        out[key] = _value(val)
    return out


def probe(method: str, seeds, out: str, overrides: dict | None = None, rc: ResultsConfig | None = None,
          log=None, *, strengths=NEGATIVE_STRENGTHS, world: str | None = None) -> dict:
    """{"rows": [{"row", ...pooled figures, "realism"}], "null": {"base": r, "lora": r}, ...}; see the module doc."""
    from ..trainer.methods import METHODS
    from .demo import score_images

    if method not in METHODS:
        raise ValueError(f"unknown method {method!r} (the registry has {list(METHODS)})")
    bad = [b for b in strengths if not b > 0]
    if bad:
        raise ValueError(f"strengths must be > 0, got {bad}")
    log = log or (lambda *a: print(*a, file=sys.stderr))
    rc = rc or ResultsConfig()
    rc = dataclasses.replace(rc, out=out, methods=(method,), seeds=tuple(seeds),
                             method_overrides={**rc.method_overrides, method: {**rc.method_overrides.get(method, {}),
                                                                               **(overrides or {})}})
    ctx = Context(rc, log)
    base = base_scores(ctx)
    role = METHODS[method].role
    null_prompts, null_rc = [""] * len(ctx.prompts), dataclasses.replace(rc, cfg_scale=1.0)

    def realism(images) -> float:
        return float(np.mean(ctx.reward.realism(images.reshape(len(images), -1).numpy())))

    rows: dict[str, list[dict]] = {}
    null = {"base": realism(sample_run(ctx.bundle, null_prompts, ctx.seeds, "cfg", None, null_rc)), "lora": []}
    for s in seeds:
        run = run_one(ctx, method, int(s))
        lora = ctx.load_lora(run["lora"])
        rows.setdefault(f"{role} (as world.results), strength 1", []).append(run["scores"])
        for b in [b for b in strengths if b != 1.0] if role == "negative" else ():
            imgs = ctx.sample(ctx.prompts, ctx.seeds, *role_spec(role, lora, beta=b), desc=f"{method} s{s} beta {b}")
            rows.setdefault(f"{role}, strength {b}", []).append(score_images(ctx.reward, imgs, ctx.prompts))
        alone = role_spec("positive", lora)  # the LoRA on both CFG branches
        imgs = ctx.sample(ctx.prompts, ctx.seeds, *alone, desc=f"{method} s{s} alone")
        rows.setdefault("alone (LoRA on both branches)", []).append(score_images(ctx.reward, imgs, ctx.prompts))
        null["lora"].append(realism(sample_run(ctx.bundle, null_prompts, ctx.seeds, *alone, null_rc)))
    table = [{"row": name, **pooled_summary(base, [{"scores": x} for x in runs], rc.n_boot, 0),
              "realism": float(np.mean([np.mean(x["realism"]) for x in runs]))} for name, runs in rows.items()]
    result = {"method": method, "role": role, "seeds": [int(s) for s in seeds], "overrides": overrides or {},
              "world": world or "eps", "strengths": [float(b) for b in strengths],
              "base_accuracy": float(np.mean(base["correct"])), "base_realism": float(np.mean(base["realism"])),
              "rows": table, "null": {"base": null["base"], "lora": float(np.mean(null["lora"]))}}
    _atomic_json(Path(out) / "probe.json", result)
    write_text(Path(out) / "probe.md", markdown(result))
    return result


def markdown(result: dict) -> str:
    from ..core.stats import markdown_table

    rows = [{"row": "base (plain CFG)", "accuracy": result["base_accuracy"], "realism": result["base_realism"]}]
    rows += [{**r, "ci": f"[{r['ci_low']:.3f}, {r['ci_high']:.3f}]",
              "guard": f"{r['right_to_wrong']} / {r['wrong_to_right']}"} for r in result["rows"]]
    sets = " ".join(f"--set {k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in result["overrides"].items())
    world = result.get("world", "eps")
    strengths = result.get("strengths", list(NEGATIVE_STRENGTHS))
    extra = (f" --world {world}" if world != "eps" else "") + \
        (f" --strengths {' '.join(f'{b:g}' for b in strengths)}" if list(strengths) != list(NEGATIVE_STRENGTHS) else "")
    head = (f"`python -m npo_suite world probe --method {result['method']} --seeds "
            f"{' '.join(map(str, result['seeds']))}{extra}{' ' + sets if sets else ''}`")
    table = markdown_table(rows, [("row", "sampled as"), ("win_rate", "win rate"), ("ci", "95% CI"),
                                  ("accuracy", "accuracy"), ("guard", "right->wrong / wrong->right"),
                                  ("realism_win_rate", "realism win rate"), ("realism", "mean realism")])
    n = result["null"]
    return (f"{head}\n\n{table}\n\nNull prompt, CFG 1 (mean realism): base {n['base']:.3f}, "
            f"with the LoRA {n['lora']:.3f}.\n")
