"""`python -m npo_suite generate`: batch generation with cfg / npo / snpo guidance.

The sampling loop is ours (diffusers schedulers' `set_timesteps`, `scale_model_input`, `step`):
each step is ONE batched UNet forward (rows [0, B) conditional, [B, 2B) unconditional) in which
`core.branch_lora` gives each half its own weight offset, then `core.guidance.guide` combines
the halves (METHODS.md "NPO guidance at sampling time"). `sample()` is the library entry point
(the demo and the evaluation call it); `main()` is the CLI.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..core.atomic import atomic_path
from ..core.branch_lora import branch_offsets
from ..core.conditioning import encode_text, vae_decode
from ..core.guidance import GUIDANCE, MODES, RESCALE_SPACES, guide, offset_active
from ..core.npo import ALPHA_DEFAULT, BETA_DEFAULT, COND, UNCOND, NPOSpec, row_groups
from ..core.offsets.types import Offset
from ..core.sampling import sample_scheduler
from ..core.cond import Cond
from ..core.prompts import read_prompts_file
from ..core.summary import DataSummary

SCHEDULERS = ("ddim", "euler", "dpmpp")
NPO_PATHS = ("fast", "two-model")


def build_scheduler(name: str, base):
    """A fresh diffusers scheduler of kind `name` built from the model's own scheduler config."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

    classes = {"ddim": DDIMScheduler, "euler": EulerDiscreteScheduler, "dpmpp": DPMSolverMultistepScheduler}
    if name not in classes:
        raise ValueError(f"unknown scheduler {name!r} (expected one of {SCHEDULERS})")
    extra = {"algorithm_type": "dpmsolver++"} if name == "dpmpp" else {}
    return classes[name].from_config(base.config, **extra)


def Offsets(pos: Offset | None = None, neg: Offset | None = None, snpo: Offset | None = None,  # noqa: N802
            alpha: float = ALPHA_DEFAULT, beta: float = BETA_DEFAULT) -> NPOSpec:
    """generate's names for `core.npo.NPOSpec`: pos = eta, neg = delta, snpo = the SNPO LoRA s; any may be None."""
    return NPOSpec(eta=pos, delta=neg, alpha=alpha, beta=beta, snpo=snpo)


@dataclass
class SampleResult:
    latents: torch.Tensor  # [N, C, h, w] final latents (pixels for pixel-space models)
    images: torch.Tensor | None  # [N, 3 or 1, H, W] in [0, 1], None when decode=False


# ----------------------------------------------------------------------------------------------
# Text conditioning
# ----------------------------------------------------------------------------------------------
def _run_te(te, i: int, ids: torch.Tensor, groups, rows):
    """Encoder i's forward with each prompt's offset group on its rows (core.conditioning `run`)."""
    comp = f"te{i + 1}"
    active = {g: [(o, w) for o, w in terms if o.text_encoders.get(comp)] for g, terms in (groups or {}).items()}
    if not any(active.values()):
        return te(ids, output_hidden_states=True)
    with branch_offsets(te, active, rows=[r if active.get(r) else None for r in rows], component=comp):
        return te(ids, output_hidden_states=True)


def encode_prompts(bundle, prompts: list[str], groups=None, rows=None) -> Cond:
    """Text conditioning of `prompts` [B]; rows[i] names the offset group of prompt i's text encoder.

    SD1.x / world: last hidden state of the CLIP encoder. SDXL: penultimate hidden states of both
    encoders concatenated, pooled projection of the second; empty prompts give zeros when the
    pipeline says `force_zeros_for_empty_prompt` (what SDXL saw under dropout).
    """
    rows = list(rows) if rows is not None else [None] * len(prompts)
    dev = bundle.device
    with torch.no_grad():
        hidden, pooled = encode_text(bundle.tokenizers, bundle.text_encoders, prompts, dev,
                                     sdxl=bundle.family == "sdxl",
                                     run=lambda i, te, ids: _run_te(te, i, ids, groups, rows))
        if pooled is None:
            return Cond(hidden.to(bundle.dtype))  # [B, L, D]
        if bundle.force_zeros_for_empty_prompt:
            empty = torch.tensor([p == "" for p in prompts], device=dev)
            hidden = torch.where(empty[:, None, None], torch.zeros_like(hidden), hidden)
            pooled = torch.where(empty[:, None], torch.zeros_like(pooled), pooled)
        return Cond(hidden.to(bundle.dtype), {"text_embeds": pooled.to(bundle.dtype)})


