"""Every method of the registry on the digits world, over several training seeds (docs/RESULTS.md).

    python -m npo_suite world results --methods dpo npo bdpo snpo snpo_naive tdft ddspo --seeds 0 1 2 \\
        --json --out runs/results [--report docs/RESULTS.md]

Each method of `trainer.methods.METHODS` is trained once per training seed with `trainer.loop.train`
(the demo's settings, world/demo.py::DemoConfig; the training seed sets the LoRA init, the data
order and the noise), sampled with `generate.sample` on the same prompts and evaluation seeds as
the base model (plain CFG), and scored by the world's reward. What a method needs comes from the
registry, never from its name:

    data (Method.data_kind)      pairs               the base model's own samples, labelled by the reward
                                 images_or_prompts   the generator split's real digits with their prompts
                                 prompts_with_winners  DDSPO's pairs: the base model's image for c (winner)
                                                     and for c⁻ (loser, same noise; ddspo_loser "generated"),
                                                     c⁻ by the world rewriter, as a ddspo-prepare folder
    sampling (Method.role)       positive            LoRA on both CFG branches (mode cfg)
                                 negative            LoRA on the unconditional branch, alpha 0, beta 1 (mode npo)
                                 snpo                one LoRA, null prompt unconditional (mode snpo)

Pooled over training seeds: every (prompt, evaluation seed, training seed) is one pair with the
base image of the same prompt and evaluation seed; the 95% CIs come from the two-stage bootstrap
of `core.stats.pooled_compare` (training seeds, then images). Resumable: each (method, seed) run
keeps its LoRA and its scores under OUT/runs/; a rerun with the same settings reuses them, a run
whose settings changed is redone (and says so). `--json` prints ONE line (`json_summary`).
"""
from __future__ import annotations

import csv
import hashlib
import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..core.atomic import atomic_path, write_text
from ..core.npo import role_spec
from .build import all_prompts
from .demo import DemoConfig, eval_prompts, sample_run, sampling_bar, score_images, train_lora

# What each paper says its method improves (its own evaluation), set beside what the world shows.
PAPER_CLAIMS = {
    "dpo": "Diffusion-DPO: human preference (PickScore, HPS, aesthetics) and prompt alignment",
    "npo": "Diffusion-NPO: preference scores of any base or preference-tuned model via negative guidance",
    "bdpo": "Diff-BDPO (Diff-SNPO paper): DPO's quality with the loser term bounded (stable training)",
    "snpo": "Diff-SNPO: preference scores above DPO/NPO with one network",
    "snpo_naive": "Diff-SNPO's ablation without the bound (lambda = 1)",
    "tdft": "Self-NPO: quality (HPS, ImageReward, aesthetics) with no preference data",
    "ddspo": "DDSPO: text-image alignment and visual quality with no labelled data",
}
SCORE_KEYS = ("reward", "correct", "realism")


def registered_methods() -> tuple[str, ...]:
    """The names of the one method registry, `trainer.methods.METHODS`, in its order."""
    from ..trainer.methods import METHODS

    return tuple(METHODS)


@dataclass
class ResultsConfig(DemoConfig):
    """The demo's settings plus the methods, the training seeds and DDSPO's data size."""

    out: str = "runs/results"
    methods: tuple = field(default_factory=registered_methods)  # every method of trainer.methods.METHODS
    seeds: tuple = (0, 1, 2)
    ddspo_samples_per_prompt: int = 8  # DDSPO winners (and losers) per prompt
    rewriter: str = "world_digits"  # DDSPO's c⁻ (trainer.ddspo.REWRITERS; world/rewrite.py)
    # Per-method TrainConfig overrides. DDSPO: its paper's beta 16000 with lr scaled so that beta*lr equals
    # the DPO family's (2000 * 1e-3): lr must follow beta (docs/training.md "Learning rate and beta";
    # the authors' script scales lr as 1/beta too). Recorded in every run's stamp.
    method_overrides: dict = field(default_factory=lambda: {"ddspo": {"lr": 1.25e-4}})

    @classmethod
    def quick(cls, **kw) -> "ResultsConfig":
        """Tiny step counts for the smoke test (numbers mean nothing)."""
        return super().quick(**{"ddspo_samples_per_prompt": 1, **kw})


