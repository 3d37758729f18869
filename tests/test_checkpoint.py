"""trainer/checkpoint.py: atomic commit, `latest` pointer, pruning, resolve, RNG round trip."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from npo_suite.core.atomic import write_bytes
from npo_suite.trainer import checkpoint as ckpt


def _save(out, step, keep_last=2, value=1.0):
    tmp = ckpt.begin(out, step)
    ckpt.write_rng(tmp, 0)
    adapters = {"policy": {"m.lora_A": torch.full((2, 3), value), "m.lora_B": torch.zeros(3, 2)},
                "ref": {"m.lora_A": torch.ones(2, 3), "m.lora_B": torch.ones(3, 2)}}
    state = {"step": step, "optimizer": {"state": {0: {"exp_avg": torch.ones(2)}}, "param_groups": [{"lr": 0.1}]},
             "data": {"epoch": 1, "index": 4}, "reference": None}
    return ckpt.commit(tmp, step, adapters, state, f"steps: {step}\n", keep_last)


def test_commit_load_latest_and_prune(tmp_path):
    for step in (1, 2, 3):
        path = _save(tmp_path, step, value=float(step))
    ckdir = ckpt.checkpoints_dir(tmp_path)
    assert (ckdir / "latest").read_text().strip() == "step_000003" == path.name
    assert [p.name for p in ckpt.list_checkpoints(ckdir)] == ["step_000002", "step_000003"]  # keep_last=2
    assert not list(ckdir.glob(".tmp_*"))
    c = ckpt.load(ckpt.resolve("latest", tmp_path))
    assert c.step == 3 and c.config_yaml == "steps: 3\n"
    assert torch.equal(c.adapters["policy"]["m.lora_A"], torch.full((2, 3), 3.0))
    assert set(c.adapters) == {"policy", "ref"}
    assert c.state["data"] == {"epoch": 1, "index": 4}
    assert c.rng(0) is not None and c.rng(1) is None
    # a run folder and a checkpoints folder resolve too
    assert ckpt.resolve(str(tmp_path), tmp_path) == path
    assert ckpt.resolve(str(ckdir), tmp_path) == path


def test_resave_same_step_replaces(tmp_path):
    _save(tmp_path, 5, value=1.0)
    path = _save(tmp_path, 5, value=7.0)
    assert torch.equal(ckpt.load(path).adapters["policy"]["m.lora_A"], torch.full((2, 3), 7.0))


def test_half_written_checkpoint_is_ignored(tmp_path):
    _save(tmp_path, 2)
    tmp = ckpt.begin(tmp_path, 4)  # a crash after begin(): no meta.json, no rename, latest untouched
    (tmp / "adapters.safetensors").write_bytes(b"garbage")
    assert ckpt.resolve("latest", tmp_path).name == "step_000002"
    assert [p.name for p in ckpt.list_checkpoints(ckpt.checkpoints_dir(tmp_path))] == ["step_000002"]


def test_resolve_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint pointer"):
        ckpt.resolve("latest", tmp_path)
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        ckpt.resolve(str(tmp_path), tmp_path)
    path = _save(tmp_path, 1)
    (path / "state.pt").unlink()
    with pytest.raises(FileNotFoundError, match="missing state.pt"):
        ckpt.load(path)


def test_rng_roundtrip():
    random.seed(3), np.random.seed(3), torch.manual_seed(3)
    random.gauss(0, 1)  # leaves a cached gaussian in python's state
    np.random.standard_normal()
    state = ckpt.capture_rng()
    a = (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), torch.rand(3))
    random.seed(99), np.random.seed(99), torch.manual_seed(99)
    ckpt.restore_rng(state)
    b = (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), torch.rand(3))
    assert a[:3] == b[:3] and torch.equal(a[3], b[3])


def test_atomic_write_bytes(tmp_path):
    p = tmp_path / "f.txt"
    write_bytes(p, b"one")
    write_bytes(p, b"two")
    assert p.read_bytes() == b"two" and [q.name for q in tmp_path.iterdir()] == ["f.txt"]
