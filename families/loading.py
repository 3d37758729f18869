"""Load a model for sampling or training: a diffusers folder, a single-file checkpoint, or a
pixel-space folder of a plug-in family (the digits world).

`load_model(path)` returns a `ModelBundle` (UNet, text encoder(s), tokenizer(s), VAE or None,
scheduler, family, prediction type) and prints one line saying what it found (`ModelBundle.detected`:
family, the file's dtype, prediction type and why, VAE, tokenizer). Nothing is downloaded:

- single-file checkpoints are converted with the architecture configs shipped in
  `configs/<family.config_dir>` (`configs/sd15`, `configs/sdxl`);
- their tokenizer (a single file holds none) is `tokenizer=` (CLI `--tokenizer DIR`) or else the
  standard CLIP tokenizer shipped in `configs/clip_tokenizer` (CLIP's BPE vocabulary, as in every
  SD1.x/SDXL checkpoint); an encoder whose pad token differs (SDXL's OpenCLIP bigG pads with "!",
  id 0) gets it from the family (`Family.tokenizer_pads`);
- the prediction type is `prediction_type=` (CLI `--prediction-type`), else a `v_pred` key in the file
  (how ComfyUI marks v-prediction checkpoints it saves), else the family's default (epsilon);
- a file without VAE weights is refused unless `vae=` names one (a diffusers VAE folder or a VAE
  `.safetensors`): no VAE is ever substituted.

What differs per family is asked of the family (`families.base.Family`).
"""
from __future__ import annotations

import json
import os
import sys
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
SHIPPED_TOKENIZER = CONFIG_DIR / "clip_tokenizer"  # CLIP's BPE vocabulary (configs/README.md: origin, licence)
PREDICTION_TYPES = ("epsilon", "v_prediction")
VAE_PREFIX = "first_stage_model."


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
    detected: str = ""  # the one line load_model printed: what was found and why

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
        if getattr(self.vae, "spatial_compression_ratio", None):  # DC-AE (SANA): 2 ** (encoder blocks - 1)
            return int(self.vae.spatial_compression_ratio)
        return 2 ** (len(self.vae.config.block_out_channels) - 1)


def _load_tokenizer(path: str | os.PathLike, source: str, pad_token: str | None = None):
    from transformers import CLIPTokenizer

    p = Path(path)
    if not p.is_dir() or not ((p / "vocab.json").exists() or (p / "tokenizer.json").exists()):
        raise FileNotFoundError(f"{source}: tokenizer folder {str(p)!r} has no vocab.json/tokenizer.json "
                                f"(pass a CLIP tokenizer folder, e.g. the `tokenizer/` of a diffusers model)")
    return CLIPTokenizer.from_pretrained(str(p), **({"pad_token": pad_token} if pad_token else {}))


def single_file_tokenizers(fam: Family, tokenizer=None, source: str = "checkpoint") -> tuple[list, str]:
    """The tokenizers of a single-file checkpoint of family `fam` and where they came from: `tokenizer`
    (one CLIP tokenizer folder for every encoder, or a diffusers model folder with `tokenizer/` and
    `tokenizer_2/`), else the shipped standard CLIP tokenizer. One folder serving several encoders is
    loaded with each encoder's pad token (`Family.tokenizer_pads`: SDXL's second pads with "!")."""
    root = Path(tokenizer) if tokenizer is not None else SHIPPED_TOKENIZER
    where = str(root) if tokenizer is not None else "the shipped CLIP tokenizer (configs/clip_tokenizer)"
    subs = ["tokenizer"] + [f"tokenizer_{i + 1}" for i in range(1, fam.text_encoders)]
    if tokenizer is not None and all((root / s).is_dir() for s in subs):
        return [_load_tokenizer(root / s, source) for s in subs], f"{root}/{{{','.join(subs)}}}"
    pads = list(fam.tokenizer_pads) + [None] * fam.text_encoders
    return [_load_tokenizer(root, source, pads[i]) for i in range(fam.text_encoders)], where


def _detect_single_file_family(path: Path) -> Family:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
    return detect_single_file(keys, path)


