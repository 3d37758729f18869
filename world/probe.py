"""What a trained LoRA does on the digits world beyond its win rate (docs/RESULTS.md "Why Self-NPO ...").

    python -m npo_suite world probe --method tdft --seeds 0 1 2 [--set tdft_start=noise] --out runs/probe

Each training seed's LoRA is trained exactly as `world.results` trains it (`results.run_one`: the same
data, settings and cache, so a probe of a finished results folder retrains nothing) and sampled in
three ways, each against the base model on the same prompts and evaluation seeds:

    role, strength b   as `core.npo.role_spec` samples the method's role (core.guidance.ROLE_SAMPLING); a negative LoRA also at
                       b = 0.25 and 0.5 or `strengths` (NPO's beta: theta_neg = theta + b*delta on the null branch),
                       and at strength 1 with the offset only while sigma_t <= S for each of `sigma_maxes`
                       (generate.sample's sigma gate: plain CFG at the higher noise levels)
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
TRANSFER_LEVELS = (0.1, 0.3, 0.5, 0.7, 0.9)  # noise levels t of the rectified-flow path (eps world: same SNR)


def x0_transfer(world, offset, images, prompts, levels=TRANSFER_LEVELS, seed: int = 123) -> list[dict]:
    """Where a LoRA acts, prompt vs null prompt, in x0 space (both parameterisations alike).

    images [N, 8, 8] in [0, 1] (the base model's own samples) are noised at each level with one shared
    noise draw; per level, d_c = x0hat_lora(x_t, c) - x0hat(x_t, c) and d_0 the same under the null prompt
    "", with x0hat = x_t - t v (flow) or (x_t - sqrt(1 - abar) eps) / sqrt(abar) (eps; abar of the nearest
    training timestep to the flow level's SNR, sqrt(abar / (1 - abar)) = (1 - t) / t). Returns per level
    {"level", "ratio": |d_0| / |d_c|, "cos": cos(d_0, d_c), "d_prompt": mean |d_c| per image} (norms over
    all images and pixels): what NPO guidance uses (d_0) against what the LoRA learnt under the prompt.
    An eps-kind world whose UNet predicts v (`world build --prediction-type v_prediction`, the scheduler's
    `prediction_type`) takes x0hat = sqrt(abar) x_t - sqrt(1 - abar) v."""
    import torch

    from ..core.offsets import materialize
    from .build import to_model_space

    x0 = to_model_space(images)
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    tuned = materialize(world.unet, [(offset, 1.0)])
    v_pred = world.kind != "flow" and world.scheduler.config.get("prediction_type", "epsilon") == "v_prediction"
    out = []
    with torch.no_grad():
        cond, null = world.encode(list(prompts)), world.encode([""] * len(prompts))
        for t in levels:
            if world.kind == "flow":
                xt, tt = (1 - t) * x0 + t * eps, torch.full((len(x0),), t * 1000.0)

                def x0hat(m, h):
                    return xt - t * m(xt, tt, h).sample
            else:
                abar = world.scheduler.alphas_cumprod
                target = ((1 - t) / t) ** 2 / (1 + ((1 - t) / t) ** 2)
                k = int(torch.argmin((abar - target).abs()))
                a = float(abar[k])
                xt, tt = a ** 0.5 * x0 + (1 - a) ** 0.5 * eps, torch.full((len(x0),), k)

                if v_pred:
                    def x0hat(m, h):
                        return a ** 0.5 * xt - (1 - a) ** 0.5 * m(xt, tt, h).sample
                else:
                    def x0hat(m, h):
                        return (xt - (1 - a) ** 0.5 * m(xt, tt, h).sample) / a ** 0.5
            dc = x0hat(tuned, cond) - x0hat(world.unet, cond)
            d0 = x0hat(tuned, null) - x0hat(world.unet, null)
            out.append({"level": float(t), "ratio": float(d0.norm() / dc.norm()),
                        "cos": float((d0 * dc).sum() / (d0.norm() * dc.norm())),
                        "d_prompt": float(dc.flatten(1).norm(dim=1).mean())})
    return out


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
          log=None, *, strengths=NEGATIVE_STRENGTHS, world: str | None = None, sigma_maxes=()) -> dict:
    """{"rows": [{"row", ...pooled figures, "realism"}], "null": {"base": r, "lora": r}, ...}; see the module doc."""
    from ..trainer.methods import METHODS
    from .demo import score_images

    if method not in METHODS:
        raise ValueError(f"unknown method {method!r} (the registry has {list(METHODS)})")
    bad = [b for b in strengths if not b > 0]
    if bad:
        raise ValueError(f"strengths must be > 0, got {bad}")
    bad = [x for x in sigma_maxes if not x >= 0]
    if bad:
        raise ValueError(f"sigma_max must be >= 0, got {bad}")
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
    transfer: list[list[dict]] = []
    if role == "negative":
        from .build import load_world

        w = load_world(ctx.world_dir)
        base_images = sample_run(ctx.bundle, ctx.prompts, ctx.seeds, "cfg", None, rc)
    for s in seeds:
        run = run_one(ctx, method, int(s))
        lora = ctx.load_lora(run["lora"])
        if role == "negative":
            transfer.append(x0_transfer(w, lora, base_images, ctx.prompts))
        rows.setdefault(f"{role} (as world.results), strength 1", []).append(run["scores"])
        for b in [b for b in strengths if b != 1.0] if role == "negative" else ():
            imgs = ctx.sample(ctx.prompts, ctx.seeds, *role_spec(role, lora, beta=b), desc=f"{method} s{s} beta {b}")
            rows.setdefault(f"{role}, strength {b}", []).append(score_images(ctx.reward, imgs, ctx.prompts))
        for x in sigma_maxes if role == "negative" else ():  # the offset on the null branch only at sigma <= x
            imgs = ctx.sample(ctx.prompts, ctx.seeds, *role_spec(role, lora), desc=f"{method} s{s} sigma<={x:g}",
                              sigma_max=x)
            rows.setdefault(f"{role}, strength 1, only at sigma <= {x:g}", []).append(
                score_images(ctx.reward, imgs, ctx.prompts))
        alone = role_spec("positive", lora)  # the LoRA on both CFG branches
        imgs = ctx.sample(ctx.prompts, ctx.seeds, *alone, desc=f"{method} s{s} alone")
        rows.setdefault("alone (LoRA on both branches)", []).append(score_images(ctx.reward, imgs, ctx.prompts))
        null["lora"].append(realism(sample_run(ctx.bundle, null_prompts, ctx.seeds, *alone, null_rc)))
    table = [{"row": name, **pooled_summary(base, [{"scores": x} for x in runs], rc.n_boot, 0),
              "realism": float(np.mean([np.mean(x["realism"]) for x in runs]))} for name, runs in rows.items()]
    result = {"method": method, "role": role, "seeds": [int(s) for s in seeds], "overrides": overrides or {},
              "world": world or "eps", "strengths": [float(b) for b in strengths],
              "sigma_maxes": [float(x) for x in sigma_maxes],
              "base_accuracy": float(np.mean(base["correct"])), "base_realism": float(np.mean(base["realism"])),
              "rows": table, "null": {"base": null["base"], "lora": float(np.mean(null["lora"]))},
              "transfer": [{"level": lv[0]["level"], **{k: [float(x[k]) for x in lv] for k in ("ratio", "cos", "d_prompt")}}
                           for lv in zip(*transfer)] if transfer else []}
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
        (f" --strengths {' '.join(f'{b:g}' for b in strengths)}" if list(strengths) != list(NEGATIVE_STRENGTHS) else "") + \
        (f" --sigma-max {' '.join(f'{x:g}' for x in result['sigma_maxes'])}" if result.get("sigma_maxes") else "")
    head = (f"`python -m npo_suite world probe --method {result['method']} --seeds "
            f"{' '.join(map(str, result['seeds']))}{extra}{' ' + sets if sets else ''}`")
    table = markdown_table(rows, [("row", "sampled as"), ("win_rate", "win rate"), ("ci", "95% CI"),
                                  ("accuracy", "accuracy"), ("guard", "right->wrong / wrong->right"),
                                  ("realism_win_rate", "realism win rate"), ("realism", "mean realism")])
    n = result["null"]
    text = (f"{head}\n\n{table}\n\nNull prompt, CFG 1 (mean realism): base {n['base']:.3f}, "
            f"with the LoRA {n['lora']:.3f}.\n")
    if result.get("transfer"):
        def cell(v, fmt):
            return f"{np.mean(v):{fmt}} ({', '.join(f'{x:{fmt}}' for x in v)})"

        trows = [{"level": r["level"], "ratio": cell(r["ratio"], ".3f"), "cos": cell(r["cos"], ".2f"),
                  "d": cell(r["d_prompt"], ".4f")} for r in result["transfer"]]
        text += ("\nWhere the offset acts, in x0 space (`world.probe.x0_transfer`; the base's own samples noised at "
                 "flow level t, the eps world at the same SNR; mean over training seeds, per seed in brackets):\n\n"
                 + markdown_table(trows, [("level", "noise level t"), ("ratio", "‖d_null‖ / ‖d_prompt‖"),
                                          ("cos", "cos(d_null, d_prompt)"), ("d", "‖d_prompt‖ per image")]) + "\n")
    return text
