"""The embedded digits world: a tiny text-to-image diffusion model the project trains itself.

Data: scikit-learn's bundled `load_digits` (1797 images, 8x8, grey levels 0..16, offline).
Prompts: "a handwritten seven", optionally with a style word from the ink mass
("a thin handwritten seven", "a thick handwritten seven"); the class-free "a handwritten digit"
is trained too (GENERIC_PROMPT: what a prompt that lost its content means, world/rewrite.py).
The model has SD's interfaces (diffusers `UNet2DConditionModel`, `CLIPTextModel`, `CLIPTokenizer`,
`DDPMScheduler` on SD1.x/SDXL's scaled_linear schedule) but works in pixel space (in_channels=1,
sample_size=8, no VAE), so the trainer, the guidance and the evaluation run on it unchanged.
See docs/world.md.

Folder layout (diffusers-style, no vae/):
    model_index.json  unet/  text_encoder/  tokenizer/  scheduler/
    world.json        build manifest (command, versions, config, splits, diagnostics)
    reward/           the reward models (classifier weights, kNN reference set), see reward.py
    splits.safetensors  indices into load_digits() of the three splits
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..core.atomic import replace_dir

WORLD_FORMAT = "npo_suite.digits_world"
WORLD_VERSION = 2  # 2: SD's scaled_linear schedule, the class-free prompt trained
CLASS_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
STYLE_WORDS = ("thin", "thick")
WORLD_WORDS = ("a", "handwritten", "digit") + CLASS_WORDS + STYLE_WORDS
GENERIC_PROMPT = "a handwritten digit"  # names no class: the content of every prompt removed
SPLITS = ("gen", "reward_train", "reward_test")  # generator / reward classifier train / reward test
PACKAGE_WORLD_DIR = Path(__file__).resolve().parent / "assets" / "digits_world"
# the flow-matching world (issue 22): same data, splits, prompts, text encoder and reward; the UNet trained with
# the rectified-flow objective (core/flow.py) and sampled with the flow Euler solver
WORLD_KINDS = ("eps", "flow")
FLOW_WORLD_VERSION = 1
PACKAGE_WORLD_DIRS = {"eps": PACKAGE_WORLD_DIR, "flow": PACKAGE_WORLD_DIR.parent / "digits_world_flow"}
# the flow world's build budget (ensure_world builds it when none is shipped or cached; docs/world.md)
FLOW_BUILD = {"kind": "flow", "steps": 250, "batch_size": 128}
FLOW_T_SAMPLER = "logit_normal"  # SD3's base training (Esser et al. 2024 §3.1, m = 0, s = 1)


# ----------------------------------------------------------------------------- prompts

def prompt_for(label: int, style: str | None = None) -> str:
    """'a handwritten seven' / 'a thin handwritten seven'."""
    word = CLASS_WORDS[int(label)]
    return f"a {style} handwritten {word}" if style else f"a handwritten {word}"


def parse_prompt(prompt: str) -> tuple[int | None, str | None]:
    """(class index, style word) named by a prompt; None where the prompt names none."""
    words = prompt.lower().replace(",", " ").split()
    labels = [CLASS_WORDS.index(w) for w in words if w in CLASS_WORDS]
    styles = [w for w in words if w in STYLE_WORDS]
    return (labels[0] if len(set(labels)) == 1 else None), (styles[0] if len(set(styles)) == 1 else None)


def all_prompts() -> list[str]:
    """Every prompt of the world: 10 classes x (no style, thin, thick)."""
    return [prompt_for(c, s) for c in range(10) for s in (None, *STYLE_WORDS)]


# ----------------------------------------------------------------------------- data

@dataclass
class DigitsSplit:
    """One split of load_digits: images [N, 8, 8] float32 in 0..16, labels [N], style words [N]."""

    indices: np.ndarray
    images: np.ndarray
    labels: np.ndarray
    styles: list

    def pixels01(self) -> np.ndarray:
        """Images as [N, 64] in [0, 1] (the reward models' input)."""
        return (self.images.reshape(len(self.images), -1) / 16.0).astype(np.float32)


def split_indices(seed: int = 0, fractions=(0.5, 0.35, 0.15)) -> dict[str, np.ndarray]:
    """Stratified split of load_digits into generator / reward-train / reward-test indices."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    y = load_digits().target
    idx = np.arange(len(y))
    gen, rest = train_test_split(idx, train_size=fractions[0], stratify=y, random_state=seed)
    frac = fractions[1] / (fractions[1] + fractions[2])
    r_train, r_test = train_test_split(rest, train_size=frac, stratify=y[rest], random_state=seed)
    return {"gen": np.sort(gen), "reward_train": np.sort(r_train), "reward_test": np.sort(r_test)}


def style_thresholds(images: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per-class ink-mass terciles [10, 2] (lower, upper): below lower = thin, above upper = thick."""
    ink = images.reshape(len(images), -1).sum(1)
    return np.stack([np.quantile(ink[labels == c], [1 / 3, 2 / 3]) for c in range(10)])


def styles_of(images: np.ndarray, labels: np.ndarray, thresholds: np.ndarray) -> list:
    ink = images.reshape(len(images), -1).sum(1)
    lo, hi = thresholds[labels, 0], thresholds[labels, 1]
    return ["thin" if i < a else "thick" if i > b else None for i, a, b in zip(ink, lo, hi)]


def load_splits(indices: dict[str, np.ndarray], thresholds: np.ndarray | None = None) -> tuple[dict[str, DigitsSplit], np.ndarray]:
    """The three splits as DigitsSplit; style thresholds from the generator split unless given."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images, labels = d.images.astype(np.float32), d.target.astype(np.int64)
    if thresholds is None:
        thresholds = style_thresholds(images[indices["gen"]], labels[indices["gen"]])
    out = {}
    for name, idx in indices.items():
        out[name] = DigitsSplit(idx, images[idx], labels[idx], styles_of(images[idx], labels[idx], thresholds))
    return out, thresholds


# ----------------------------------------------------------------------------- model

@dataclass
class WorldConfig:
    """How the world's base model is built (stored in world.json)."""

    steps: int = field(default=1500, metadata={"help": "training steps of the base UNet"})
    batch_size: int = field(default=128, metadata={"help": "images per step"})
    lr: float = field(default=1e-3, metadata={"help": "AdamW learning rate (constant after 100 warm-up steps)"})
    block_out_channels: tuple = field(default=(32, 64), metadata={"help": "UNet channels per resolution (8x8, 4x4)"})
    cfg_dropout: float = field(default=0.1, metadata={"help": "probability of training on the empty prompt"})
    style_prob: float = field(default=0.5, metadata={"help": "probability of naming the style word when a sample has one"})
    generic_prob: float = field(default=0.1, metadata={"help": "probability of training on the class-free prompt "
                                                               "'a handwritten digit'"})
    text_hidden: int = field(default=32, metadata={"help": "text encoder width (= UNet cross_attention_dim)"})
    text_layers: int = field(default=2, metadata={"help": "text encoder layers (random init, frozen)"})
    max_length: int = field(default=16, metadata={"help": "tokenizer model_max_length"})
    seed: int = field(default=0, metadata={"help": "seed of the splits, the init and the training order"})
    kind: str = field(default="eps", metadata={"help": "eps: eps-prediction on SD's scaled_linear DDPM schedule "
                                                       "(world v2); flow: rectified flow, the UNet predicts "
                                                       "v = eps - x0 at logit-normal t, sampled with the flow "
                                                       "Euler solver"})
    prediction_type: str = field(default="epsilon", metadata={
        "help": "kind eps only: epsilon (world v2) or v_prediction (the same DDPM schedule, the UNet predicts "
                "v = sqrt(abar)*eps - sqrt(1 - abar)*x0, as SD2.x: an experiment world, docs/RESULTS.md)"})

    def __post_init__(self):
        if self.kind not in WORLD_KINDS:
            raise ValueError(f"WorldConfig: kind must be one of {list(WORLD_KINDS)}, got {self.kind!r}")
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"WorldConfig: prediction_type must be epsilon or v_prediction, got {self.prediction_type!r}")
        if self.kind == "flow" and self.prediction_type != "epsilon":
            raise ValueError("WorldConfig: prediction_type is for kind eps (a flow world predicts v = eps - x0)")
        self.block_out_channels = tuple(int(c) for c in self.block_out_channels)
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError("WorldConfig: steps and batch_size must be >= 1")
        if not 0.0 <= self.cfg_dropout < 1.0:
            raise ValueError(f"WorldConfig: cfg_dropout must be in [0, 1), got {self.cfg_dropout}")
        if not 0.0 <= self.generic_prob < 1.0 - self.cfg_dropout:
            raise ValueError(f"WorldConfig: need 0 <= generic_prob < 1 - cfg_dropout, got {self.generic_prob}")