def _time_ids(batch: int, height: int, width: int, dtype, device) -> torch.Tensor:
    """SDXL micro-conditioning (original size, crop top-left, target size), in pixels: [B, 6]."""
    return torch.tensor([[height, width, 0, 0, height, width]], dtype=dtype, device=device).repeat(batch, 1)


# ----------------------------------------------------------------------------------------------
# Predictors: fast path (one forward, per-row offsets) and two-model path
# ----------------------------------------------------------------------------------------------
class _TwoModel:
    """The general path: one materialised copy of the UNet per distinct group, one forward per group."""

    def __init__(self, unet, groups):
        from ..core.offsets import materialize

        self.models = {g: (materialize(unet, [(o, w) for o, w in terms]) if terms else unet) for g, terms in groups.items()}
        self.rows = None

    def set_rows(self, rows):
        self.rows = list(rows)

    def __call__(self, x, t, hidden, added):
        out = torch.empty_like(x)
        for g in dict.fromkeys(self.rows):
            idx = torch.tensor([i for i, r in enumerate(self.rows) if r == g], device=x.device)
            sel = {k: v[idx] for k, v in added.items()}
            out[idx] = self.models[g](x[idx], t, encoder_hidden_states=hidden[idx], added_cond_kwargs=sel or None).sample
        return out


