"""Image scorers behind one registry: `SCORERS[name](**options) -> Scorer`.

Every scorer maps (PIL images, prompts) to one float per image, higher is better. Nothing is
ever downloaded: the external preference models (PickScore, HPSv2, ImageReward, LAION
aesthetic, CLIP) load from LOCAL paths the user passes, and a missing path is a clear error.
Plug-ins (core/plugins.py) add their scorers with `register_scorer`.

    clip_score       100 * max(cos(image, text), 0) of a local CLIPModel folder (Hessel et al.
                     2021 without their w=2.5; torchmetrics' convention)
    pickscore        logit_scale * cos(image, text) of a local PickScore_v1 CLIPModel folder
                     (Kirstain et al. 2023); processor from --processor-path or the same folder
    hpsv2            cos(image, text) of open_clip ViT-H-14 with a local HPS v2 checkpoint
                     (Wu et al. 2023; needs `open_clip_torch`; the .pt is pickle: allow_pickle)
    image_reward     ImageReward (Xu et al. 2023) via the `image-reward` package from a local
                     checkpoint and a local med_config.json
    laion_aesthetic  LAION improved aesthetic predictor: MLP head on normalised CLIP ViT-L/14
                     image embeddings (local CLIP folder + local head weights)
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import torch

from ..core.plugins import load_plugins


class Scorer(Protocol):
    name: str

    def score(self, images: list, prompts: list[str]) -> np.ndarray:
        """One float per image [N], higher is better."""


def _need_path(path, what: str, scorer: str, flag: str = "--model-path") -> Path:
    if not path:
        raise ValueError(f"scorer {scorer!r} needs a local {what} ({flag} PATH); nothing is downloaded")
    p = Path(os.path.expanduser(str(path)))
    if not p.exists():
        raise FileNotFoundError(f"scorer {scorer!r}: {what} not found: {p}")
    return p


def check_lengths(images, prompts, name):
    if len(images) != len(prompts):
        raise ValueError(f"scorer {name!r}: {len(images)} images but {len(prompts)} prompts")


# ----------------------------------------------------------------------------- CLIP family

@dataclass
class ClipScorer:
    """cos(image, text) of a transformers CLIPModel, times `scale` (clipped at 0 if `clip_zero`)."""

    name: str
    model: object
    processor: object
    device: str = "cpu"
    scale: float | None = 100.0  # None: the model's own logit_scale.exp() (PickScore)
    clip_zero: bool = True
    batch_size: int = 32

    @torch.no_grad()
    def score(self, images, prompts):
        check_lengths(images, prompts, self.name)
        out = []
        for i in range(0, len(images), self.batch_size):
            ims = [im.convert("RGB") for im in images[i:i + self.batch_size]]
            inp = self.processor(text=list(prompts[i:i + self.batch_size]), images=ims, return_tensors="pt",
                                 padding=True, truncation=True)
            inp = {k: v.to(self.device) for k, v in inp.items()}
            img = _features(self.model.get_image_features(pixel_values=inp["pixel_values"]))
            txt = _features(self.model.get_text_features(input_ids=inp["input_ids"], attention_mask=inp.get("attention_mask")))
            cos = torch.nn.functional.cosine_similarity(img, txt, dim=-1)  # [b]
            if self.clip_zero:
                cos = cos.clamp(min=0)
            scale = self.model.logit_scale.exp() if self.scale is None else self.scale
            out.append((scale * cos).float().cpu())
        return torch.cat(out).numpy().astype(np.float64) if out else np.zeros(0)


def _features(x):
    """get_*_features returns a tensor in transformers 4.x and may return a model output in 5.x."""
    if isinstance(x, torch.Tensor):
        return x
    for k in ("image_embeds", "text_embeds", "pooler_output"):
        if getattr(x, k, None) is not None:
            return getattr(x, k)
    raise TypeError(f"unexpected CLIP feature output {type(x).__name__}")


def load_clip(model_path, scorer: str, processor_path=None, device: str = "cpu"):
    """A local CLIPModel + CLIPProcessor (local_files_only: never downloads)."""
    from transformers import CLIPModel, CLIPProcessor

    p = _need_path(model_path, "CLIP model folder", scorer)
    pp = _need_path(processor_path, "CLIP processor folder", scorer, "--processor-path") if processor_path else p
    model = CLIPModel.from_pretrained(str(p), local_files_only=True).eval().to(device)
    processor = CLIPProcessor.from_pretrained(str(pp), local_files_only=True)
    return model, processor


def _clip_score(model_path=None, processor_path=None, device="cpu", **_):
    m, pr = load_clip(model_path, "clip_score", processor_path, device)
    return ClipScorer("clip_score", m, pr, device, scale=100.0, clip_zero=True)


def _pickscore(model_path=None, processor_path=None, device="cpu", **_):
    m, pr = load_clip(model_path, "pickscore", processor_path, device)
    return ClipScorer("pickscore", m, pr, device, scale=None, clip_zero=False)


# ----------------------------------------------------------------------------- LAION aesthetic

class AestheticHead(torch.nn.Module):
    """LAION improved-aesthetic-predictor MLP (768-1024-128-64-16-1; dropout is inactive in eval)."""

    def __init__(self, dim: int = 768):
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(dim, 1024), torch.nn.Dropout(0.2), torch.nn.Linear(1024, 128), torch.nn.Dropout(0.2),
            torch.nn.Linear(128, 64), torch.nn.Dropout(0.1), torch.nn.Linear(64, 16), torch.nn.Linear(16, 1))

    def forward(self, x):
        return self.layers(x)


def load_state(path: Path, allow_pickle: bool, scorer: str) -> dict:
    """A state dict from .safetensors, or from a pickle file only when allow_pickle (weights_only)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    if not allow_pickle:
        raise ValueError(f"scorer {scorer!r}: {path} is a pickle file ({path.suffix}); convert it to .safetensors "
                         "or pass --allow-pickle if you trust it")
    return torch.load(str(path), map_location="cpu", weights_only=True)