def unet_config_world(cfg: WorldConfig) -> dict:
    """SD1.x-shaped UNet in pixel space: 1 channel, 8x8, cross-attention at both resolutions."""
    return dict(
        sample_size=8, in_channels=1, out_channels=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=cfg.block_out_channels, layers_per_block=1, cross_attention_dim=cfg.text_hidden,
        attention_head_dim=8, norm_num_groups=8,
    )


def make_scheduler(kind: str = "eps", prediction_type: str = "epsilon"):
    """eps: SD1.x/SDXL's schedule: scaled_linear betas 0.00085..0.012, T = 1000, eps-prediction
    (the `scheduler_config.json` of runwayml/stable-diffusion-v1-5 and SDXL base), or v-prediction.
    flow: diffusers' `FlowMatchEulerDiscreteScheduler`, T = 1000 (the network's timestep is t·1000),
    shift 1 (SD3's 3.0 is for 1024² latents; an 8x8 image needs none)."""
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

    if kind == "flow":
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         clip_sample=False, prediction_type=prediction_type)


def to_model_space(images016: torch.Tensor) -> torch.Tensor:
    """[N, 8, 8] grey levels 0..16 -> [N, 1, 8, 8] in [-1, 1]."""
    return (images016 / 8.0 - 1.0).unsqueeze(1)