# ----------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------
def sample(bundle, prompts: list[str], seeds: list[int], mode: str = "cfg", *, negative_prompts: list[str] | None = None,
           offsets: NPOSpec | None = None, cfg_scale: float = 7.5, steps: int = 20, scheduler: str = "ddim",
           sigma_min: float | None = None, sigma_max: float | None = None, height: int | None = None,
           width: int | None = None, rescale: float = 0.0, rescale_space: str = "x0", npo_path: str = "fast",
           decode: bool = True, progress=None) -> SampleResult:
    """Generate one image per (prompts[i], seeds[i]) with guidance `mode` (a key of core.guidance.MODES).

    Same seed -> same initial noise in every mode, so modes compare image by image. The offset of
    the unconditional rows is on only while sigma_min <= sigma_t <= sigma_max (plain CFG elsewhere).
    progress: an optional callable called once per step (e.g. a tqdm bar's update).
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r} (expected one of {sorted(MODES)})")
    if len(prompts) != len(seeds) or not prompts:
        raise ValueError(f"sample: need one seed per prompt, got {len(prompts)} prompts and {len(seeds)} seeds")
    if npo_path not in NPO_PATHS:
        raise ValueError(f"unknown npo_path {npo_path!r} (expected one of {NPO_PATHS})")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    spec, offsets = MODES[mode], offsets or NPOSpec()
    groups = offsets.groups()
    b, dev, dt, unet = len(prompts), bundle.device, bundle.dtype, bundle.unet
    negs = [""] * b if spec.uncond == "null" or negative_prompts is None else list(negative_prompts)
    gate = spec.neg_group != spec.pos_group
    # 1. conditioning: cond rows, uncond rows (neg group), uncond rows with the pos group (outside the interval)
    cond = encode_prompts(bundle, prompts, groups, [spec.pos_group] * b)
    unc = encode_prompts(bundle, negs, groups, [spec.neg_group] * b)
    unc_off = encode_prompts(bundle, negs, groups, [spec.pos_group] * b) if gate else unc
    ls = bundle.latent_scale
    height = height or unet.config.sample_size * ls
    width = width or unet.config.sample_size * ls
    if height % ls or width % ls:
        raise ValueError(f"height/width must be multiples of {ls}, got {height}x{width}")
    added_extra = {"time_ids": _time_ids(2 * b, height, width, dt, dev)} if bundle.family == "sdxl" else {}
    # 2. initial noise, one generator per seed
    sched = build_scheduler(scheduler, bundle.scheduler)
    sched.set_timesteps(steps, device=dev)
    shape = (unet.config.in_channels, height // ls, width // ls)
    latents = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])
    latents = (latents * sched.init_noise_sigma).to(dev, dt)  # [B, C, h, w]
    abar = sched.alphas_cumprod.to(torch.float64)
    predictor = _TwoModel(unet, groups) if npo_path == "two-model" else None
    with torch.no_grad(), (branch_offsets(unet, groups) if predictor is None else contextlib.nullcontext()) as br:
        predictor = predictor or _Fast(unet, br)

        def model(x_in: torch.Tensor, t) -> torch.Tensor:
            # 3. the unconditional rows' model for this step (sigma interval gate)
            a_t = abar[int(round(float(t)))].clamp(1e-12, 1.0)
            active = not gate or offset_active(float(((1 - a_t) / a_t).sqrt()), sigma_min, sigma_max)
            u = unc if active else unc_off
            predictor.set_rows(row_groups([COND] * b + [UNCOND] * b, mode, active))
            # 4. one batched forward: [2B, C, h, w]
            added = {**{k: torch.cat([cond.added[k], u.added[k]]) for k in cond.added}, **added_extra}
            pos, neg = predictor(torch.cat([x_in, x_in]), t, torch.cat([cond.hidden, u.hidden]), added).chunk(2)
            # 5. combine in the model's own output space (the scheduler steps on it)
            return guide(mode, pos, neg, cfg_scale, rescale=rescale, rescale_space=rescale_space, x_t=x_in,
                         abar_t=a_t.to(dt), prediction_type=bundle.prediction_type)

        latents = sample_scheduler(model, latents, sched, progress)
    return SampleResult(latents, decode_latents(bundle, latents) if decode else None)


class _Fast:
    """The fast path: per-row offsets via branch_offsets hooks, one forward."""

    def __init__(self, unet, br):
        self.unet, self.br = unet, br

    def set_rows(self, rows):
        self.br.set_rows(rows)

    def __call__(self, x, t, hidden, added):
        return self.unet(x, t, encoder_hidden_states=hidden, added_cond_kwargs=added or None).sample


def decode_latents(bundle, latents: torch.Tensor) -> torch.Tensor:
    """Latents -> images [N, C, H, W] in [0, 1] (pixel space: the latents are pixels in [-1, 1])."""
    with torch.no_grad():
        x = vae_decode(bundle.vae, latents)  # [N, C, H, W] in [-1, 1]
    return ((x + 1) / 2).clamp(0, 1).cpu()


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="diffusers folder, single-file .safetensors (with --tokenizer), or pixel-space world folder")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts", help="a .txt file (one prompt a line) or .jsonl ({prompt, negative_prompt?, seed?}; "
                                     "neg_prompt accepted for negative_prompt, docs/data.md)")
    p.add_argument("--negative-prompt", default="", help="negative prompt of every --prompt / .txt prompt (cfg, npo)")
    p.add_argument("--modes", nargs="+", default=["cfg", "npo"], choices=list(GUIDANCE), help="guidance modes (same seeds)")
    p.add_argument("--pos-offset", help="positive offset eta (LoRA/diff file), applied to the conditional rows")
    p.add_argument("--alpha", type=float, default=ALPHA_DEFAULT, help="weight of eta in the negative model "
                   "(theta+alpha*eta+beta*delta; default as in the NPO paper, see docs/guidance.md)")
    p.add_argument("--neg-offset", help="negative offset delta (NPO LoRA), applied to the unconditional rows")
    p.add_argument("--beta", type=float, default=BETA_DEFAULT,
                   help="weight of delta in the negative model (npo) and of the SNPO LoRA (snpo)")
    p.add_argument("--snpo-offset", help="SNPO LoRA s for --modes snpo: both branches run theta+eta+beta*s")
    p.add_argument("--cfg", type=float, default=7.5, help="guidance weight w (papers: omega = w - 1)")
    p.add_argument("--rescale", type=float, default=0.0, help="CFG rescale phi (Lin et al. 2023), 0 = off")
    p.add_argument("--rescale-space", default="x0", choices=list(RESCALE_SPACES), help="space of the CFG rescale")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--scheduler", default="ddim", choices=list(SCHEDULERS))
    p.add_argument("--sigma-min", type=float, default=None, help="negative offset on only for sigma >= this")
    p.add_argument("--sigma-max", type=float, default=None, help="negative offset on only for sigma <= this")
    p.add_argument("--height", type=int, default=None, help="pixels (default: the model's native size)")
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds of every prompt without its own")
    p.add_argument("--batch-size", type=int, default=4, help="images per forward (x2 rows for the two branches)")
    p.add_argument("--npo-path", default="fast", choices=list(NPO_PATHS), help="fast: per-row offsets, one forward; "
                   "two-model: merged copies (needed for offsets on norm layers)")
    p.add_argument("--tokenizer", help="CLIP tokenizer folder (required for single-file checkpoints)")
    p.add_argument("--family", choices=["sd1", "sdxl", "world"], default=None)
    p.add_argument("--allow-pickle", action="store_true", help="allow .ckpt/.pt/.bin files (trusted files only)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", required=True, help="output folder: images, grid.png, manifest.json")


def read_prompts(args) -> list[dict]:
    """[{prompt, negative_prompt, seeds}] from --prompt and --prompts (.txt or .jsonl), the file read by the
    trainer's rules (core/prompts.py: prompt/caption/text, negative_prompt alias neg_prompt; bad lines are
    skipped and counted); a JSONL line's own `seed` replaces --seeds."""
    items = [{"prompt": p, "negative_prompt": args.negative_prompt, "seeds": list(args.seeds)} for p in args.prompt]
    if args.prompts:
        path = Path(args.prompts)
        if not path.is_file():
            raise FileNotFoundError(f"prompts file {str(path)!r} does not exist")
        summary = DataSummary("prompts")
        for rec, obj in read_prompts_file(path, summary):
            seeds = [int(obj["seed"])] if "seed" in obj else list(args.seeds)
            items.append({"prompt": rec.prompt,
                          "negative_prompt": args.negative_prompt if rec.neg_prompt is None else rec.neg_prompt,
                          "seeds": seeds})
        summary.print()
    if not items:
        raise ValueError("no prompts: pass --prompt TEXT or --prompts FILE")
    return items