def _flow_from_folder(path: Path, fam: Family, family: str | None, dtype, device, tokenizer, vae=None,
                      prediction_type: str | None = None, *, transformer=None, source: str | None = None) -> ModelBundle:
    """A diffusers folder of a flow family (SD3, Flux, SANA): its own pipeline class loads every component
    (text encoders and tokenizers as the folder names them), nothing downloaded. `vae` replaces the
    folder's VAE (a diffusers VAE folder, a diffusers-named .safetensors read with the folder's vae/config,
    or an already loaded VAE model); an AutoencoderKL only (SANA's DC-AE is refused). `transformer` (a
    loaded model) replaces the folder's (a single file, `source` names it in the line). The scheduler
    sampled with is `fam.flow_scheduler`'s."""
    import diffusers

    if family is not None and family != fam.name:
        get_family(family)
        raise ValueError(f"{path}: looks like a {fam.name!r} model but family={family!r} was requested")
    if tokenizer is not None:
        raise ValueError(f"{path}: tokenizer= overrides a CLIP tokenizer of SD1.x/SDXL; a {fam.display_name} folder "
                         f"uses its own tokenizers (tokenizer/, tokenizer_2/, ...)")
    if prediction_type is not None:
        raise ValueError(f"{path}: --prediction-type ({prediction_type}) is for SD1.x/SDXL checkpoints; a "
                         f"{fam.display_name} model predicts a flow velocity")
    extra, vae_note = {}, "VAE: vae/"
    if vae is not None and fam.vae_class != "AutoencoderKL":
        raise ValueError(f"{path}: vae= replaces an AutoencoderKL; a {fam.display_name} folder uses its own "
                         f"{fam.vae_class} (vae/), which no other VAE replaces here")
    if isinstance(vae, torch.nn.Module):
        extra["vae"], vae_note = vae, f"VAE: in the file {Path(source).name}" if source else "VAE: given"
    elif vae is not None:
        extra["vae"], vae_note = _load_vae(vae, path, dtype, str(path)), f"VAE: {vae}"
    if transformer is not None:
        extra["transformer"] = transformer
    name = read_model_index(path)["_class_name"]
    cls = getattr(diffusers, name, None)
    if cls is None:
        raise ValueError(f"{path}: the installed diffusers ({diffusers.__version__}) has no {name}; upgrade diffusers "
                         f"to load this {fam.display_name} folder")
    pipe = cls.from_pretrained(str(path), torch_dtype=dtype, local_files_only=True, **extra)
    if transformer is not None:
        file_dtype = _file_facts(Path(source))["dtype"] if Path(source).suffix.lower() == ".safetensors" else \
            "unknown (pickle)"
        what = (f"single file {Path(source).name} (its transformer; text encoders, tokenizers and scheduler from the "
                f"diffusers folder {path.name})")
    else:
        weights = sorted((path / "transformer").glob("*.safetensors"))
        file_dtype = _file_facts(weights[0])["dtype"] if weights else "unknown"
        what = f"diffusers folder {path.name}"
    schedule = fam.flow_scheduler(pipe.scheduler)[1]
    line = (f"model: {fam.display_name} {what} ({file_dtype} weights, loaded as "
            f"{str(dtype).replace('torch.', '')}); prediction: flow (the family's); schedule: "
            f"{schedule}; {vae_note}; tokenizers: the folder's "
            f"({', '.join(type(t).__name__ for t in (pipe.tokenizer, getattr(pipe, 'tokenizer_2', None), getattr(pipe, 'tokenizer_3', None)) if t is not None)})")
    bundle = bundle_from_flow_pipeline(pipe, fam, source or str(path), device)
    bundle.detected = line
    return bundle