# ----------------------------------------------------------------------------- small io helpers

def _atomic_json(path: Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=1, sort_keys=True) + "\n")


def _save_scores(path: Path, scores: dict) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **{k: np.asarray(scores[k]) for k in SCORE_KEYS})


def _load_scores(path: Path) -> dict:
    with np.load(path) as z:
        return {k: z[k] for k in SCORE_KEYS}


def _stamp_matches(path: Path, stamp: dict) -> bool:
    return path.is_file() and json.loads(path.read_text(encoding="utf-8")).get("stamp") == stamp


def _data_sha1(path: Path) -> str:
    """Identity of a run's training data: the JSONL file, or a ddspo-prepare folder's manifest."""
    from ..core.ddspo_format import MANIFEST_NAME

    return hashlib.sha1((path / MANIFEST_NAME if path.is_dir() else path).read_bytes()).hexdigest()


def _world_id(world_dir: Path) -> str:
    return hashlib.sha1((world_dir / "world.json").read_bytes()).hexdigest()[:12]


# ----------------------------------------------------------------------------- the data of each kind

class Context:
    """What every run shares: the world, the base model, the reward, the evaluation set, the data."""

    def __init__(self, rc: ResultsConfig, log):
        from ..families.loading import load_model
        from .build import ensure_world
        from .plugin import register
        from .reward import DigitsReward

        self.rc, self.log, self.out = rc, log, Path(rc.out)
        self.world_dir = ensure_world(rc.world, log=log)
        self.world_id = _world_id(self.world_dir)
        register()  # the world family (a plug-in), before loading its model
        self.bundle = load_model(str(self.world_dir))
        self.reward = DigitsReward.for_world(self.world_dir)
        base_prompts = eval_prompts(rc.eval_prompts)
        self.prompts = [p for p in base_prompts for _ in range(rc.eval_seeds)]
        self.seeds = [s for _ in base_prompts for s in range(rc.eval_seeds)]
        self._data: dict[str, Path] = {}

    def load_lora(self, path):
        """A trained LoRA file as an Offset on the base model's UNet and text encoders."""
        from ..core.offsets import load_offset

        return load_offset(str(path), {"unet": self.bundle.unet,
                                       **{f"te{i + 1}": te for i, te in enumerate(self.bundle.text_encoders)}})

    def sample(self, prompts, seeds, mode="cfg", offsets=None, desc="sample", sigma_max=None):
        with sampling_bar(len(prompts), self.rc, desc) as bar:
            return sample_run(self.bundle, prompts, seeds, mode, offsets, self.rc, progress=bar.update,
                              sigma_max=sigma_max)

    def base_sampler(self, bar):
        """sample_fn(prompts, seeds) of plain CFG for world/pairs.py, advancing `bar` per step."""
        return lambda ps, ss: sample_run(self.bundle, ps, ss, "cfg", None, self.rc, progress=bar.update)

    def sampling_stamp(self) -> dict:
        rc = self.rc
        return {"world": self.world_id, "cfg_scale": rc.cfg_scale, "steps": rc.sample_steps, "scheduler": rc.scheduler,
                "eval_prompts": rc.eval_prompts, "eval_seeds": rc.eval_seeds}

    def cached(self, name: str, stamp: dict, build) -> Path:
        """OUT/data/<name>: built once by `build(dir) -> file or folder in dir`, reused while `stamp` is unchanged."""
        d = self.out / "data" / name
        marker = d / "done.json"
        if _stamp_matches(marker, stamp):
            return d / json.loads(marker.read_text(encoding="utf-8"))["file"]
        shutil.rmtree(d, ignore_errors=True)
        t0 = time.time()
        f = build(d)
        _atomic_json(marker, {"stamp": stamp, "file": f.name, "seconds": round(time.time() - t0, 1)})
        self.log(f"results: {name} data -> {f} ({time.time() - t0:.0f}s)")
        return f

    def data(self, kind: str) -> Path:
        """The training data of a Method.data_kind (built on first use)."""
        if kind not in self._data:
            if kind not in DATA_KINDS:
                raise ValueError(f"no world data for method data kind {kind!r} (expected one of {sorted(DATA_KINDS)})")
            self._data[kind] = DATA_KINDS[kind](self)
        return self._data[kind]