def _load_offsets(args, bundle) -> tuple[Offsets, dict]:
    from ..core.offsets import load_offset

    base = {"unet": bundle.unet, **{f"te{i + 1}": te for i, te in enumerate(bundle.text_encoders)}}
    fam = bundle.family if bundle.family in ("sd1", "sdxl") else None
    loaded, info = {}, {}
    for key, path in (("pos", args.pos_offset), ("neg", args.neg_offset), ("snpo", args.snpo_offset)):
        if path:
            off = load_offset(path, base, family=fam, allow_pickle=args.allow_pickle)
            loaded[key] = off
            info[key] = {"path": str(path), "report": off.report.summary() if off.report else None,
                         "metadata": dict(off.metadata)}
    return Offsets(loaded.get("pos"), loaded.get("neg"), loaded.get("snpo"), args.alpha, args.beta), info


def _atomic_write(path: Path, write) -> None:
    with atomic_path(path) as tmp:
        write(tmp)


def to_pil(img: torch.Tensor):
    """[C, H, W] in [0, 1] -> PIL image (L for 1 channel, RGB for 3)."""
    from PIL import Image

    arr = (img * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(arr[..., 0], "L") if arr.shape[2] == 1 else Image.fromarray(arr[..., :3], "RGB")


def make_grid(cells: list[list], pad: int = 2):
    """Rows x columns of equally sized PIL images -> one PIL image."""
    from PIL import Image

    w, h = cells[0][0].size
    grid = Image.new("RGB", (len(cells[0]) * (w + pad) + pad, len(cells) * (h + pad) + pad), "white")
    for r, row in enumerate(cells):
        for c, im in enumerate(row):
            grid.paste(im.convert("RGB"), (pad + c * (w + pad), pad + r * (h + pad)))
    return grid


def main(args) -> int:
    from tqdm import tqdm

    from .. import __version__
    from ..diffusers_host.loading import load_model, model_fingerprint

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    items = read_prompts(args)
    bundle = load_model(args.model, family=args.family, dtype=getattr(torch, args.dtype), device=args.device,
                        tokenizer=args.tokenizer, allow_pickle=args.allow_pickle)
    offsets, offset_info = _load_offsets(args, bundle)
    if "npo" in args.modes and offsets.delta is None:
        print("note: --modes npo without --neg-offset: the negative model is theta + alpha*eta")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(i, it["prompt"], it["negative_prompt"], s) for i, it in enumerate(items) for s in it["seeds"]]
    total = len(args.modes) * -(-len(jobs) // args.batch_size) * args.steps
    records, cells = [], [[None] * len(args.modes) for _ in jobs]
    t0 = time.time()
    with tqdm(total=total, desc="generate", unit="step") as bar:
        for m, mode in enumerate(args.modes):
            for start in range(0, len(jobs), args.batch_size):
                chunk = jobs[start:start + args.batch_size]
                res = sample(bundle, [j[1] for j in chunk], [j[3] for j in chunk], mode,
                             negative_prompts=[j[2] for j in chunk], offsets=offsets, cfg_scale=args.cfg, steps=args.steps,
                             scheduler=args.scheduler, sigma_min=args.sigma_min, sigma_max=args.sigma_max,
                             height=args.height, width=args.width, rescale=args.rescale, rescale_space=args.rescale_space,
                             npo_path=args.npo_path, progress=bar.update)
                for k, (pi, prompt, neg, seed) in enumerate(chunk):
                    name = f"p{pi:03d}_s{seed}_{mode}.png"
                    im = to_pil(res.images[k])
                    _atomic_write(out / name, lambda tmp, im=im: im.save(tmp, format="PNG"))
                    cells[start + k][m] = im
                    records.append({"prompt_index": pi, "prompt": prompt, "negative_prompt": "" if MODES[mode].uncond == "null" else neg,
                                    "seed": seed, "mode": mode, "file": name})
    grid = make_grid(cells)
    _atomic_write(out / "grid.png", lambda tmp: grid.save(tmp, format="PNG"))
    import diffusers

    manifest = {
        "command": "generate", "npo_suite_version": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
        "model": str(args.model), "model_hash": model_fingerprint(bundle), "family": bundle.family,
        "prediction_type": bundle.prediction_type, "offsets": offset_info, "alpha": args.alpha, "beta": args.beta,
        "cfg": args.cfg, "rescale": args.rescale, "rescale_space": args.rescale_space, "scheduler": args.scheduler,
        "steps": args.steps, "sigma_min": args.sigma_min, "sigma_max": args.sigma_max, "modes": list(args.modes),
        "npo_path": args.npo_path, "height": args.height, "width": args.width, "dtype": args.dtype, "device": str(args.device),
        "seeds": sorted({j[3] for j in jobs}), "grid": {"file": "grid.png", "rows": "prompt x seed (order of images)",
                                                       "columns": list(args.modes)},
        "images": records, "seconds": round(time.time() - t0, 3),
    }
    _atomic_write(out / "manifest.json", lambda tmp: Path(tmp).write_text(json.dumps(manifest, indent=2), encoding="utf-8"))
    print(f"wrote {len(records)} images, grid.png and manifest.json to {out}")
    return 0
