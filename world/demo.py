"""`python -m npo_suite demo`: the whole loop on the embedded digits world, with the project's own code.

1. world: the shipped world (or the cached one, built once) — world/build.py
2. preference pairs from the base model's own samples (plain CFG via `generate.sample`),
   labelled by the world's reward (world/pairs.py)
3. train a negative LoRA (method `npo`) and an SNPO LoRA (method `snpo`) with
   `trainer.loop.train` (methods from `trainer/methods.py`)
4. sample on fixed evaluation seeds with `generate.sample`: plain CFG (the base), NPO guidance
   (negative LoRA on the unconditional rows) and SNPO (one LoRA on both rows, null prompt)
5. score (world reward, accuracy, realism), compare each method with plain CFG on the same
   prompt and seed (win rate, mean difference, seeded bootstrap 95% CIs; right->wrong counts),
   and write `report.md` with PNG grids and a plot.

`--json` prints ONE line: {"methods": {"npo": {...}, "snpo": {...}}, "base_mean_reward",
"base_accuracy", "report"}.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..core.offsets.schema import read_npo_metadata
from ..core.atomic import write_text


@dataclass
class DemoConfig:
    """Everything the demo does, in one place (recorded in results.json)."""

    out: str = "runs/demo"
    world: str | None = None
    pair_samples_per_prompt: int = 16  # base samples per prompt for the pairs (2 per pair)
    tie_margin: float = 0.05
    cfg_scale: float = 3.0
    sample_steps: int = 20
    scheduler: str = "ddim"
    eval_seeds: int = 10  # seeds per prompt in the evaluation
    eval_prompts: str = "all"  # "all" (30 prompts) or "plain" (10 class prompts)
    train_steps: int = 120
    batch_size: int = 8
    lr: float = 1e-3
    beta: float = 2000.0
    lam: float = 0.9
    lora_rank: int = 8
    lora_targets: str = "attn"
    npo_beta_offset: float = 1.0  # beta of the NPO offset at sampling (eps_neg from theta + beta*delta)
    methods: tuple = ("npo", "snpo")
    seed: int = 0
    n_boot: int = 5000
    extra: dict = field(default_factory=dict)

    @classmethod
    def quick(cls, **kw) -> "DemoConfig":
        """Tiny step counts for the smoke test (numbers mean nothing)."""
        return cls(**{"pair_samples_per_prompt": 2, "sample_steps": 4, "eval_seeds": 2, "eval_prompts": "plain",
                      "train_steps": 3, "batch_size": 4, "n_boot": 200, **kw})


# ----------------------------------------------------------------------------- pieces

def pixel_backend(world_dir, cfg):
    """DiffusersBackend on the world for `trainer.loop.train(cfg, backend=...)`.

    Single-channel pixel space: DiffusersBackend averages the RGB the data transforms give to grey.
    """
    from ..trainer.backends.diffusers import BackendOptions, DiffusersBackend, LoraOptions

    opts = BackendOptions(lora=LoraOptions(cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, cfg.lora_init or None, cfg.seed),
                          resolution=cfg.resolution)
    return DiffusersBackend.from_pretrained(str(world_dir), device="cpu", options=opts)


def train_config(world_dir, method: str, data, out_dir, dc: DemoConfig, **overrides):
    """A TrainConfig for `method` on the world (pairs JSONL, or a prompts file for data-free methods)."""
    from ..trainer.config import TrainConfig

    kw = dict(model=str(world_dir), method=method, data_kind="auto", data_path=[str(data)], resolution=8,
              batch_size=dc.batch_size, steps=dc.train_steps, lr=dc.lr, lr_scheduler="constant_with_warmup",
              lr_warmup_steps=min(20, dc.train_steps // 10), beta=dc.beta, lam=dc.lam, lora_rank=dc.lora_rank,
              lora_alpha=float(dc.lora_rank), lora_targets=dc.lora_targets, output_dir=str(out_dir),
              checkpoint_every=0, log_every=max(1, min(10, dc.train_steps)), validate_every=0, seed=dc.seed, cpu=True,
              weight_decay=0.0)
    kw.update(overrides)
    return TrainConfig(**kw)


def train_lora(world_dir, method, data, out_dir, dc: DemoConfig, **overrides):
    """Train one LoRA with the project's trainer; returns (TrainResult, seconds)."""
    from ..trainer.loop import train

    cfg = train_config(world_dir, method, data, out_dir, dc, **overrides)
    t0 = time.time()
    res = train(cfg, backend=pixel_backend(world_dir, cfg))
    if res.lora_path is None:
        raise RuntimeError(f"training {method} wrote no LoRA (steps done: {res.steps_done})")
    return res, time.time() - t0


