"""Helpers shared by the trainer tests (D2): tiny on-disk datasets and a base TrainConfig.

Images are 16x16 random-colour PNGs (VAE latents 4x2x2 on the tiny models), so a step of the
tiny UNet takes milliseconds and the whole data pipeline (JSONL -> PIL -> VAE -> cache ->
resumable sampler -> collate) is exercised for real.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

RES = 16
WORDS = ["cat", "dog", "tree", "house", "car", "person", "red", "blue"]


def _png(path: Path, rng: np.random.Generator) -> str:
    from PIL import Image

    Image.fromarray(rng.integers(0, 256, (RES, RES, 3), dtype=np.uint8)).save(path)
    return path.name


def make_pairs(root, n: int = 8, seed: int = 0) -> Path:
    """pairs.jsonl + PNGs under `root`; returns the JSONL path."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(n):
        lines.append({"id": f"p{i}", "prompt": f"a photo of a {WORDS[i % len(WORDS)]} {WORDS[(i * 3 + 1) % len(WORDS)]}",
                      "chosen": _png(root / f"w{i}.png", rng), "rejected": _png(root / f"l{i}.png", rng)})
    path = root / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return path


def make_prompts(root, n: int = 8, seed: int = 0, losers: bool = False) -> Path:
    """prompts.jsonl with one image each (TDFT starts from them, DDSPO uses them as winners);
    losers=True adds a `loser_image` and a `neg_prompt` per row (DDSPO's generated losers)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lines = [{"id": f"q{i}", "prompt": f"a detailed painting of a red {WORDS[i % len(WORDS)]} with a tree",
              "image": _png(root / f"i{i}.png", rng)} for i in range(n)]
    if losers:
        for i, x in enumerate(lines):
            x.update(neg_prompt="a painting", loser_image=_png(root / f"l{i}.png", rng))
    path = root / "prompts.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return path


def data_for(method_name: str, root) -> Path:
    """The data a method needs (its Method.data_kind); DDSPO's rows carry generated loser images."""
    from npo_suite.trainer.methods import METHODS

    kind = METHODS[method_name].data_kind
    if kind == "pairs":
        return make_pairs(Path(root) / "pairs")
    return make_prompts(Path(root) / "prompts", losers=kind == "prompts_with_winners")


def tiny_cfg(model_dir, data_path, out, **overrides):
    """A TrainConfig for the tiny models: 16 px, rank 2, a few steps, no validation."""
    from npo_suite.trainer.config import TrainConfig

    base = dict(model=str(model_dir), data_path=[str(data_path)], output_dir=str(out), resolution=RES, steps=2,
                batch_size=2, lr=1e-3, lr_scheduler="constant", lora_rank=2, lora_alpha=2.0, log_every=1,
                checkpoint_every=0, beta=5000.0, seed=0, cpu=True)
    base.update(overrides)
    return TrainConfig(**base)


def load_pipe(path):
    """A fresh, mutable copy of a saved tiny pipeline (SD1.x or SDXL)."""
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(str(path))


def train_two_steps(cfg, backend):
    """`trainer.loop.train` for cfg's 2 steps on a prebuilt backend: finished, finite loss and gradient
    norm, the policy moved. Returns the TrainResult (the smoke tests of every method, eps and flow)."""
    import math

    import torch

    from npo_suite.trainer.loop import train

    before = [p.detach().clone() for p in backend.trainable_parameters()]
    result = train(cfg, backend=backend)
    assert result.steps_done == cfg.steps == 2 and not result.interrupted
    assert math.isfinite(result.last_metrics["loss"]) and math.isfinite(result.last_metrics["grad_norm"])
    assert any(not torch.equal(a, p) for a, p in zip(before, backend.trainable_parameters()))
    return result


def torchrun_train(cfg, tmp_path, env: dict, processes: int = 2, script=None, args=()):
    """`python -m npo_suite train` on `cfg` (written to tmp_path/run.yaml) under torch.distributed.run with
    `processes` CPU processes (gloo, a free loopback port for the rendezvous), in environment `env`;
    returns the CompletedProcess (its stderr holds the run's lines). script: a Python file each process runs
    instead, with the config's path and `args` as its arguments."""
    import socket
    import subprocess
    import sys

    import yaml

    run = Path(tmp_path) / "run.yaml"
    run.write_text(yaml.safe_dump(cfg.to_dict()))
    for attempt in range(3):  # the free port is found before torchrun binds it: another process may take it first
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_addr",
               "127.0.0.1", "--master_port", str(port),
               *([str(script), str(run), *map(str, args)] if script else ["-m", "npo_suite", "train", "--config", str(run)])]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        if proc.returncode == 0 or not any(m in proc.stderr for m in ("Address already in use", "EADDRINUSE")):
            return proc
    return proc  # three port races in a row: the caller's assertion shows the stderr