def _flow_single_file(path: Path, fam: Family, facts: dict, dtype, device, tokenizer, config: str | None, vae=None,
                      prediction_type: str | None = None) -> ModelBundle:
    """An SD3 / Flux / SANA single file (original SAI / BFL / NVlabs key names, with or without the
    `model.diffusion_model.` prefix): its transformer converted by diffusers' own single-file loader, with the config of the model's
    diffusers folder `config`, which also supplies the text encoders, tokenizers and scheduler (a transformer
    file holds none of them that a config could rebuild offline). The VAE: `vae=` if given, else the
    file's own (`first_stage_model.*`, as SD3.5 files hold it), else the folder's; the line says which."""
    import diffusers

    if config is None:
        raise ValueError(
            f"{path}: a {fam.display_name} single file holds the transformer (and at most the VAE); pass --model-config DIR "
            f"(config=): the model's diffusers folder (model_index.json, transformer/config.json, text_encoder*/, "
            f"tokenizer*/, scheduler/), whose text encoders, tokenizers and scheduler are used with the file's transformer")
    cfg = Path(config)
    if not cfg.is_dir() or not fam.matches_folder(cfg):
        raise ValueError(f"{path}: --model-config {str(cfg)!r} is not a {fam.display_name} diffusers folder (model_index.json "
                         f"naming {' or '.join(fam.pipeline_classes)}, with {', '.join(fam.folder_components)})")
    tcfg = json.loads((cfg / "transformer" / "config.json").read_text(encoding="utf-8"))
    if fam.name == "flux":
        width = int(tcfg.get("num_attention_heads", 0)) * int(tcfg.get("attention_head_dim", 0))
        if width != 3072:  # diffusers' convert_flux_transformer_checkpoint_to_diffusers fixes inner_dim = 3072
            raise ValueError(f"{path}: diffusers converts Flux single files of the released width 3072 only (it "
                             f"splits `linear1` with that width); the config's transformer is {width} wide")
    cls = getattr(diffusers, tcfg["_class_name"], None)
    if cls is None or not hasattr(cls, "from_single_file"):
        raise ValueError(f"{path}: transformer class {tcfg.get('_class_name')!r} of {cfg} has no single-file loader in "
                         f"diffusers {diffusers.__version__}")
    transformer = cls.from_single_file(str(path), config=str(cfg), subfolder="transformer", torch_dtype=dtype,
                                       local_files_only=True)
    if vae is None and facts["keys"] is not None and facts["vae"]:  # a pickle's keys are not read here: no VAE taken
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_single_file(str(path), config=str(cfg), subfolder="vae", torch_dtype=dtype,
                                             local_files_only=True)
    bundle = _flow_from_folder(cfg, fam, None, dtype, device, tokenizer, vae, prediction_type, transformer=transformer,
                               source=str(path))
    n_te = sum(k.startswith("text_encoders.") for k in facts["keys"] or ())
    if n_te:
        bundle.detected += (f"; the file's own text encoders ({n_te} text_encoders.* tensors) are not used: "
                            f"the folder's are")
    return bundle


def bundle_from_flow_pipeline(pipe, fam: Family | str, source: str = "pipeline", device=None) -> ModelBundle:
    """A ModelBundle over a diffusers SD3 / Flux / SANA pipeline's modules: the transformer in the denoiser
    slot (`unet`), the text encoders and tokenizers in the pipeline's order (CLIP-L, CLIP-G, T5 / CLIP-L, T5 /
    Gemma2), the scheduler `fam.flow_scheduler` gives (SANA: flow Euler at its DPM-Solver's flow_shift)."""
    fam = get_family(fam)
    tes = [getattr(pipe, n) for n in ("text_encoder", "text_encoder_2", "text_encoder_3")[:fam.text_encoders]]
    toks = [getattr(pipe, n) for n in ("tokenizer", "tokenizer_2", "tokenizer_3")[:fam.text_encoders]]
    if any(m is None for m in tes + toks):
        raise ValueError(f"{source}: a {fam.display_name} pipeline needs its {fam.text_encoders} text encoders and "
                         f"tokenizers (a pipeline loaded without one, e.g. text_encoder_3=None, is not supported)")
    if device is None:
        device = pipe.transformer.device
    scheduler = fam.flow_scheduler(pipe.scheduler)[0]
    return _bundle(pipe.transformer, tes, toks, pipe.vae, scheduler, fam.name, source, device, False, "flow")


