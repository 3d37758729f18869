"""Load a model for sampling or training: a diffusers folder, a single-file checkpoint, or a
pixel-space folder of a plug-in family (the digits world).

`load_model(path)` returns a `ModelBundle` (UNet, text encoder(s), tokenizer(s), VAE or None,
scheduler, family, prediction type). Nothing is downloaded: single-file checkpoints are
converted with the architecture configs shipped in `configs/<family.config_dir>` (`configs/sd15`,
`configs/sdxl`), and the tokenizer (not stored in a single file) comes from a user folder
(`tokenizer=`). What differs per family is asked of the family (`families.base.Family`).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .base import (
    CONFIG_DIR,
    FAMILIES,
    Family,
    detect_folder,
    detect_single_file,
    family_with_text_encoders,
    get_family,
    read_model_index,
)

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


@dataclass
class ModelBundle:
    """Everything the sampler needs. vae is None for pixel-space models (latents ARE pixels)."""

    unet: torch.nn.Module
    text_encoders: list
    tokenizers: list
    vae: torch.nn.Module | None
    scheduler: object
    family: str
    prediction_type: str
    source: str
    force_zeros_for_empty_prompt: bool = False  # SDXL pipelines: the null conditioning is zeros
    extra: dict = field(default_factory=dict)

    @property
    def family_spec(self) -> Family:
        """The registered `Family` called `family`."""
        return get_family(self.family)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def latent_scale(self) -> int:
        """Pixels per latent cell (8 for SD VAEs, 1 in pixel space)."""
        if self.vae is None:
            return 1
        return 2 ** (len(self.vae.config.block_out_channels) - 1)


def _load_tokenizer(path: str | os.PathLike, source: str):
    from transformers import CLIPTokenizer

    p = Path(path)
    if not p.is_dir() or not ((p / "vocab.json").exists() or (p / "tokenizer.json").exists()):
        raise FileNotFoundError(f"{source}: tokenizer folder {str(p)!r} has no vocab.json/tokenizer.json "
                                f"(pass a CLIP tokenizer folder, e.g. the `tokenizer/` of a diffusers model)")
    return CLIPTokenizer.from_pretrained(str(p))


def _detect_single_file_family(path: Path) -> Family:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
    return detect_single_file(keys, path)


def _flow_from_folder(path: Path, fam: Family, family: str | None, dtype, device, tokenizer) -> ModelBundle:
    """A diffusers folder of a flow family (SD3, Flux): its own pipeline class loads every component
    (text encoders and tokenizers as the folder names them), nothing downloaded."""
    import diffusers

    if family is not None and family != fam.name:
        get_family(family)
        raise ValueError(f"{path}: looks like a {fam.name!r} model but family={family!r} was requested")
    if tokenizer is not None:
        raise ValueError(f"{path}: tokenizer= overrides a CLIP tokenizer of SD1.x/SDXL; a {fam.display_name} folder "
                         f"uses its own tokenizers (tokenizer/, tokenizer_2/, ...)")
    cls = getattr(diffusers, read_model_index(path)["_class_name"])
    pipe = cls.from_pretrained(str(path), torch_dtype=dtype, local_files_only=True)
    return bundle_from_flow_pipeline(pipe, fam, str(path), device)


def bundle_from_flow_pipeline(pipe, fam: Family | str, source: str = "pipeline", device=None) -> ModelBundle:
    """A ModelBundle over a diffusers SD3 / Flux pipeline's modules: the transformer in the denoiser
    slot (`unet`), the text encoders and tokenizers in the pipeline's order (CLIP-L, CLIP-G, T5 / CLIP-L, T5)."""
    fam = get_family(fam)
    tes = [getattr(pipe, n) for n in ("text_encoder", "text_encoder_2", "text_encoder_3")[:fam.text_encoders]]
    toks = [getattr(pipe, n) for n in ("tokenizer", "tokenizer_2", "tokenizer_3")[:fam.text_encoders]]
    if any(m is None for m in tes + toks):
        raise ValueError(f"{source}: a {fam.display_name} pipeline needs its {fam.text_encoders} text encoders and "
                         f"tokenizers (a pipeline loaded without one, e.g. text_encoder_3=None, is not supported)")
    if device is None:
        device = pipe.transformer.device
    return _bundle(pipe.transformer, tes, toks, pipe.vae, pipe.scheduler, fam.name, source, device, False, "flow")