def from_model_space(x: torch.Tensor) -> torch.Tensor:
    """[N, 1, 8, 8] (or [N, C, 8, 8]: channels averaged) in [-1, 1] -> [N, 8, 8] in [0, 1], clipped."""
    return ((x.float().mean(1) + 1.0) / 2.0).clamp(0.0, 1.0)


@dataclass
class World:
    """A loaded world: the diffusers/transformers components and the build manifest."""

    path: Path
    unet: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    scheduler: object
    manifest: dict

    @property
    def kind(self) -> str:
        """"eps" (world v2) or "flow" (WORLD_KINDS); a manifest without the key is an eps world."""
        return self.manifest.get("kind", "eps")

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> torch.Tensor:
        """Text hidden states [B, L, D] (the empty prompt is the null conditioning)."""
        ids = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        return self.text_encoder(ids)[0]


def _encode(tokenizer, text_encoder, prompts):
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    with torch.no_grad():
        return text_encoder(ids)[0]


def _train_unet(unet, cond_table, prompt_ids, x0, cfg: WorldConfig, abar, log, gen):
    """eps-prediction MSE (Ho et al. 2020 eq. 14) with CFG dropout to the empty prompt (row 0 of
    cond_table) and, with probability generic_prob, the class-free prompt (prompt_ids column 2);
    prediction_type v_prediction: the target v = sqrt(abar)·ε − sqrt(1 − abar)·x0 (Salimans & Ho 2022).
    kind "flow": the rectified-flow loss instead, mse(v_θ(x_t, t·1000), ε − x0) with x_t = (1 − t)·x0 + t·ε
    and t logit-normal (core/flow.py; SD3's objective); `abar` is unused."""
    from ..core import flow as fl
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 100))
    n, losses = len(x0), []
    unet.train()
    t0 = time.time()
    for step in range(cfg.steps):
        rows = torch.randint(0, n, (cfg.batch_size,), generator=gen)
        pid = prompt_ids[rows, (torch.rand(cfg.batch_size, generator=gen) < cfg.style_prob).long()]  # [B]
        u = torch.rand(cfg.batch_size, generator=gen)  # [B]: < cfg_dropout empty, next generic_prob class-free
        pid = torch.where(u < cfg.cfg_dropout + cfg.generic_prob, prompt_ids[rows, 2], pid)
        pid = torch.where(u < cfg.cfg_dropout, torch.zeros_like(pid), pid)
        x = x0[rows]  # [B, 1, 8, 8]
        if cfg.kind == "flow":
            t = fl.sample_t(cfg.batch_size, FLOW_T_SAMPLER, gen).float()  # [B] in (0, 1)
            eps = torch.randn(x.shape, generator=gen)
            x_t = fl.interpolate(x, eps, t)
            pred = unet(x_t, fl.to_model_timestep(t), cond_table[pid]).sample
            loss = torch.nn.functional.mse_loss(pred, fl.velocity_target(x, eps))
        else:
            t = torch.randint(0, len(abar), (cfg.batch_size,), generator=gen)
            eps = torch.randn(x.shape, generator=gen)
            a = abar[t].float().view(-1, 1, 1, 1)
            x_t = a.sqrt() * x + (1 - a).sqrt() * eps
            target = a.sqrt() * eps - (1 - a).sqrt() * x if cfg.prediction_type == "v_prediction" else eps
            loss = torch.nn.functional.mse_loss(unet(x_t, t, cond_table[pid]).sample, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if log and ((step + 1) % max(1, cfg.steps // 10) == 0 or step == 0):
            log(f"world build: step {step + 1}/{cfg.steps} loss {np.mean(losses[-50:]):.4f} ({time.time() - t0:.0f}s)")
    unet.eval()
    return float(np.mean(losses[-100:])), time.time() - t0


def build_world(out_dir: str | os.PathLike, cfg: WorldConfig | None = None, *, log=print,
                diagnose_samples: int = 200, command: str | None = None) -> Path:
    """Train the world's base model and its reward models, and save everything to `out_dir` (atomically).

    Steps: 1. split load_digits (generator / reward-train / reward-test, stratified);
    2. tokenizer with one BPE token per world word, random frozen CLIPTextModel;
    3. UNet trained on the generator split only (short on purpose: the base model must stay
       imperfect under the reward, or preference methods have nothing to improve);
    4. reward models fitted on the reward-train split (reward.py); 5. diagnostics: sample
       accuracy and reward of the base model (plain CFG) written to world.json.
    """
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    from .tokenizer import build_tokenizer, text_encoder_config, write_tokenizer_files

    cfg = cfg or WorldConfig()
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        torch.manual_seed(cfg.seed)
        gen = torch.Generator().manual_seed(cfg.seed)
        indices = split_indices(cfg.seed)
        splits, thresholds = load_splits(indices)

        # 2. text side
        tokenizer = build_tokenizer(tmp / "tokenizer_src", WORLD_WORDS, max_length=cfg.max_length)
        shutil.rmtree(tmp / "tokenizer_src")
        text_encoder = CLIPTextModel(text_encoder_config(len(tokenizer), hidden=cfg.text_hidden, layers=cfg.text_layers,
                                                         projection_dim=cfg.text_hidden, max_pos=cfg.max_length)).eval()
        text_encoder.requires_grad_(False)
        prompts = [""] + all_prompts() + [GENERIC_PROMPT]
        cond_table = _encode(tokenizer, text_encoder, prompts)  # [1 + 30 + 1, L, D]

        # 3. UNet on the generator split
        g = splits["gen"]
        x0 = to_model_space(torch.from_numpy(g.images))  # [N, 1, 8, 8]
        plain = torch.tensor([1 + 3 * int(c) for c in g.labels])
        styled = torch.tensor([1 + 3 * int(c) + (1 + STYLE_WORDS.index(s) if s else 0) for c, s in zip(g.labels, g.styles)])
        generic = torch.full_like(plain, len(prompts) - 1)
        prompt_ids = torch.stack([plain, styled, generic], 1)  # [N, 3]: column 1 with p style_prob, 2 generic_prob
        scheduler = make_scheduler(cfg.kind, cfg.prediction_type)
        abar = None if cfg.kind == "flow" else torch.as_tensor(scheduler.alphas_cumprod, dtype=torch.float64)
        unet = UNet2DConditionModel(**unet_config_world(cfg))
        final_loss, seconds = _train_unet(unet, cond_table, prompt_ids, x0, cfg, abar, log, gen)

        # save the model components
        unet.save_pretrained(tmp / "unet", safe_serialization=True)
        text_encoder.save_pretrained(tmp / "text_encoder", safe_serialization=True)
        tokenizer.save_pretrained(tmp / "tokenizer")
        write_tokenizer_files(tmp / "tokenizer", WORLD_WORDS)  # vocab.json + merges.txt: transformers 4.x loads these
        scheduler.save_pretrained(tmp / "scheduler")
        _write_model_index(tmp, type(scheduler).__name__)
        # 4. reward models on the held-out reward split
        rm, _ = write_reward_assets(tmp, cfg.seed)
        test = splits["reward_test"]
        sched_keys = (("num_train_timesteps", "shift") if cfg.kind == "flow" else
                      ("beta_schedule", "beta_start", "beta_end", "num_train_timesteps", "prediction_type"))
        manifest = {
            "format": WORLD_FORMAT, "version": WORLD_VERSION if cfg.kind == "eps" else FLOW_WORLD_VERSION,
            "kind": cfg.kind,
            "command": command or "python -m npo_suite world build",
            "versions": _versions(),
            "config": asdict(cfg),
            "splits": {k: int(len(v)) for k, v in indices.items()},
            "prompts": all_prompts(), "generic_prompt": GENERIC_PROMPT,
            "scheduler": {"class": type(scheduler).__name__, **{k: scheduler.config[k] for k in sched_keys},
                          **({"prediction": "flow (v = eps - x0)", "t_sampler": FLOW_T_SAMPLER}
                             if cfg.kind == "flow" else {})},
            "train": {"final_loss": final_loss, "seconds": round(seconds, 1)},
            "reward": {"classifier_accuracy_reward_test": float(rm.accuracy(test.pixels01(), test.labels)),
                       "classifier_accuracy_gen_split": float(rm.accuracy(g.pixels01(), g.labels)),
                       "realism_real_test_mean": float(rm.realism(test.pixels01()).mean())},
        }
        # 5. diagnostics of the base model (plain CFG, DDIM)
        if diagnose_samples > 0:
            world = World(tmp, unet, text_encoder, tokenizer, scheduler, manifest)
            manifest["diagnostics"] = diagnose(world, rm, n=diagnose_samples)
        (tmp / "world.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        replace_dir(tmp, out)  # an existing `out` is replaced only once `tmp` is complete
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if log:
        log(f"world build: wrote {out}")
    return out


def write_reward_assets(directory: str | os.PathLike, seed: int = 0):
    """Write `splits.safetensors` and `reward/` (the generator-independent reward models) into `directory`."""
    from safetensors.torch import save_file

    from .reward import fit_reward

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    indices = split_indices(seed)
    splits, thresholds = load_splits(indices)
    save_file({k: torch.from_numpy(v.astype(np.int64)) for k, v in indices.items()}
              | {"style_thresholds": torch.from_numpy(thresholds.astype(np.float32))}, str(d / "splits.safetensors"))
    rm = fit_reward(splits["reward_train"], seed=seed)
    rm.save(d / "reward")
    return rm, splits


def _write_model_index(directory: Path, scheduler_class: str = "DDPMScheduler") -> None:
    import diffusers

    index = {
        "_class_name": "NPOSuiteDigitsWorld", "_diffusers_version": diffusers.__version__,
        "scheduler": ["diffusers", scheduler_class], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
    }
    (directory / "model_index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


def _versions() -> dict:
    import diffusers
    import sklearn
    import transformers

    return {"python": sys.version.split()[0], "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "sklearn": sklearn.__version__, "numpy": np.__version__}


@torch.no_grad()
def ddim_cfg_diagnostic(world: World, prompts: list[str], seeds: list[int], cfg_scale: float = 3.0, steps: int = 20) -> torch.Tensor:
    """Plain-CFG DDIM samples [N, 8, 8] in [0, 1], used ONLY for the build's own diagnostics.

    Method comparisons never use this: they go through the project's sampler (`generate.sample`).
    """
    from diffusers import DDIMScheduler

    from ..core import flow as fl
    from ..core.guidance import cfg
    from ..core.sampling import sample_flow_euler, sample_scheduler

    cond, null = world.encode(prompts), world.encode([""] * len(prompts))
    x = torch.stack([torch.randn(1, 8, 8, generator=torch.Generator().manual_seed(int(s))) for s in seeds])

    def model(x_in, t):
        e_u, e_c = world.unet(torch.cat([x_in, x_in]), t, torch.cat([null, cond])).sample.chunk(2)
        return cfg(e_c, e_u, cfg_scale)

    if world.kind == "flow":  # CFG on velocities, flow Euler from t = 1 to 0 (core.flow)
        ts = fl.euler_timesteps(steps, world.scheduler.config.shift)
        return from_model_space(sample_flow_euler(model, x, ts, world.scheduler.config.num_train_timesteps))
    sch = DDIMScheduler.from_config(world.scheduler.config)
    sch.set_timesteps(steps)
    return from_model_space(sample_scheduler(model, x, sch))  # core.sampling


def diagnose(world: World, rm, n: int = 200, cfg_scale: float = 3.0) -> dict:
    """Accuracy / reward / realism of base samples on `n` prompts (all classes, styles cycling)."""
    prompts = [all_prompts()[i % 30] for i in range(n)]
    imgs = ddim_cfg_diagnostic(world, prompts, list(range(n)), cfg_scale=cfg_scale)
    labels = np.array([parse_prompt(p)[0] for p in prompts])
    px = imgs.reshape(n, -1).numpy()
    sampler = "flow-euler-20" if world.kind == "flow" else "ddim-20"
    return {"n": n, "cfg": cfg_scale, "sampler": f"{sampler} plain cfg (build diagnostic)",
            "accuracy": float(rm.accuracy(px, labels)), "mean_reward": float(rm.reward(px, labels).mean()),
            "realism_mean": float(rm.realism(px).mean())}


# ----------------------------------------------------------------------------- loading

def cache_dir(kind: str = "eps") -> Path:
    root = os.environ.get("NPO_SUITE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "npo_suite")
    name = f"digits_v{WORLD_VERSION}" if kind == "eps" else f"digits_flow_v{FLOW_WORLD_VERSION}"
    return Path(root) / "world" / name


def default_world_dir(kind: str = "eps") -> Path:
    """The shipped world of `kind` if present in the package, else the cache location."""
    if kind not in WORLD_KINDS:
        raise ValueError(f"unknown world kind {kind!r} (expected one of {list(WORLD_KINDS)})")
    if (PACKAGE_WORLD_DIRS[kind] / "world.json").is_file():
        return PACKAGE_WORLD_DIRS[kind]
    return cache_dir(kind)


def resolve_world(world: str | os.PathLike | None) -> Path | None:
    """A world argument: None (the default eps world), a kind name ("eps", "flow": its default folder),
    or a folder."""
    if world is None:
        return None
    return default_world_dir(str(world)) if str(world) in WORLD_KINDS else Path(world)


def check_world_dir(path: str | os.PathLike) -> dict:
    """Validate a world folder and return its manifest; clear errors name the missing piece."""
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"digits world not found: {p} (build it with `python -m npo_suite world build --out {p}`)")
    missing = [s for s in ("world.json", "model_index.json", "unet", "text_encoder", "tokenizer", "scheduler", "reward")
               if not (p / s).exists()]
    if missing:
        raise FileNotFoundError(f"{p} is not a complete digits world: missing {', '.join(missing)}")
    manifest = json.loads((p / "world.json").read_text(encoding="utf-8"))
    if manifest.get("format") != WORLD_FORMAT:
        raise ValueError(f"{p / 'world.json'}: format is {manifest.get('format')!r}, expected {WORLD_FORMAT!r}")
    return manifest


def ensure_world(path: str | os.PathLike | None = None, *, build: bool = True, log=print) -> Path:
    """Path of a usable world: `path` (a folder, or a kind name "eps"/"flow"), or the shipped one, or the
    cached one (built once if missing, with WorldConfig's defaults for its kind)."""
    kind = str(path) if path is not None and str(path) in WORLD_KINDS else "eps"
    p = resolve_world(path) or default_world_dir()
    if not (p / "world.json").is_file():
        if not build:
            check_world_dir(p)
        if log:
            log(f"world: none at {p}, building it (a few minutes on 2 CPU cores)")
        if kind == "flow":
            build_world(p, WorldConfig(**FLOW_BUILD), log=log, diagnose_samples=300,
                        command=f"python -m npo_suite world build --kind flow --steps {FLOW_BUILD['steps']} "
                                f"--batch-size {FLOW_BUILD['batch_size']} (ensure_world)")
        else:
            build_world(p, log=log)
    check_world_dir(p)
    return p


def load_world(path: str | os.PathLike | None = None) -> World:
    """Load a world folder's components (eval mode, fp32, CPU)."""
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    p = resolve_world(path) or default_world_dir()
    manifest = check_world_dir(p)
    unet = UNet2DConditionModel.from_pretrained(p / "unet").eval()
    te = CLIPTextModel.from_pretrained(p / "text_encoder").eval()
    tok = CLIPTokenizer.from_pretrained(str(p / "tokenizer"))
    sch_cls = FlowMatchEulerDiscreteScheduler if manifest.get("kind", "eps") == "flow" else DDPMScheduler
    sch = sch_cls.from_pretrained(p / "scheduler")
    return World(p, unet, te, tok, sch, manifest)


def load_world_splits(path: str | os.PathLike) -> dict[str, DigitsSplit]:
    """The world's data splits, exactly as recorded at build time."""
    from safetensors.torch import load_file

    f = Path(path) / "splits.safetensors"
    if not f.is_file():
        raise FileNotFoundError(f"{f}: missing (the world folder is incomplete)")
    t = load_file(str(f))
    indices = {k: t[k].numpy() for k in SPLITS}
    splits, _ = load_splits(indices, t["style_thresholds"].numpy().astype(np.float64))
    return splits