def _from_folder(path: Path, family: str | None, dtype, device, tokenizer, vae=None,
                 prediction_type: str | None = None) -> ModelBundle:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    index = read_model_index(path)
    for f in FAMILIES.values():  # a folder of a related pipeline a flow family does not sample (SANA-Sprint, ...)
        why = f.refusal(index.get("_class_name", "")) if f.is_flow_transformer else None
        if why:
            raise ValueError(f"{path}: {why}")
    flow = detect_folder(path)
    if flow is not None and flow.is_flow_transformer:
        return _flow_from_folder(path, flow, family, dtype, device, tokenizer, vae, prediction_type)
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
        toks, tok_source = single_file_tokenizers(fam, tokenizer, str(path))
    else:
        toks, tok_source = [_load_tokenizer(path / "tokenizer", str(path))], "tokenizer/"
        pads = list(fam.tokenizer_pads) + [None] * fam.text_encoders
        for i in range(1, fam.text_encoders):  # a folder without tokenizer_2/: the first one, with this encoder's pad
            own = path / f"tokenizer_{i + 1}"
            toks.append(_load_tokenizer(own, str(path)) if own.is_dir() else _load_tokenizer(path / "tokenizer", str(path), pads[i]))
            tok_source += f", tokenizer_{i + 1}/" if own.is_dir() else f", tokenizer/ (pad {pads[i] or 'as is'}) for encoder {i + 1}"
    vae_note = "no VAE (pixel space)"
    if vae is not None and fam.latent:
        vae_model, vae_note = _load_vae(vae, CONFIG_DIR / (fam.config_dir or ""), dtype, str(path)), f"VAE: {vae}"
    elif fam.latent:
        vae_model, vae_note = AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=dtype), "VAE: vae/"
    else:
        vae_model = None
    scheduler = _load_scheduler(path / "scheduler")
    own_pred = getattr(scheduler.config, "prediction_type", None) or fam.prediction_type  # flow schedulers have none
    if prediction_type is not None and prediction_type != own_pred:
        scheduler = type(scheduler).from_config(scheduler.config, prediction_type=prediction_type)
        why = f"--prediction-type; the folder's scheduler says {own_pred}"
    else:
        why = "the folder's scheduler_config.json"
    weights = sorted((path / "unet").glob("*.safetensors"))
    file_dtype = _file_facts(weights[0])["dtype"] if weights else "unknown"
    line = (f"model: {fam.display_name} diffusers folder {path.name} ({file_dtype} weights, loaded as "
            f"{str(dtype).replace('torch.', '')}); prediction: {prediction_type or own_pred} ({why}); "
            f"{vae_note}; tokenizer: {tok_source}")
    return _bundle(unet, tes, toks, vae_model, scheduler, fam.name, str(path), device,
                   bool(index.get("force_zeros_for_empty_prompt", fam.force_zeros_for_empty_prompt)), detected=line)


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


def _file_facts(path: Path) -> dict:
    """What the header of a .safetensors checkpoint says: its keys, the dtype of its UNet weights, VAE or not,
    ComfyUI's `v_pred` / `ztsnr` marker keys."""
    from collections import Counter

    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
        unet = [k for k in keys if k.startswith("model.diffusion_model.")][:64] or keys[:64]
        dtypes = Counter(f.get_slice(k).get_dtype() for k in unet)
    names = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64", "F8_E4M3": "float8_e4m3fn",
             "F8_E5M2": "float8_e5m2"}
    dtype = names.get(dtypes.most_common(1)[0][0], dtypes.most_common(1)[0][0]) if dtypes else "unknown"
    return {"keys": keys, "dtype": dtype, "vae": any(k.startswith(VAE_PREFIX) for k in keys),
            "v_pred": "v_pred" in keys, "ztsnr": "ztsnr" in keys}


def _load_vae(vae, cfg_dir: Path, dtype, source: str):
    """An AutoencoderKL from `vae`: a diffusers VAE folder (config.json + weights, or a model folder with
    vae/), or a VAE .safetensors in diffusers or LDM names (converted with the family's `vae` config)."""
    from diffusers import AutoencoderKL
    from safetensors import safe_open

    p = Path(vae)
    if not p.exists():
        raise FileNotFoundError(f"{source}: VAE {str(p)!r} does not exist")
    if p.is_dir():
        sub = "vae" if (p / "vae" / "config.json").is_file() else None
        if sub is None and not (p / "config.json").is_file():
            raise FileNotFoundError(f"{source}: VAE folder {str(p)!r} has no config.json (nor vae/config.json)")
        return AutoencoderKL.from_pretrained(str(p), subfolder=sub, torch_dtype=dtype)
    if p.suffix.lower() != ".safetensors":
        raise ValueError(f"{source}: VAE file {str(p)!r}: expected a .safetensors file or a diffusers VAE folder")
    with safe_open(str(p), framework="pt") as f:
        keys = list(f.keys())
    if any(k.startswith(("encoder.down_blocks.", "decoder.up_blocks.")) for k in keys):  # diffusers names
        from safetensors.torch import load_file

        model = AutoencoderKL.from_config(AutoencoderKL.load_config(str(cfg_dir / "vae")))
        model.load_state_dict(load_file(str(p)), strict=True)
        return model.to(dtype)
    if not any(k.startswith(("encoder.down.", VAE_PREFIX + "encoder.down.")) for k in keys):
        raise ValueError(f"{source}: {str(p)!r} holds no VAE weights (neither LDM nor diffusers names)")
    return AutoencoderKL.from_single_file(str(p), config=str(cfg_dir), subfolder="vae", torch_dtype=dtype,
                                          local_files_only=True)