def eval_prompts(kind: str) -> list[str]:
    from .build import all_prompts, prompt_for

    return all_prompts() if kind == "all" else [prompt_for(c) for c in range(10)]


SAMPLE_BATCH = 256  # images per generate.sample call


def sampling_bar(n_images: int, dc: DemoConfig, desc: str, calls: int = 1):
    """A tqdm bar (stderr) over the sampler steps of `calls` sample_run calls of `n_images` each."""
    from tqdm.auto import tqdm

    total = calls * -(-n_images // SAMPLE_BATCH) * dc.sample_steps
    return tqdm(total=total, desc=desc, unit="step", file=sys.stderr, dynamic_ncols=True, leave=False)


def sample_run(bundle, prompts, seeds, mode, offsets, dc: DemoConfig, progress=None,
               sigma_max: float | None = None) -> torch.Tensor:
    """Images [N, 8, 8] in [0, 1] (8-bit quantised, as saved) from generate.sample; `progress()` once per step;
    sigma_max: the offset of the unconditional rows only while σ_t <= sigma_max (generate.sample's gate)."""
    from ..diffusers_host.generate import sample
    from .pairs import quantize01

    out = []
    for i in range(0, len(prompts), SAMPLE_BATCH):
        res = sample(bundle, prompts[i:i + SAMPLE_BATCH], seeds[i:i + SAMPLE_BATCH], mode, offsets=offsets,
                     cfg_scale=dc.cfg_scale, steps=dc.sample_steps, scheduler=dc.scheduler, progress=progress,
                     sigma_max=sigma_max)
        out.append(quantize01(res.images.float().mean(1)))  # [n, 8, 8]
    return torch.cat(out)


def write_run(dirpath: Path, name: str, images, prompts, seeds, mode: str, extra: dict | None = None) -> Path:
    """PNGs + a manifest.json in the shape `evaluate` reads (and generate writes)."""
    from .pairs import to_png

    dirpath.mkdir(parents=True, exist_ok=True)
    items = []
    for k, (im, p, s) in enumerate(zip(images, prompts, seeds)):
        f = f"{k:04d}_s{s}.png"
        to_png(im, dirpath / f)
        items.append({"file": f, "prompt": p, "seed": int(s), "mode": mode})
    m = {"command": "demo", "run": name, "mode": mode, **(extra or {}), "images": items}
    write_text(dirpath / "manifest.json", json.dumps(m, indent=1) + "\n")
    return dirpath


def score_images(reward, images, prompts) -> dict[str, np.ndarray]:
    from .build import parse_prompt

    px = images.reshape(len(images), -1).numpy()
    labels = [parse_prompt(p)[0] for p in prompts]
    return {"reward": reward.reward(px, labels), "correct": reward.correct(px, labels), "realism": reward.realism(px)}


def summarize(base: dict, other: dict, n_boot: int, seed: int) -> dict:
    """Method vs base (same prompt, same seed): reward win rate + CIs, accuracy, right->wrong, realism."""
    from ..core.stats import paired_compare, right_to_wrong

    st = paired_compare(base["reward"], other["reward"], n_boot=n_boot, seed=seed)
    re = paired_compare(base["realism"], other["realism"], n_boot=n_boot, seed=seed)
    return {"win_rate": st.win_rate, "ci_low": st.ci_low, "ci_high": st.ci_high,
            "mean_reward": float(np.mean(other["reward"])), "reward_diff": st.mean_diff,
            "reward_diff_ci": [st.diff_ci_low, st.diff_ci_high],
            "accuracy": float(np.mean(other["correct"])), "right_to_wrong": right_to_wrong(base["correct"], other["correct"]),
            "wrong_to_right": right_to_wrong(other["correct"], base["correct"]),
            "realism": float(np.mean(other["realism"])), "realism_win_rate": re.win_rate,
            "realism_ci": [re.ci_low, re.ci_high], "n": st.n}


def method_grid(runs: dict[str, torch.Tensor], prompts: list[str], seeds: list[int], path: Path, columns: int = 4,
                scale: int = 8, pad: int = 2, gap: int = 12) -> Path:
    """Grid PNG for a person: one block per run (left to right, its name above), `columns`
    evaluation seeds wide, one row per digit class (its plain prompt, the class word at the left);
    each 8x8 image nearest-upsampled `scale` times. Same cell = same prompt and seed in every block."""
    from PIL import Image, ImageDraw

    from .build import CLASS_WORDS, prompt_for

    index = {(p, int(s)): i for i, (p, s) in enumerate(zip(prompts, seeds))}
    cols = sorted(set(int(s) for s in seeds))[:columns]
    rows = [c for c in range(10) if all((prompt_for(c), s) in index for s in cols)]
    if not rows:
        raise ValueError("method_grid: no plain digit prompt was sampled on all of the grid's seeds")
    cell, head, left = 8 * scale, 16, 44
    block = len(cols) * (cell + pad) - pad
    canvas = Image.new("L", (left + len(runs) * (block + gap), head + len(rows) * (cell + pad) + pad), 255)
    draw = ImageDraw.Draw(canvas)
    for r, c in enumerate(rows):
        draw.text((2, head + r * (cell + pad) + cell // 2 - 5), CLASS_WORDS[c], fill=0)
    for b, (name, imgs) in enumerate(runs.items()):
        x0 = left + b * (block + gap)
        draw.text((x0, 2), name, fill=0)
        for r, c in enumerate(rows):
            for k, s in enumerate(cols):
                a = np.round(imgs[index[(prompt_for(c), s)]].numpy() * 255).astype(np.uint8)
                im = Image.fromarray(a, mode="L").resize((cell, cell), Image.NEAREST)
                canvas.paste(im, (x0 + k * (cell + pad), head + r * (cell + pad)))
    canvas.save(path)
    return path


# ----------------------------------------------------------------------------- the demo

def run_demo(dc: DemoConfig, log=print) -> dict:
    from ..families.loading import load_model
    from ..core.offsets import load_offset
    from ..core.stats import PairedStats, markdown_table, paired_compare, plot_comparison
    from ..core.npo import role_spec
    from .build import all_prompts, ensure_world
    from .pairs import make_pairs
    from .plugin import register
    from .reward import DigitsReward

    t_start = time.time()
    out = Path(dc.out)
    out.mkdir(parents=True, exist_ok=True)
    world_dir = ensure_world(dc.world, log=log)
    register()  # the world family (a plug-in), before loading its model
    bundle = load_model(str(world_dir))
    reward = DigitsReward.for_world(world_dir)
    timings = {}

    # 2. preference pairs from the base model's own samples
    t0 = time.time()
    with sampling_bar(len(all_prompts()) * dc.pair_samples_per_prompt, dc, "pairs: base samples") as bar:
        base_sampler = lambda ps, ss: sample_run(bundle, ps, ss, "cfg", None, dc, progress=bar.update)  # noqa: E731
        pst = make_pairs(base_sampler, reward, out / "pairs", samples_per_prompt=dc.pair_samples_per_prompt,
                         tie_margin=dc.tie_margin)
    if pst.pairs == 0:
        raise RuntimeError(f"no preference pairs: all {pst.samples // 2} candidate pairs were near-ties")
    timings["pairs_s"] = time.time() - t0
    log(f"demo: {pst.pairs} pairs ({pst.dropped_ties} near-ties dropped) -> {pst.path}")

    # 3. train the LoRAs with the project's trainer
    loras, train_info = {}, {}
    for m in dc.methods:
        res, secs = train_lora(world_dir, m, pst.path, out / f"train_{m}", dc)
        loras[m] = res.lora_path
        train_info[m] = {"lora": str(res.lora_path), "steps": res.steps_done, "seconds": round(secs, 1),
                         "last_metrics": {k: float(v) for k, v in res.last_metrics.items() if isinstance(v, (int, float))}}
        timings[f"train_{m}_s"] = secs
        log(f"demo: trained {m} in {secs:.0f}s -> {res.lora_path}")

    # 4. sample on fixed seeds: plain CFG vs each method, same prompt and seed
    t0 = time.time()
    base_prompts = eval_prompts(dc.eval_prompts)
    prompts = [p for p in base_prompts for _ in range(dc.eval_seeds)]
    seeds = [s for _ in base_prompts for s in range(dc.eval_seeds)]
    unet_base = {"unet": bundle.unet, **{f"te{i + 1}": te for i, te in enumerate(bundle.text_encoders)}}

    def run(mode, offsets, name):
        with sampling_bar(len(prompts), dc, f"sample {name}") as bar:
            return sample_run(bundle, prompts, seeds, mode, offsets, dc, progress=bar.update)

    runs, modes = {"cfg": run("cfg", None, "cfg")}, {"cfg": "cfg"}
    for m in dc.methods:
        off = load_offset(str(loras[m]), unet_base)
        role = read_npo_metadata(off.metadata).get("role")  # the trainer writes the method's role
        if role not in ("negative", "snpo"):
            raise ValueError(f"{loras[m]}: the demo samples negative or snpo LoRAs; this one's role is {role!r}")
        modes[m], offsets = role_spec(role, off, beta=dc.npo_beta_offset)  # core.guidance.ROLE_SAMPLING
        runs[m] = run(modes[m], offsets, m)
    timings["sample_s"] = time.time() - t0

    # 5. score, compare, report
    scores = {k: score_images(reward, v, prompts) for k, v in runs.items()}
    methods = {m: summarize(scores["cfg"], scores[m], dc.n_boot, dc.seed) for m in dc.methods}
    for k, v in runs.items():
        write_run(out / "images" / k, k, v, prompts, seeds, modes[k],
                  {"world": str(world_dir), "cfg_scale": dc.cfg_scale, "steps": dc.sample_steps,
                   "lora": str(loras.get(k)) if k in loras else None})
    stats = {m: PairedStats(**{k: v for k, v in paired_compare(scores["cfg"]["reward"], scores[m]["reward"],
                                                               n_boot=dc.n_boot, seed=dc.seed).as_dict().items()})
             for m in dc.methods}
    plot = plot_comparison(stats, out / "win_rates.png", title="world reward vs plain CFG (same prompt and seed)")
    grid = method_grid(runs, prompts, seeds, out / "grid.png")
    base_mean, base_acc = float(scores["cfg"]["reward"].mean()), float(scores["cfg"]["correct"].mean())
    timings["total_s"] = time.time() - t_start
    result = {"methods": {m: {k: methods[m][k] for k in ("win_rate", "ci_low", "ci_high", "mean_reward", "accuracy",
                                                         "right_to_wrong")} for m in dc.methods},
              "base_mean_reward": base_mean, "base_accuracy": base_acc, "report": str(out / "report.md")}
    rows = [{"run": "plain CFG (base)", "mean_reward": base_mean, "accuracy": base_acc,
             "realism": float(scores["cfg"]["realism"].mean())}]
    for m in dc.methods:
        r = methods[m]
        rows.append({"run": m, "mean_reward": r["mean_reward"], "win_rate": r["win_rate"],
                     "ci": f"[{r['ci_low']:.3f}, {r['ci_high']:.3f}]", "accuracy": r["accuracy"],
                     "right_to_wrong": r["right_to_wrong"], "wrong_to_right": r["wrong_to_right"], "realism": r["realism"]})
    table = markdown_table(rows, [("run", "run"), ("mean_reward", "mean reward"), ("win_rate", "win rate vs CFG"),
                                  ("ci", "95% CI"), ("accuracy", "accuracy"), ("right_to_wrong", "right->wrong"),
                                  ("wrong_to_right", "wrong->right"), ("realism", "realism")])
    report = [
        "# NPO Suite demo on the digits world", "",
        f"World: `{world_dir}`. {len(base_prompts)} prompts x {dc.eval_seeds} seeds = {len(prompts)} images per run; "
        f"{dc.scheduler} {dc.sample_steps} steps, CFG scale {dc.cfg_scale}. Win rate = P(reward of the method > reward "
        f"of plain CFG) on the same prompt and seed (ties count half), 95% CI by seeded bootstrap over images "
        f"({dc.n_boot} resamples). Reward = p(prompted digit | image) of a classifier fitted on digits the "
        "generator never saw; accuracy = its argmax is the prompted digit; realism = -(k-NN distance to real digits)/scale "
        "(real digits ~ -1).", "",
        table, "",
        f"Pairs: {pst.pairs} from {pst.samples} base samples ({pst.dropped_ties} near-ties dropped, mean reward margin "
        f"{pst.mean_margin:.3f}). Training: " + "; ".join(f"{m}: {train_info[m]['steps']} steps, {train_info[m]['seconds']}s"
                                                          for m in dc.methods) +
        f" (beta {dc.beta}, lambda {dc.lam}, lr {dc.lr}, batch {dc.batch_size}, LoRA rank {dc.lora_rank}).", "",
        "![win rates](win_rates.png)", "",
        f"Samples, one block per run ({', '.join(runs)}, left to right): one row per digit (the plain prompt "
        "'a handwritten <digit>'), one column per evaluation seed; the same cell is the same prompt and seed "
        "(the same initial noise) in every block.", "", "![grid](grid.png)", "",
        f"Time: {timings['total_s']:.0f}s in all (" + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items() if k != "total_s") + ").",
    ]
    (out / "report.md").write_text("\n".join(report) + "\n", encoding="utf-8")
    full = {**result, "details": methods, "train": train_info, "pairs": {"n": pst.pairs, "dropped_ties": pst.dropped_ties},
            "timings": timings, "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in dc.__dict__.items()},
            "plot": str(plot), "grid": str(grid)}
    (out / "results.json").write_text(json.dumps(full, indent=2) + "\n", encoding="utf-8")
    return result