def _from_folder(path: Path, family: str | None, dtype, device, tokenizer) -> ModelBundle:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    index = read_model_index(path)
    flow = detect_folder(path)
    if flow is not None and flow.is_flow:
        return _flow_from_folder(path, flow, family, dtype, device, tokenizer)
    for sub in ("unet", "scheduler", "text_encoder"):
        if not (path / sub).is_dir():
            raise FileNotFoundError(f"{path}: not a diffusers model folder (missing {sub}/)")
    fam = detect_folder(path)
    if fam is None:
        raise ValueError(f"{path}: no registered model family has this folder layout (known: {sorted(FAMILIES)})")
    if family is not None and family != fam.name:
        get_family(family)
        raise ValueError(f"{path}: looks like a {fam.name!r} model but family={family!r} was requested")
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=dtype)
    tes = [CLIPTextModel.from_pretrained(path, subfolder="text_encoder", torch_dtype=dtype)]
    if fam.text_encoders == 2:
        tes.append(CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2", torch_dtype=dtype))
    if tokenizer is not None:
        toks = [_load_tokenizer(tokenizer, str(path))] * len(tes)
    else:
        toks = [_load_tokenizer(path / "tokenizer", str(path))]
        if fam.text_encoders == 2:
            toks.append(_load_tokenizer(path / ("tokenizer_2" if (path / "tokenizer_2").is_dir() else "tokenizer"), str(path)))
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=dtype) if fam.latent else None
    return _bundle(unet, tes, toks, vae, _load_scheduler(path / "scheduler"), fam.name, str(path), device,
                   bool(index.get("force_zeros_for_empty_prompt", fam.force_zeros_for_empty_prompt)))


def _load_scheduler(folder: Path):
    import diffusers

    cfg_file = folder / "scheduler_config.json"
    if not cfg_file.exists():
        raise FileNotFoundError(f"{folder}: missing scheduler_config.json")
    cls_name = json.loads(cfg_file.read_text(encoding="utf-8")).get("_class_name", "DDPMScheduler")
    cls = getattr(diffusers, cls_name, None)
    if cls is None:
        raise ValueError(f"{cfg_file}: unknown scheduler class {cls_name!r}")
    return cls.from_pretrained(str(folder))


def _from_single_file(path: Path, family: str | None, dtype, device, tokenizer, config: str | None) -> ModelBundle:
    import diffusers

    fam = get_family(family) if family is not None else None
    if fam is None and path.suffix.lower() == ".safetensors":
        try:
            fam = _detect_single_file_family(path)
        except ValueError:
            fam = None  # reported below, after the tokenizer check (as before)
    if fam is not None and fam.is_flow:
        raise ValueError(
            f"{path}: a {fam.display_name} single file is not supported: such files hold the transformer "
            f"(ComfyUI/original key names) and at most some of the VAE and text encoders, and converting one needs "
            f"the text encoders' weights (T5-XXL, CLIP) and their tokenizers, which a config folder cannot supply "
            f"offline; pass the model's diffusers folder (model_index.json, transformer/, text_encoder*/, tokenizer*/, "
            f"vae/, scheduler/) instead")
    if tokenizer is None:
        raise ValueError(f"{path}: a single-file checkpoint holds no tokenizer; pass tokenizer=DIR (CLI: --tokenizer DIR), "
                         f"a folder with the CLIP tokenizer's vocab.json and merges.txt")
    tok = _load_tokenizer(tokenizer, str(path))
    fam = fam or _detect_single_file_family(path)
    if fam.single_file_pipeline is None:
        known = [f.name for f in FAMILIES.values() if f.single_file_pipeline]
        raise ValueError(f"{path}: single-file checkpoints must be family {' or '.join(repr(n) for n in known)}, "
                         f"got {fam.name!r}")
    cfg_dir = Path(config) if config else CONFIG_DIR / fam.config_dir
    if not (cfg_dir / "model_index.json").exists():
        raise FileNotFoundError(f"{cfg_dir}: no model_index.json (config folder for {path})")
    extra = {f"tokenizer_{i + 1}": tok for i in range(1, fam.text_encoders)}
    if fam.text_encoders == 1:  # the SD pipeline's safety checker is not part of the model
        extra.update(safety_checker=None, requires_safety_checker=False)
    pipe = getattr(diffusers, fam.single_file_pipeline).from_single_file(
        str(path), config=str(cfg_dir), tokenizer=tok, **extra, torch_dtype=dtype, local_files_only=True)
    tes = [pipe.text_encoder] + [getattr(pipe, f"text_encoder_{i + 1}") for i in range(1, fam.text_encoders)]
    return _bundle(pipe.unet, tes, [tok] * len(tes), pipe.vae, pipe.scheduler, fam.name, str(path), device,
                   fam.force_zeros_for_empty_prompt)