def pair_data(ctx: Context) -> Path:
    """Preference pairs from the base model's own samples (world/pairs.py::make_pairs)."""
    from .pairs import make_pairs

    rc = ctx.rc
    stamp = {**ctx.sampling_stamp(), "samples_per_prompt": rc.pair_samples_per_prompt, "tie_margin": rc.tie_margin}

    def build(d):
        with sampling_bar(len(all_prompts()) * rc.pair_samples_per_prompt, rc, "pairs: base samples") as bar:
            st = make_pairs(ctx.base_sampler(bar), ctx.reward, d, samples_per_prompt=rc.pair_samples_per_prompt,
                            tie_margin=rc.tie_margin)
        if st.pairs == 0:
            raise RuntimeError(f"no preference pairs: all {st.samples // 2} candidate pairs were near-ties")
        ctx.log(f"results: {st.pairs} pairs ({st.dropped_ties} near-ties dropped)")
        return st.path
    return ctx.cached("pairs", stamp, build)


def real_image_data(ctx: Context) -> Path:
    """The generator split's real digits with their prompts (world/pairs.py::write_real_images)."""
    from .build import load_world_splits
    from .pairs import write_real_images

    return ctx.cached("real_images", {"world": ctx.world_id},
                      lambda d: write_real_images(load_world_splits(ctx.world_dir)["gen"], d))


def ddspo_data(ctx: Context) -> Path:
    """DDSPO's winners (c) and losers (c⁻, same noise) from the base model, as a ddspo-prepare folder
    (world/pairs.py::make_ddspo_data)."""
    from ..trainer.ddspo import build_rewriter
    from .pairs import make_ddspo_data

    rc = ctx.rc
    stamp = {**ctx.sampling_stamp(), "samples_per_prompt": rc.ddspo_samples_per_prompt, "rewriter": rc.rewriter}
    settings = {"model": str(ctx.world_dir), "losers": "generate", "rewriter": rc.rewriter, "steps": rc.sample_steps,
                "cfg": rc.cfg_scale}

    def build(d):
        n = len(all_prompts()) * rc.ddspo_samples_per_prompt
        with sampling_bar(n, rc, "ddspo: winners and losers", calls=2) as bar:
            folder = make_ddspo_data(ctx.base_sampler(bar), build_rewriter(rc.rewriter), d / "prepared",
                                     samples_per_prompt=rc.ddspo_samples_per_prompt, settings=settings)
        return folder
    return ctx.cached("ddspo", stamp, build)


# Method.data_kind -> the world data it trains on. The only list of these kinds here.
DATA_KINDS = {"pairs": pair_data, "images_or_prompts": real_image_data, "prompts_with_winners": ddspo_data}


# ----------------------------------------------------------------------------- one (method, seed) run

def base_scores(ctx: Context) -> dict:
    """Plain-CFG scores of the base model on the evaluation set (cached in OUT/runs/base)."""
    d = ctx.out / "runs" / "base"
    stamp = ctx.sampling_stamp()
    if _stamp_matches(d / "run.json", stamp) and (d / "scores.npz").is_file():
        return _load_scores(d / "scores.npz")
    scores = score_images(ctx.reward, ctx.sample(ctx.prompts, ctx.seeds, desc="sample base"), ctx.prompts)
    d.mkdir(parents=True, exist_ok=True)
    _save_scores(d / "scores.npz", scores)
    _atomic_json(d / "run.json", {"stamp": stamp})
    return scores