def _from_single_file(path: Path, family: str | None, dtype, device, tokenizer, config: str | None,
                      vae=None, prediction_type: str | None = None) -> ModelBundle:
    import diffusers

    facts = _file_facts(path) if path.suffix.lower() == ".safetensors" else \
        {"keys": None, "dtype": "unknown (pickle)", "vae": True, "v_pred": False, "ztsnr": False}
    fam = get_family(family) if family is not None else detect_single_file(facts["keys"], path)
    if fam.is_flow_transformer:
        return _flow_single_file(path, fam, facts, dtype, device, tokenizer, config, vae, prediction_type)
    if fam.single_file_pipeline is None:
        known = [f.name for f in FAMILIES.values() if f.single_file_pipeline]
        raise ValueError(f"{path}: single-file checkpoints must be family {' or '.join(repr(n) for n in known)}, "
                         f"got {fam.name!r}")
    toks, tok_source = single_file_tokenizers(fam, tokenizer, str(path))
    if not facts["vae"] and vae is None:
        raise ValueError(f"{path}: this checkpoint holds no VAE (no {VAE_PREFIX}* weights); pass --vae PATH "
                         f"(vae=PATH): a diffusers VAE folder or a VAE .safetensors of this model family")
    cfg_dir = Path(config) if config else CONFIG_DIR / fam.config_dir
    if not (cfg_dir / "model_index.json").exists():
        raise FileNotFoundError(f"{cfg_dir}: no model_index.json (config folder for {path})")
    extra = {f"tokenizer_{i + 1}": toks[i] for i in range(1, fam.text_encoders)}
    if fam.text_encoders == 1:  # the SD pipeline's safety checker is not part of the model
        extra.update(safety_checker=None, requires_safety_checker=False)
    vae_model, vae_note = None, "VAE: in the file"
    if vae is not None:
        vae_model, vae_note = _load_vae(vae, cfg_dir, dtype, str(path)), f"VAE: {vae}"
        extra["vae"] = vae_model
        if facts["vae"]:
            vae_note += " (replaces the file's own)"
    pipe = getattr(diffusers, fam.single_file_pipeline).from_single_file(
        str(path), config=str(cfg_dir), tokenizer=toks[0], **extra, torch_dtype=dtype, local_files_only=True)
    tes = [pipe.text_encoder] + [getattr(pipe, f"text_encoder_{i + 1}") for i in range(1, fam.text_encoders)]
    for te, tok in zip(tes, toks):
        if len(tok) > te.config.vocab_size:
            raise ValueError(f"{path}: the tokenizer ({tok_source}) has {len(tok)} tokens but the text encoder knows "
                             f"{te.config.vocab_size}; pass --tokenizer DIR with the tokenizer this model was trained with")
    if prediction_type is not None:
        pred, why = prediction_type, "--prediction-type"
    elif facts["v_pred"]:
        pred, why = "v_prediction", "the file's `v_pred` key, as ComfyUI saves v-prediction models"
    else:
        pred, why = fam.prediction_type, f"the {fam.display_name} default; the file has no `v_pred` key"
    sched_kw = {"prediction_type": pred}
    if facts["ztsnr"]:
        sched_kw.update(rescale_betas_zero_snr=True, timestep_spacing="trailing")
        why += "; `ztsnr` key: zero-terminal-SNR schedule"
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, **sched_kw)
    line = (f"model: {fam.display_name} single file {path.name} ({facts['dtype']} weights, loaded as "
            f"{str(dtype).replace('torch.', '')}); prediction: {pred} ({why}); {vae_note}; tokenizer: {tok_source}")
    return _bundle(pipe.unet, tes, toks, pipe.vae, scheduler, fam.name, str(path), device,
                   fam.force_zeros_for_empty_prompt, detected=line)