def bundle_from_pipeline(pipe, source: str = "pipeline") -> ModelBundle:
    """A ModelBundle over a diffusers SD1.x / SDXL pipeline's own modules (shared, left as they are)."""
    tes = [te for te in (getattr(pipe, "text_encoder", None), getattr(pipe, "text_encoder_2", None)) if te is not None]
    toks = [tk for tk in (getattr(pipe, "tokenizer", None), getattr(pipe, "tokenizer_2", None)) if tk is not None]
    fam = family_with_text_encoders(len(tes))
    zeros = bool(getattr(pipe.config, "force_zeros_for_empty_prompt", False)) if fam.force_zeros_for_empty_prompt else False
    pred = getattr(pipe.scheduler.config, "prediction_type", "epsilon")
    return ModelBundle(pipe.unet, tes, toks, getattr(pipe, "vae", None), pipe.scheduler, fam.name, pred, source, zeros)


def _bundle(unet, tes, toks, vae, scheduler, family, source, device, zeros, pred=None) -> ModelBundle:
    for m in [unet, *tes, *([vae] if vae is not None else [])]:
        m.to(device).eval().requires_grad_(False)
    pred = pred or getattr(scheduler.config, "prediction_type", "epsilon")
    return ModelBundle(unet, list(tes), list(toks), vae, scheduler, family, pred, source, zeros)


def load_model(path, *, family: str | None = None, dtype: torch.dtype = torch.float32, device="cpu", tokenizer=None,
               allow_pickle: bool = False, config: str | None = None) -> ModelBundle:
    """Load a diffusers folder, a single-file `.safetensors` (SD1.x/SDXL) or a pixel-space folder.

    family: a registered family name ("sd1", "sdxl", a plug-in's) to check (folders) or force (single
      files); detected when None.
    tokenizer: a CLIP tokenizer folder; required for single files, overrides a folder's own.
    config: a diffusers folder of configs for a single file (default: the shipped SD1.5/SDXL ones).
    Pickle checkpoints (.ckpt/.pt/.bin) are refused unless allow_pickle=True.
    """
    p = Path(path)
    if family is not None:
        get_family(family)
    if not p.exists():
        raise FileNotFoundError(f"model {str(p)!r} does not exist")
    if p.is_dir():
        return _from_folder(p, family, dtype, device, tokenizer)
    suffix = p.suffix.lower()
    if suffix in PICKLE_SUFFIXES and not allow_pickle:
        raise ValueError(f"{p}: pickle checkpoints ({suffix}) can run arbitrary code; convert it to .safetensors "
                         f"or pass allow_pickle=True (CLI: --allow-pickle) if you trust the file")
    if suffix not in (".safetensors", *PICKLE_SUFFIXES):
        raise ValueError(f"{p}: unsupported model file type {suffix!r} (expected a diffusers folder or a .safetensors file)")
    if suffix != ".safetensors":
        # diffusers' single-file loader reads pickles with torch.load(weights_only=True).
        if family is None:
            known = [f.name for f in FAMILIES.values() if f.single_file_pipeline]
            raise ValueError(f"{p}: pass family={' or '.join(repr(n) for n in known)} for a pickle checkpoint")
        if tokenizer is None:
            raise ValueError(f"{p}: a single-file checkpoint holds no tokenizer; pass tokenizer=DIR (CLI: --tokenizer DIR)")
        return _from_single_file(p, family, dtype, device, tokenizer, config)
    return _from_single_file(p, family, dtype, device, tokenizer, config)


def model_fingerprint(bundle: ModelBundle) -> str:
    """sha256 fingerprint of the UNet weights (core.offsets.model_hash: sampled values, cheap)."""
    from ..core.offsets import model_hash

    return model_hash(bundle.unet)