def run_one(ctx: Context, name: str, seed: int) -> dict:
    """Train `name` with training seed `seed` (or reuse a finished run with the same settings), sample, score.

    Returns {"scores": {reward, correct, realism} [N], "train_seconds", "sample_seconds", "llr", "reused"}.
    """
    from ..trainer.methods import METHODS
    from .demo import train_config

    method = METHODS[name]
    rc = ctx.rc
    run_dir = ctx.out / "runs" / name / f"seed{seed}"
    train_dir = ctx.out / "train" / f"{name}_seed{seed}"
    data = ctx.data(method.data_kind)
    overrides = {"seed": seed, "ddspo_rewriter": rc.rewriter, **rc.method_overrides.get(name, {})}
    cfg = train_config(ctx.world_dir, name, data, train_dir, rc, **overrides)
    stamp = {"train": {k: v for k, v in cfg.to_dict().items() if k != "output_dir"},
             "data_sha1": _data_sha1(data), "sampling": ctx.sampling_stamp(),
             "role": method.role}
    stamp = json.loads(json.dumps(stamp, default=str))  # as it reads back from run.json
    if _stamp_matches(run_dir / "run.json", stamp) and (run_dir / "scores.npz").is_file():
        info = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))
        return {**info["summary"], "scores": _load_scores(run_dir / "scores.npz"), "reused": True}
    if run_dir.exists():
        ctx.log(f"results: {name} seed {seed}: settings differ from the stored run (or it is unfinished); redoing it")
    shutil.rmtree(run_dir, ignore_errors=True)
    shutil.rmtree(train_dir, ignore_errors=True)
    tr, train_s = train_lora(ctx.world_dir, name, data, train_dir, rc, **overrides)
    mode, offsets = role_spec(method.role, ctx.load_lora(tr.lora_path))  # core.guidance.ROLE_SAMPLING
    t0 = time.time()
    scores = score_images(ctx.reward, ctx.sample(ctx.prompts, ctx.seeds, mode, offsets, desc=f"sample {name} s{seed}"),
                          ctx.prompts)
    summary = {"train_seconds": round(train_s, 1), "sample_seconds": round(time.time() - t0, 1), "mode": mode,
               "steps": tr.steps_done, "lora": str(tr.lora_path), "llr": llr_trajectory(train_dir / "metrics.csv")}
    run_dir.mkdir(parents=True, exist_ok=True)
    _save_scores(run_dir / "scores.npz", scores)
    _atomic_json(run_dir / "run.json", {"stamp": stamp, "summary": summary})  # the run counts as done from here
    return {**summary, "scores": scores, "reused": False}


def metric_log(metrics_csv: Path, key: str) -> list[float]:
    """The logged values of one trainer metric (metrics.csv column `key`), in step order; [] if never logged."""
    if not metrics_csv.is_file():
        return []
    with open(metrics_csv, newline="") as f:
        return [float(r[key]) for r in csv.DictReader(f) if r.get(key) not in (None, "")]


def llr_trajectory(metrics_csv: Path) -> dict:
    """`llr/winner` (mse_policy_w - mse_ref_w, trainer metric) at the first and last logged steps, mean,
    fraction > 0; and the last logged `logit/saturated_frac` (pairs with |logit| > 10) where logged."""
    v = metric_log(metrics_csv, "llr/winner")
    sat = metric_log(metrics_csv, "logit/saturated_frac")
    out = {"saturated_last": sat[-1]} if sat else {}
    if v:
        out.update(first=v[0], last=v[-1], mean=float(np.mean(v)), frac_positive=float(np.mean(np.array(v) > 0)),
                   n=len(v))
    return out


# ----------------------------------------------------------------------------- pooling

def pooled_summary(base: dict, runs: list[dict], n_boot: int, seed: int) -> dict:
    """One method's figures over its training runs (each paired with the base on the same prompt and seed)."""
    from ..core.stats import pooled_compare, right_to_wrong

    def stack(key, src):
        return np.stack([s[key] for s in src])  # [G, N]

    others = [r["scores"] for r in runs]
    bases = [base] * len(runs)
    rew = pooled_compare(stack("reward", bases), stack("reward", others), n_boot=n_boot, seed=seed)
    rea = pooled_compare(stack("realism", bases), stack("realism", others), n_boot=n_boot, seed=seed)
    cb, co = stack("correct", bases), stack("correct", others)
    return {"win_rate": rew.win_rate, "ci_low": rew.ci_low, "ci_high": rew.ci_high,
            "realism_win_rate": rea.win_rate, "realism_ci_low": rea.ci_low,
            "mean_reward": rew.mean_b, "accuracy": float(co.mean()),
            "right_to_wrong": right_to_wrong(cb.reshape(-1), co.reshape(-1)),
            "wrong_to_right": right_to_wrong(co.reshape(-1), cb.reshape(-1))}


