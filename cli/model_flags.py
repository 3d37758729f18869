"""The flags every command that loads a model shares (`generate`, `pairs`, `evaluate sweep`, `ddspo-prepare`;
`train` has them as TrainConfig fields): how a single-file checkpoint is completed (families/loading.py)."""
from __future__ import annotations

import argparse

TOKENIZER_HELP = ("CLIP tokenizer folder (or a model folder with tokenizer/ and tokenizer_2/); default: a folder's "
                  "own, and for a single-file checkpoint the standard CLIP tokenizer shipped in configs/clip_tokenizer")
VAE_HELP = ("a diffusers VAE folder or a VAE .safetensors: required for a single file without VAE weights, "
            "replaces the model's own otherwise")
MODEL_CONFIG_HELP = ("for a single-file checkpoint: the diffusers folder it belongs to. SD1.x/SDXL: its configs "
                     "(default: the shipped configs/sd15, configs/sdxl); SD3/SD3.5 (and Flux): required, the model's "
                     "diffusers folder, whose text encoders, tokenizers and scheduler are used with the file's transformer")
PREDICTION_HELP = ("epsilon | v_prediction (default: detected: a folder's scheduler config, a single file's `v_pred` "
                   "key as ComfyUI saves it, else the family's default)")


def add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokenizer", default=None, help=TOKENIZER_HELP)
    p.add_argument("--vae", default=None, help=VAE_HELP)
    p.add_argument("--model-config", default=None, metavar="DIR", help=MODEL_CONFIG_HELP)
    p.add_argument("--prediction-type", default=None, choices=["epsilon", "v_prediction"], help=PREDICTION_HELP)


def load_kwargs(args: argparse.Namespace) -> dict:
    """The keyword arguments of `families.loading.load_model` these flags set."""
    return {"tokenizer": args.tokenizer, "vae": args.vae, "prediction_type": args.prediction_type,
            "config": args.model_config}
