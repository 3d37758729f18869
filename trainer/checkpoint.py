"""Resumable training checkpoints, written atomically.

Layout of `output_dir/checkpoints/`:
    step_000200/
        adapters.safetensors   every LoRA adapter ("policy", "ref", "ema"), keys "<adapter>/<module>.lora_A|B"
        state.pt               optimizer, lr scheduler, data position, reference updater, step
        rng_<rank>.pt          python / numpy / torch (/ cuda) RNG states of each process
        config.yaml            the resolved TrainConfig
        meta.json              step, time, format version
    latest                     a one-line pointer ("step_000200"), written last, atomically

A checkpoint directory is first written as `.tmp_step_000200`, then renamed in one
`os.replace` (`core.atomic.replace_dir`); `latest` is replaced afterwards (`core.atomic`). A crash
(even SIGKILL) or a full disk leaves either the old or the new checkpoint, never half of one; a
write error removes the temp folder and names the checkpoint. Adapters holding NaN/inf are
refused, so every checkpoint on disk is a finite state. `.pt` files hold only tensors and plain containers and
are read with `torch.load(weights_only=True)`.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..core.atomic import named_error, replace_dir, write_bytes, write_durable
from ..core.finite import first_nonfinite

FORMAT_VERSION = 1
LATEST = "latest"


def step_name(step: int) -> str:
    return f"step_{step:06d}"


def _torch_save(obj: Any, path: Path) -> None:
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    write_durable(path, buf.getvalue())


def capture_rng() -> dict[str, Any]:
    """RNG states of python, numpy, torch (and CUDA), as weights_only-loadable objects."""
    np_state = np.random.get_state()
    out = {
        "python": {"state": list(random.getstate()[1]), "gauss": random.getstate()[2]},
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate((3, tuple(state["python"]["state"]), state["python"]["gauss"]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class Checkpoint:
    path: Path
    step: int
    adapters: dict[str, dict[str, torch.Tensor]]
    state: dict[str, Any]
    config_yaml: str

    def rng(self, rank: int = 0) -> dict[str, Any] | None:
        p = self.path / f"rng_{rank}.pt"
        return torch.load(p, weights_only=True) if p.is_file() else None


def checkpoints_dir(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / "checkpoints"


def begin(output_dir: str | os.PathLike, step: int) -> Path:
    """Create the (empty) temp folder of checkpoint `step`; main process only."""
    tmp = checkpoints_dir(output_dir) / f".tmp_{step_name(step)}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def write_rng(tmp: Path, rank: int) -> None:
    """Every process writes its own RNG states into the temp folder."""
    _torch_save(capture_rng(), tmp / f"rng_{rank}.pt")


def commit(tmp: Path, step: int, adapters: dict[str, dict[str, torch.Tensor]], state: dict[str, Any],
           config_yaml: str, keep_last: int) -> Path:
    """Write the main files into `tmp`, rename it to step_N, move `latest`, prune; main process only.

    Refuses (ValueError naming the tensor) adapters with a non-finite value: a checkpoint always
    holds a finite state. On a write error (disk full) the temp folder is removed, the previous
    checkpoints and `latest` are unchanged, and the OSError names the checkpoint."""
    from safetensors.torch import save as st_save

    flat = {f"{a}/{k}": v.detach().cpu().contiguous() for a, sd in adapters.items() for k, v in sd.items()}
    bad = first_nonfinite(flat)
    final = tmp.parent / step_name(step)
    try:
        if bad is not None:
            raise ValueError(f"checkpoint {final}: not written, tensor {bad!r} holds a non-finite value")
        write_durable(tmp / "adapters.safetensors", st_save(flat, metadata={"format": "npo_suite-checkpoint"}))
        _torch_save(state, tmp / "state.pt")
        write_durable(tmp / "config.yaml", config_yaml.encode("utf-8"))
        meta = {"step": step, "time": time.time(), "version": FORMAT_VERSION}
        write_durable(tmp / "meta.json", json.dumps(meta).encode())
        replace_dir(tmp, final)  # re-saving the same step (interrupt right after a periodic save) replaces it
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and str(final) not in str(e):
            raise named_error(e, final, "saving checkpoint") from e
        raise
    write_bytes(tmp.parent / LATEST, (final.name + "\n").encode())
    prune(tmp.parent, keep_last)
    return final


def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    return sorted((p for p in ckpt_dir.glob("step_*") if p.is_dir() and (p / "meta.json").is_file()),
                  key=lambda p: int(p.name.split("_")[1]))


def prune(ckpt_dir: Path, keep_last: int) -> None:
    """Keep the newest `keep_last` complete checkpoints (and never the one `latest` names)."""
    latest = (ckpt_dir / LATEST).read_text().strip() if (ckpt_dir / LATEST).is_file() else None
    for p in list_checkpoints(ckpt_dir)[:-keep_last] if keep_last > 0 else []:
        if p.name != latest:
            shutil.rmtree(p, ignore_errors=True)


def resolve(resume: str, output_dir: str | os.PathLike) -> Path:
    """`resume` is "latest" (the run's pointer) or a checkpoint folder path."""
    if resume == LATEST:
        ckdir = checkpoints_dir(output_dir)
        ptr = ckdir / LATEST
        if not ptr.is_file():
            raise FileNotFoundError(f"--resume latest: no checkpoint pointer {ptr} (has this run saved a checkpoint?)")
        path = ckdir / ptr.read_text().strip()
    else:
        path = Path(resume)
        if (path / LATEST).is_file():  # a checkpoints/ folder
            path = path / (path / LATEST).read_text().strip()
        elif (path / "checkpoints" / LATEST).is_file():  # a run folder
            path = path / "checkpoints" / (path / "checkpoints" / LATEST).read_text().strip()
    if not (path / "meta.json").is_file():
        raise FileNotFoundError(f"resume: {path} is not a complete checkpoint folder (no meta.json)")
    return path


def load(path: str | os.PathLike) -> Checkpoint:
    from safetensors.torch import load_file

    path = Path(path)
    for name in ("adapters.safetensors", "state.pt", "config.yaml", "meta.json"):
        if not (path / name).is_file():
            raise FileNotFoundError(f"checkpoint {path}: missing {name}")
    meta = json.loads((path / "meta.json").read_text())
    if meta.get("version") != FORMAT_VERSION:
        raise ValueError(f"checkpoint {path}: format version {meta.get('version')}, this build reads {FORMAT_VERSION}")
    adapters: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in load_file(str(path / "adapters.safetensors")).items():
        a, _, key = k.partition("/")
        adapters.setdefault(a, {})[key] = v
    state = torch.load(path / "state.pt", weights_only=True)
    return Checkpoint(path, int(meta["step"]), adapters, state, (path / "config.yaml").read_text(encoding="utf-8"))