def bundle_from_pipeline(pipe, source: str = "pipeline") -> ModelBundle:
    """A ModelBundle over a diffusers SD1.x / SDXL pipeline's own modules (shared, left as they are)."""
    tes = [te for te in (getattr(pipe, "text_encoder", None), getattr(pipe, "text_encoder_2", None)) if te is not None]
    toks = [tk for tk in (getattr(pipe, "tokenizer", None), getattr(pipe, "tokenizer_2", None)) if tk is not None]
    fam = family_with_text_encoders(len(tes))
    zeros = bool(getattr(pipe.config, "force_zeros_for_empty_prompt", False)) if fam.force_zeros_for_empty_prompt else False
    pred = getattr(pipe.scheduler.config, "prediction_type", "epsilon")
    return ModelBundle(pipe.unet, tes, toks, getattr(pipe, "vae", None), pipe.scheduler, fam.name, pred, source, zeros)


def _bundle(unet, tes, toks, vae, scheduler, family, source, device, zeros, pred=None, detected: str = "") -> ModelBundle:
    for m in [unet, *tes, *([vae] if vae is not None else [])]:
        m.to(device).eval().requires_grad_(False)
    # a flow scheduler has no prediction_type: the family's own (e.g. "flow") is the model's
    pred = pred or getattr(scheduler.config, "prediction_type", None) or get_family(family).prediction_type
    return ModelBundle(unet, list(tes), list(toks), vae, scheduler, family, pred, source, zeros, detected=detected)


def load_model(path, *, family: str | None = None, dtype: torch.dtype = torch.float32, device="cpu", tokenizer=None,
               allow_pickle: bool = False, config: str | None = None, vae=None, prediction_type: str | None = None,
               log=None) -> ModelBundle:
    """Load a diffusers folder, a single-file `.safetensors` (SD1.x/SDXL) or a pixel-space folder.

    family: a registered family name ("sd1", "sdxl", a plug-in's) to check (folders) or force (single
      files); detected when None.
    tokenizer: a CLIP tokenizer folder (or a model folder with tokenizer/ and tokenizer_2/); overrides a
      folder's own; for single files the default is the shipped standard CLIP tokenizer.
    config: a diffusers folder of configs for a single file (default: the shipped SD1.5/SDXL ones).
    vae: a diffusers VAE folder or a VAE .safetensors: required for a single file without VAE weights,
      replaces the model's own otherwise.
    prediction_type: "epsilon" or "v_prediction" over what was detected (module docstring).
    log: where the one line of what was detected goes (default: stderr); it is also `bundle.detected`.
    Pickle checkpoints (.ckpt/.pt/.bin) are refused unless allow_pickle=True.
    """
    p = Path(path)
    if family is not None:
        get_family(family)
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction type {prediction_type!r}: expected one of {PREDICTION_TYPES}")
    if not p.exists():
        raise FileNotFoundError(f"model {str(p)!r} does not exist")
    if p.is_dir():
        bundle = _from_folder(p, family, dtype, device, tokenizer, vae, prediction_type)
    else:
        suffix = p.suffix.lower()
        if suffix in PICKLE_SUFFIXES and not allow_pickle:
            raise ValueError(f"{p}: pickle checkpoints ({suffix}) can run arbitrary code; convert it to .safetensors "
                             f"or pass allow_pickle=True (CLI: --allow-pickle) if you trust the file")
        if suffix not in (".safetensors", *PICKLE_SUFFIXES):
            raise ValueError(f"{p}: unsupported model file type {suffix!r} (expected a diffusers folder or a .safetensors file)")
        if suffix != ".safetensors" and family is None:
            # diffusers' single-file loader reads pickles with torch.load(weights_only=True).
            known = [f.name for f in FAMILIES.values() if f.single_file_pipeline]
            raise ValueError(f"{p}: pass family={' or '.join(repr(n) for n in known)} for a pickle checkpoint")
        bundle = _from_single_file(p, family, dtype, device, tokenizer, config, vae, prediction_type)
    if log is None:
        print(bundle.detected, file=sys.stderr, flush=True)
    elif log:
        log(bundle.detected)
    return bundle


def model_fingerprint(bundle: ModelBundle) -> str:
    """sha256 fingerprint of the UNet weights (core.offsets.model_hash: sampled values, cheap)."""
    from ..core.offsets import model_hash

    return model_hash(bundle.unet)