@dataclass
class AestheticScorer:
    name: str
    model: object
    processor: object
    head: AestheticHead
    device: str = "cpu"

    @torch.no_grad()
    def score(self, images, prompts):
        check_lengths(images, prompts, self.name)
        out = []
        for i in range(0, len(images), 32):
            inp = self.processor(images=[im.convert("RGB") for im in images[i:i + 32]], return_tensors="pt")
            f = _features(self.model.get_image_features(pixel_values=inp["pixel_values"].to(self.device)))
            f = f / f.norm(dim=-1, keepdim=True)
            out.append(self.head(f.float()).squeeze(-1).cpu())
        return torch.cat(out).numpy().astype(np.float64) if out else np.zeros(0)


def _laion_aesthetic(model_path=None, head_path=None, processor_path=None, device="cpu", allow_pickle=False, **_):
    hp = _need_path(head_path, "aesthetic head weights (.safetensors or .pth)", "laion_aesthetic", "--head-path")
    m, pr = load_clip(model_path, "laion_aesthetic", processor_path, device)
    state = load_state(hp, allow_pickle, "laion_aesthetic")
    dim = m.config.projection_dim
    head = AestheticHead(dim)
    try:
        head.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"scorer 'laion_aesthetic': {hp} does not match the {dim}-d aesthetic head: {e}") from None
    return AestheticScorer("laion_aesthetic", m, pr, head.eval().to(device), device)


# ----------------------------------------------------------------------------- HPSv2 / ImageReward

@dataclass
class CallableScorer:
    name: str
    fn: Callable

    def score(self, images, prompts):
        check_lengths(images, prompts, self.name)
        return np.asarray([float(self.fn(im, p)) for im, p in zip(images, prompts)], dtype=np.float64)


def _hpsv2(model_path=None, device="cpu", allow_pickle=False, **_):
    p = _need_path(model_path, "HPS v2 checkpoint (HPS_v2_compressed.pt or .safetensors)", "hpsv2")
    try:
        import open_clip
    except ImportError:
        raise ImportError("scorer 'hpsv2' needs open_clip (pip install open_clip_torch); nothing else is required") from None
    model, _, preprocess = open_clip.create_model_and_transforms("ViT-H-14", pretrained=None, device=device)
    state = load_state(p, allow_pickle, "hpsv2")
    model.load_state_dict(state.get("state_dict", state) if isinstance(state, dict) else state)
    model.eval()
    tokenizer = open_clip.get_tokenizer("ViT-H-14")

    @torch.no_grad()
    def fn(image, prompt):
        img = model.encode_image(preprocess(image.convert("RGB")).unsqueeze(0).to(device), normalize=True)
        txt = model.encode_text(tokenizer([prompt]).to(device), normalize=True)
        return (img * txt).sum()  # HPSv2's score: the diagonal of image @ text.T
    return CallableScorer("hpsv2", fn)


def _image_reward(model_path=None, med_config=None, device="cpu", **_):
    p = _need_path(model_path, "ImageReward checkpoint (ImageReward.pt)", "image_reward")
    mc = _need_path(med_config, "med_config.json (BLIP config shipped with ImageReward)", "image_reward", "--med-config")
    try:
        import ImageReward as RM
    except ImportError:
        raise ImportError("scorer 'image_reward' needs the image-reward package (pip install image-reward)") from None
    model = RM.load(str(p), device=device, med_config=str(mc))
    return CallableScorer("image_reward", lambda image, prompt: model.score(prompt, image.convert("RGB")))


# name -> (factory(**options), one-line help). The only list of scorer names: plug-ins add theirs with
# register_scorer; CLI choices and node dropdowns read available_scorers().
SCORERS: dict[str, tuple[Callable[..., Scorer], str]] = {
    "clip_score": (_clip_score, "100*max(cos,0) of a local CLIPModel folder (--model-path)"),
    "pickscore": (_pickscore, "PickScore from a local CLIPModel folder (--model-path)"),
    "hpsv2": (_hpsv2, "HPS v2 from a local checkpoint (--model-path; needs open_clip)"),
    "image_reward": (_image_reward, "ImageReward from a local checkpoint (--model-path, --med-config)"),
    "laion_aesthetic": (_laion_aesthetic, "LAION aesthetic head (--head-path) on a local CLIP ViT-L/14 (--model-path)"),
}


def register_scorer(name: str, factory: Callable[..., Scorer], help: str) -> None:
    """Add (or replace) the scorer `name`: `factory(**options)` builds it; `help` is its one-line help."""
    SCORERS[name] = (factory, help)


def available_scorers() -> dict[str, tuple[Callable[..., Scorer], str]]:
    """SCORERS with the plug-ins' scorers registered (what choices and dropdowns list)."""
    load_plugins()
    return SCORERS


def make_scorer(name: str, **options) -> Scorer:
    """Build a registered scorer; options: world, model_path, processor_path, head_path, med_config, device, allow_pickle."""
    if name not in SCORERS:
        load_plugins()
    if name not in SCORERS:
        raise ValueError(f"unknown scorer {name!r}; choose one of: {', '.join(SCORERS)}")
    return SCORERS[name][0](**options)