def per_seed_summary(base: dict, run: dict) -> dict:
    from ..core.stats import paired_compare, right_to_wrong

    s = run["scores"]
    st = paired_compare(base["reward"], s["reward"], n_boot=1000, seed=0)
    return {"win_rate": st.win_rate, "mean_reward": st.mean_b, "accuracy": float(np.mean(s["correct"])),
            "realism": float(np.mean(s["realism"])), "right_to_wrong": right_to_wrong(base["correct"], s["correct"]),
            "wrong_to_right": right_to_wrong(s["correct"], base["correct"]),
            "train_seconds": run["train_seconds"], "sample_seconds": run["sample_seconds"], "llr": run["llr"]}


def run_results(rc: ResultsConfig, log=None) -> dict:
    """Every (method, seed) run, then the pooled figures; writes OUT/results.json and OUT/results.md."""
    from ..trainer.methods import METHODS

    log = log or (lambda *a: print(*a, file=sys.stderr))
    unknown = [m for m in rc.methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown} (the registry has {list(METHODS)})")
    if not rc.seeds:
        raise ValueError("no training seeds")
    t_start = time.time()
    ctx = Context(rc, log)
    base = base_scores(ctx)
    runs: dict[str, list[dict]] = {}
    from tqdm.auto import tqdm

    tasks = [(m, s) for m in rc.methods for s in rc.seeds]
    for m, s in tqdm(tasks, desc="results: runs", file=sys.stderr, dynamic_ncols=True):
        r = run_one(ctx, m, int(s))
        runs.setdefault(m, []).append(r)
        log(f"results: {m} seed {s}: {'reused' if r['reused'] else 'trained'}; win "
            f"{per_seed_summary(base, r)['win_rate']:.3f}")
    methods = {m: {**pooled_summary(base, rs, rc.n_boot, 0), "seeds": [int(s) for s in rc.seeds]}
               for m, rs in runs.items()}
    result = {"methods": methods, "base_accuracy": float(np.mean(base["correct"])),
              "base_mean_reward": float(np.mean(base["reward"]))}
    details = {"base_realism": float(np.mean(base["realism"])), "n_per_seed": len(ctx.prompts),
               "per_seed": {m: {str(s): per_seed_summary(base, r) for s, r in zip(rc.seeds, rs)} for m, rs in runs.items()},
               "roles": {m: METHODS[m].role for m in runs}, "data_kinds": {m: METHODS[m].data_kind for m in runs},
               "world": str(ctx.world_dir), "world_id": ctx.world_id, "seconds": round(time.time() - t_start, 1),
               "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in rc.__dict__.items()}}
    _atomic_json(ctx.out / "results.json", {**result, "details": details})
    write_text(ctx.out / "results.md", markdown(result, details))
    return {**result, "details": details}


SUMMARY_KEYS = ("methods", "base_accuracy", "base_mean_reward")


def json_summary(result: dict) -> dict:
    """The pooled figures of a `run_results` result: what `world results --json` prints as ONE line."""
    return {k: result[k] for k in SUMMARY_KEYS}


# ----------------------------------------------------------------------------- the Markdown report

BEGIN, END = "<!-- results:begin (written by python -m npo_suite world results) -->", "<!-- results:end -->"
# the flow world's block (world results --world flow): its own markers, so the eps tables are never touched
MARKERS = {"eps": (BEGIN, END),
           "flow": ("<!-- results-flow:begin (written by python -m npo_suite world results --world flow) -->",
                    "<!-- results-flow:end -->")}


def world_kind(world) -> str:
    """"eps" or "flow": a kind name as given, else the manifest's `kind` of a world folder (eps when absent)."""
    from .build import WORLD_KINDS, resolve_world

    if world is None:
        return "eps"
    if str(world) in WORLD_KINDS:
        return str(world)
    f = resolve_world(world) / "world.json"
    return json.loads(f.read_text(encoding="utf-8")).get("kind", "eps") if f.is_file() else "eps"


def markdown(result: dict, details: dict) -> str:
    """The tables of docs/RESULTS.md: pooled figures with the paper's claim, per seed, llr/winner."""
    from ..core.stats import markdown_table

    rc = details["config"]
    n, seeds = details["n_per_seed"], rc["seeds"]
    rows = [{"method": "base (plain CFG)", "mean_reward": result["base_mean_reward"], "accuracy": result["base_accuracy"]}]
    for m, r in result["methods"].items():
        rows.append({**r, "method": f"{m} ({details['roles'][m]})", "ci": f"[{r['ci_low']:.3f}, {r['ci_high']:.3f}]",
                     "claim": PAPER_CLAIMS.get(m, ""), "guard": f"{r['right_to_wrong']} / {r['wrong_to_right']}"})
    main = markdown_table(rows, [("method", "method (LoRA role)"), ("win_rate", "win rate"), ("ci", "95% CI"),
                                 ("realism_win_rate", "realism win rate"), ("realism_ci_low", "realism CI low"),
                                 ("mean_reward", "mean reward"), ("accuracy", "accuracy"),
                                 ("guard", "right->wrong / wrong->right"), ("claim", "the paper says it improves")])
    seed_rows = [{"method": m, "seed": s, **v, "saturated": (v["llr"] or {}).get("saturated_last")}
                 for m, per in details["per_seed"].items() for s, v in per.items()]
    per_seed = markdown_table(seed_rows, [("method", "method"), ("seed", "training seed"), ("win_rate", "win rate"),
                                          ("mean_reward", "mean reward"), ("accuracy", "accuracy"),
                                          ("right_to_wrong", "right->wrong"), ("wrong_to_right", "wrong->right"),
                                          ("realism", "realism"), ("saturated", "saturated logits (last log)"),
                                          ("train_seconds", "train s"),
                                          ("sample_seconds", "sample s")])
    llr_rows = []
    for m, per in details["per_seed"].items():
        traj = [v["llr"] for v in per.values() if "first" in (v["llr"] or {})]
        if traj:  # only methods whose trainer logs llr/winner (the pair methods)
            llr_rows.append({"method": m, **{k: float(np.mean([t[k] for t in traj])) for k in ("first", "last", "mean",
                                                                                               "frac_positive")}})
    llr = markdown_table(llr_rows, [("method", "method"), ("first", "first log"), ("last", "last log"),
                                    ("mean", "mean of logs"), ("frac_positive", "fraction > 0")]) if llr_rows else ""
    return "\n".join([
        f"Command: `python -m npo_suite world results "
        f"{'--world ' + str(rc['world']) + ' ' if rc.get('world') else ''}--methods {' '.join(result['methods'])} --seeds "
        f"{' '.join(map(str, seeds))} --json --out {rc['out']}` ({details['seconds'] / 60:.1f} min; world "
        f"`{details['world_id']}`). Per training seed {n} images ({rc['eval_prompts']} prompts x {rc['eval_seeds']} "
        f"seeds), {rc['scheduler']} {rc['sample_steps']} steps, CFG {rc['cfg_scale']}; training {rc['train_steps']} "
        f"steps, batch {rc['batch_size']}, lr {rc['lr']}, beta {rc['beta']}, LoRA rank {rc['lora_rank']}, per-method "
        f"overrides {json.dumps(rc['method_overrides'])}, every other setting the method's default. Win rate = "
        "P(method's reward > base's on the same prompt and evaluation seed), ties half, pooled over training seeds; "
        f"95% CI by the two-stage bootstrap (training seeds, then images; {rc['n_boot']} resamples). Base realism "
        f"{details['base_realism']:.3f}.", "", main, "", "Per training seed:", "", per_seed, "",
        "Winner log-likelihood ratio `llr/winner` (mse_policy(winner) - mse_ref(winner); > 0: the winner's likelihood "
        "fell), mean over training seeds of each run's logs:", "", llr])


def write_report(path: Path, body: str, kind: str = "eps") -> Path:
    """Put `body` between the BEGIN/END markers of `kind` (MARKERS) in `path` (the rest of the file is kept); a new
    file gets just them."""
    BEGIN, END = MARKERS[kind]  # noqa: N806
    text = path.read_text(encoding="utf-8") if path.is_file() else f"{BEGIN}\n{END}\n"
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        raise ValueError(f"{path}: needs exactly one {BEGIN!r} ... {END!r} block to replace")
    head, rest = text.split(BEGIN)
    tail = rest.split(END)[1]
    return write_text(path, f"{head}{BEGIN}\n{body}\n{END}{tail}")
