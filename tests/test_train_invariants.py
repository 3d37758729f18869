"""Invariants of the training loop (STYLE.md "tests in layers"; trl tests/invariant):

1. batch 2 x accumulation 1 == batch 1 x accumulation 2 on the same data order;
2. 2-process DDP on CPU (gloo, `torchrun`) == one process with the same global batch;
3. a run killed with SIGKILL after its 2nd checkpoint and resumed == the uninterrupted run.
"""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from test_train_smoke import backend_for  # noqa: E402
from train_fixtures import make_pairs, tiny_cfg, torchrun_train  # noqa: E402

REPO_PARENT = str(Path(__file__).resolve().parents[2])


def _lora_tensors(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def _assert_same_lora(a, b, **tol):
    ta, tb = _lora_tensors(a), _lora_tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        if tol:
            torch.testing.assert_close(ta[k], tb[k], **tol)
        else:
            assert torch.equal(ta[k], tb[k]), k


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH", ""),) if p)
    return env


@contextlib.contextmanager
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class RowwiseMethod:
    """Wraps a pair method so each pair's noise/timestep come from a generator seeded by its prompt.

    The registered methods draw a batch's noise in one call, so batch 2 and 2 x batch 1 draw
    different noise by design; this wrapper removes only that difference, so the test checks the
    loop's arithmetic (loss / accumulation, gradient sums, metric averaging, data order)."""

    def __init__(self, inner):
        self.inner = inner
        self.data_kind, self.name, self.role = inner.data_kind, inner.name, inner.role

    def setup(self, backend, cfg):
        self.inner.setup(backend, cfg)

    def after_step(self, backend, cfg):
        self.inner.after_step(backend, cfg)

    def compute(self, backend, batch, cfg, generator):
        from npo_suite.trainer.batches import PairBatch
        from npo_suite.trainer.methods import StepOut

        outs = []
        for i in range(batch.latents_w.shape[0]):
            g = torch.Generator().manual_seed(sum(map(ord, batch.prompts[i])))
            row = PairBatch(batch.latents_w[i:i + 1], batch.latents_l[i:i + 1], batch.cond.index(slice(i, i + 1)),
                            batch.prompts[i:i + 1])
            outs.append(self.inner.compute(backend, row, cfg, g))
        loss = torch.stack([o.loss for o in outs]).mean()
        metrics = {k: torch.stack([torch.as_tensor(o.metrics[k]) for o in outs]).float().mean() for k in outs[0].metrics}
        return StepOut(loss, metrics)


@pytest.mark.slow
def test_batch2_equals_batch1_accum2(sd15_dir, tmp_path, monkeypatch):
    """Tolerance rtol 1e-4 / atol 1e-6: one forward of 2 rows vs two of 1 row and a gradient sum in
    another order differ by float32 rounding (~1e-7 relative), which Adam's first steps pass on."""
    from npo_suite.trainer import methods
    from npo_suite.trainer.loop import train

    monkeypatch.setitem(methods.METHODS, "dpo", RowwiseMethod(methods.METHODS["dpo"]))
    data = make_pairs(tmp_path / "data")
    paths = []
    for bs, acc in ((2, 1), (1, 2)):
        cfg = tiny_cfg(sd15_dir, data, tmp_path / f"out_{bs}x{acc}", batch_size=bs, grad_accum=acc, steps=3)
        res = train(cfg, backend=backend_for(sd15_dir, cfg))
        paths.append((res.lora_path, res.last_metrics))
    _assert_same_lora(paths[0][0], paths[1][0], rtol=1e-4, atol=1e-6)
    assert paths[0][1]["loss"] == pytest.approx(paths[1][1]["loss"], rel=1e-5)


@pytest.mark.slow
def test_ddp_two_processes_equals_one(sd15_dir, tmp_path):
    """2 x (batch 1) under gloo == 1 process x batch 1 x accumulation 2: the same pairs (sampler
    sharding) and the same noise (generator seeded per global micro-batch). Tolerance atol 1e-6
    (measured: bit-equal): the all-reduce averages (g0 + g1) / 2 where one process accumulates
    g0/2 + g1/2, equal in exact arithmetic, not always in float32."""
    from npo_suite.trainer.loop import train

    data = make_pairs(tmp_path / "data")
    cfg = tiny_cfg(sd15_dir, data, tmp_path / "ddp", batch_size=1, grad_accum=1, steps=2)
    proc = torchrun_train(cfg, tmp_path, _env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = tiny_cfg(sd15_dir, data, tmp_path / "one", batch_size=1, grad_accum=2, steps=2)
    with one_thread():
        res = train(one, backend=backend_for(sd15_dir, one))
    _assert_same_lora(tmp_path / "ddp" / "dpo_lora.safetensors", res.lora_path, rtol=0, atol=1e-6)


@pytest.mark.slow
def test_resume_after_sigkill_equals_uninterrupted(sd15_dir, tmp_path):
    """Bit-exact: the checkpoint holds the LoRA, Adam moments, scheduler, data position and RNG;
    noise is re-seeded per micro-batch; both runs use one thread (same float reduction order)."""
    from npo_suite.trainer import checkpoint as ckpt
    from npo_suite.trainer.loop import train

    data = make_pairs(tmp_path / "data")
    steps = 40
    cfg = tiny_cfg(sd15_dir, data, tmp_path / "killed", steps=steps, checkpoint_every=1, keep_last=2,
                   lr_scheduler="linear", lr_warmup_steps=3)
    run = tmp_path / "run.yaml"
    run.write_text(yaml.safe_dump(cfg.to_dict()))
    proc = subprocess.Popen([sys.executable, "-m", "npo_suite", "train", "--config", str(run)], env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    latest = Path(cfg.output_dir) / "checkpoints" / "latest"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if latest.is_file() and latest.read_text().strip() >= "step_000002":
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.005)
    proc.wait(60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read()[-3000:]
    killed_at = ckpt.load(ckpt.resolve("latest", cfg.output_dir)).step
    assert 2 <= killed_at < steps
    with one_thread():  # as the subprocess (OMP_NUM_THREADS=1): the same float reduction order
        resumed = train(cfg, backend=backend_for(sd15_dir, cfg), resume="latest")
        ref_cfg = cfg.replace(output_dir=str(tmp_path / "straight"), checkpoint_every=0)
        straight = train(ref_cfg, backend=backend_for(sd15_dir, ref_cfg))
    assert resumed.steps_done == steps
    _assert_same_lora(resumed.lora_path, straight.lora_path)
    rows = (Path(cfg.output_dir) / "metrics.csv").read_text().strip().splitlines()[1:]
    assert [int(r.split(",")[0]) for r in rows] == list(range(1, steps + 1))  # no duplicated/missing steps
