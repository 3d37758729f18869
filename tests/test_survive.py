"""Training that survives (issue 16): non-finite steps, diverging runs, write failures (injected
ENOSPC), SIGTERM, run-health warnings, and the non-finite refusal of the writers and the loader."""
from __future__ import annotations

import csv
import dataclasses
import errno
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).parent))
from test_train_smoke import backend_for  # noqa: E402
from train_fixtures import data_for, make_pairs, tiny_cfg  # noqa: E402

from npo_suite.core import atomic  # noqa: E402
from npo_suite.core.offsets import load_offset  # noqa: E402
from npo_suite.nodes.comfy.progress import ProgressDisplay  # noqa: E402
from npo_suite.trainer import checkpoint as ckpt  # noqa: E402
from npo_suite.trainer.loop import Callbacks, NonFiniteError, train  # noqa: E402
from npo_suite.trainer.methods import METHODS  # noqa: E402
from npo_suite.trainer.health import RunHealth  # noqa: E402

def metrics_rows(out) -> list[dict]:
    with open(Path(out) / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def all_finite(tensors) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in tensors.values() if v.is_floating_point())


@pytest.fixture
def enospc(monkeypatch):
    """`enospc(pattern)`: from now on, fsync of a file whose path matches `pattern` fails with
    ENOSPC, as a full disk reports it (the data did not reach the disk)."""
    real = os.fsync
    state = {"pattern": None, "hits": 0}

    def fsync(fd):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            target = ""
        if state["pattern"] and re.search(state["pattern"], target):
            state["hits"] += 1
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)

    def arm(pattern: str | None):
        state["pattern"] = pattern
        return state
    return arm


# ---------------------------------------------------------------------------------------------
# the non-finite guard in the loop
# ---------------------------------------------------------------------------------------------
def _poison(monkeypatch, method: str, bad_calls: set[int]):
    """Make METHODS[method].compute return a NaN loss (NaN gradients) on the given 1-based calls."""
    m = METHODS[method]
    orig, calls = m.compute, []

    def compute(backend, batch, cfg, generator=None):
        out = orig(backend, batch, cfg, generator)
        calls.append(1)
        return dataclasses.replace(out, loss=out.loss * float("nan")) if len(calls) in bad_calls else out
    monkeypatch.setattr(m, "compute", compute)


@pytest.mark.parametrize("method", ["dpo", "tdft"])  # reference updates (dpo) and the EMA teacher (tdft)
def test_nonfinite_step_changes_nothing(method, sd15_dir, tmp_path, monkeypatch):
    cfg = tiny_cfg(sd15_dir, data_for(method, tmp_path), tmp_path / "out", method=method, steps=5,
                   lr_scheduler="linear", checkpoint_every=3, ref_update_every=1 if method == "dpo" else 0)
    backend = backend_for(sd15_dir, cfg)
    snaps, warned = {}, []

    def progress(step, total, loss):
        snaps[step] = {a: {k: v.clone() for k, v in backend.adapter_state(a).items()} for a in backend.adapters}

    _poison(monkeypatch, method, {2, 3})
    result = train(cfg, backend=backend, callbacks=Callbacks(progress=progress, warning=warned.append))

    same = lambda a, b: all(torch.equal(a[n][k], b[n][k]) for n in a for k in a[n])  # noqa: E731
    assert len(backend.adapters) >= 2  # policy + ref / ema: all of them are held still
    assert same(snaps[1], snaps[2]) and same(snaps[2], snaps[3])  # steps 2, 3 changed no adapter
    assert not same(snaps[3], snaps[4])  # training goes on afterwards
    rows = metrics_rows(cfg.output_dir)
    assert [int(r["train/skipped_nonfinite"]) for r in rows] == [0, 1, 2, 2, 2]
    lrs = [float(r["lr"]) for r in rows]
    assert lrs[1] < lrs[0] and lrs[1] == lrs[2] == lrs[3] > lrs[4]  # no scheduler step while skipping
    state = ckpt.load(result.checkpoint).state  # step 3: one optimizer step applied so far
    assert result.checkpoint.name == "step_000003"
    assert all(int(s["step"]) == 1 for s in state["optimizer"]["state"].values())
    assert result.skipped_nonfinite == 2 and result.steps_done == 5
    nonfinite = [w for w in result.warnings if "not finite" in w]
    assert len(nonfinite) == 1 and nonfinite[0].startswith("step 2:") and warned == result.warnings
    assert load_offset(result.lora_path, base=backend.unet)  # finite (the loader refuses NaN)


def test_diverging_run_stops_with_clear_error_and_keeps_the_finite_state(sd15_dir, tmp_path, capsys):
    """`train --lr 1e6` diverged silently (exit 0, NaN LoRA, NaN checkpoints pruning the good ones)."""
    from npo_suite import cli

    out = tmp_path / "out"
    argv = ["train", "--model", str(sd15_dir), "--data-path", str(make_pairs(tmp_path / "pairs")), "--output-dir",
            str(out), "--resolution", "16", "--steps", "30", "--batch-size", "2", "--lr", "1e6", "--lora-rank", "2",
            "--checkpoint-every", "2", "--keep-last", "2", "--log-every", "1", "--max-nonfinite-steps", "4", "--cpu"]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert re.search(r"step 5: 4 consecutive steps with a non-finite loss or gradient norm", err)
    for cause in ("lr 1e+06", "beta 5000", "precision no", "--resume latest"):
        assert cause in err
    ckdir = ckpt.checkpoints_dir(out)
    kept = ckpt.list_checkpoints(ckdir)
    assert [p.name for p in kept] == ["step_000004", "step_000005"]
    for p in kept:
        assert all_finite(load_file(str(p / "adapters.safetensors")))
    assert not (out / "dpo_lora.safetensors").exists()  # never the finished LoRA's name
    assert all_finite(load_file(str(out / "dpo_lora.last_finite.safetensors")))
    assert int(metrics_rows(out)[-1]["train/skipped_nonfinite"]) == 4


def test_nonfinite_weights_are_never_saved_and_the_last_good_checkpoint_stays(sd15_dir, tmp_path):
    """Weights that went non-finite (an overflowing update): no checkpoint of them, keep_last keeps
    the last finite one, and the final LoRA is refused naming it."""
    cfg = tiny_cfg(sd15_dir, data_for("dpo", tmp_path), tmp_path / "out", steps=3, checkpoint_every=1, keep_last=1,
                   max_nonfinite_steps=0)
    backend = backend_for(sd15_dir, cfg)

    def progress(step, total, loss):
        if step == 1:
            with torch.no_grad():
                backend.trainable_parameters()[0].fill_(float("inf"))
    with pytest.raises(NonFiniteError, match=r"step 3: the LoRA is not written, policy/.* non-finite.*step_000001"):
        train(cfg, backend=backend, callbacks=Callbacks(progress=progress))
    ckdir = ckpt.checkpoints_dir(cfg.output_dir)
    assert [p.name for p in ckpt.list_checkpoints(ckdir)] == ["step_000001"]
    assert (ckdir / ckpt.LATEST).read_text().strip() == "step_000001"
    assert all_finite(load_file(str(ckdir / "step_000001" / "adapters.safetensors")))
    assert not (Path(cfg.output_dir) / "dpo_lora.safetensors").exists()


def test_checkpoint_and_lora_writers_refuse_nonfinite(tmp_path):
    from npo_suite.core.offsets import save_offset
    from npo_suite.core.offsets.types import LowRankDelta, Offset

    tmp = ckpt.begin(tmp_path, 1)
    bad = {"policy": {"m.lora_A": torch.tensor([[1.0, float("inf")]]), "m.lora_B": torch.zeros(2, 1)}}
    with pytest.raises(ValueError, match=r"step_000001.*'policy/m.lora_A'.*non-finite"):
        ckpt.commit(tmp, 1, bad, {"step": 1}, "", 2)
    assert not any(ckpt.checkpoints_dir(tmp_path).iterdir())  # no folder, no `latest`
    up = torch.full((4, 2), float("nan"))
    off = Offset(unet={"down_blocks.0.attentions.0.proj_in": LowRankDelta(torch.ones(2, 4), up, 1.0)})
    with pytest.raises(ValueError, match=r"lora_up.weight.*non-finite"):
        save_offset(off, tmp_path / "x.safetensors", format="kohya", family="sd1")
    assert not (tmp_path / "x.safetensors").exists()


def test_loader_and_inspect_refuse_nonfinite_offsets(sd15_dir, tmp_path, capsys):
    """A LoRA with NaN is refused where it is read (ComfyUI node, WebUI, generate, inspect all load_offset)."""
    from npo_suite import cli

    cfg = tiny_cfg(sd15_dir, data_for("dpo", tmp_path), tmp_path / "out", steps=1)
    good = train(cfg, backend=backend_for(sd15_dir, cfg)).lora_path
    sd = load_file(str(good))
    key = sorted(k for k in sd if k.endswith("lora_up.weight"))[1]
    sd[key] = sd[key].clone()
    sd[key].view(-1)[0] = float("nan")
    bad = tmp_path / "bad.safetensors"
    save_file(sd, str(bad))
    with pytest.raises(ValueError, match=re.escape(f"{bad}: tensor {key!r} holds a non-finite value")):
        load_offset(bad)
    assert cli.main(["offsets", "inspect", str(bad)]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and key in err


# ---------------------------------------------------------------------------------------------
# write failures: a full disk at a chosen write
# ---------------------------------------------------------------------------------------------
def test_checkpoint_write_fails_keeps_previous_and_resumes(sd15_dir, tmp_path, enospc):
    cfg = tiny_cfg(sd15_dir, data_for("dpo", tmp_path), tmp_path / "out", steps=4, checkpoint_every=2)
    enospc(r"\.tmp_step_000004/state\.pt")
    with pytest.raises(OSError, match=r"step_000004") as e:
        train(cfg, backend=backend_for(sd15_dir, cfg))
    assert e.value.errno == errno.ENOSPC
    ckdir = ckpt.checkpoints_dir(cfg.output_dir)
    assert (ckdir / ckpt.LATEST).read_text().strip() == "step_000002"
    assert sorted(p.name for p in ckdir.iterdir()) == ["latest", "step_000002"]  # no torn or temp folder
    assert ckpt.load(ckdir / "step_000002").step == 2
    enospc(None)
    resumed = train(cfg, backend=backend_for(sd15_dir, cfg), resume="latest")
    assert resumed.steps_done == 4 and resumed.lora_path.is_file()


def test_lora_write_fails_keeps_previous_file(sd15_dir, tmp_path, enospc):
    cfg = tiny_cfg(sd15_dir, data_for("dpo", tmp_path), tmp_path / "out", steps=1)
    first = train(cfg, backend=backend_for(sd15_dir, cfg)).lora_path
    before = first.read_bytes()
    enospc(r"dpo_lora\.safetensors")
    cfg2 = dataclasses.replace(cfg, seed=1)
    with pytest.raises(OSError, match=re.escape(str(first))) as e:
        train(cfg2, backend=backend_for(sd15_dir, cfg2))
    assert e.value.errno == errno.ENOSPC and first.read_bytes() == before
    assert not [p for p in first.parent.iterdir() if p.name.startswith(".")]  # temp file removed


def test_cache_write_fails_keeps_previous_item(tmp_path, enospc):
    from test_cache import CountingEncoder, make_pairs as cache_pairs

    from npo_suite.trainer.data.cache import LatentCache
    from npo_suite.trainer.data.records import PairRecord
    from npo_suite.trainer.data.transforms import ImageTransform

    rec = cache_pairs(tmp_path / "img", 1)[0]
    enc = CountingEncoder()
    cache = LatentCache(tmp_path / "cache", "m0", enc.encode_images, enc.encode_prompts, ImageTransform(32))
    cache.get_pair(rec)
    item = cache.item_path("pair", rec.id, 0)
    before = item.read_bytes()
    edited = PairRecord(rec.id, "an edited prompt", rec.chosen, rec.rejected)  # stale: rewritten
    enospc(re.escape(item.name))
    with pytest.raises(OSError, match=re.escape(str(item))) as e:
        cache.get_pair(edited)
    assert e.value.errno == errno.ENOSPC and item.read_bytes() == before
    assert [p.name for p in item.parent.iterdir()] == [item.name]
    enospc(None)
    assert not torch.equal(cache.get_pair(edited).cond.hidden, cache.get_pair(rec).cond.hidden)


def test_dataset_append_fails_keeps_previous_parts(tmp_path, sd15, enospc):
    """ddspo-prepare appends its dataset in part files: a full disk at the second part loses no line."""
    from npo_suite.core.ddspo_format import PARTS_DIR, PrepareConfig, read_manifest
    from npo_suite.diffusers_host.ddspo_prepare import prepare
    from npo_suite.trainer.data.prompts import PromptsFile
    from npo_suite.trainer.ddspo import build_rewriter

    rw = build_rewriter("drop_words")

    p = tmp_path / "prompts.txt"
    p.write_text("a photo of a red cat\na blue car in the house\na thick green tree\n")
    cfg, out = PrepareConfig(model="tiny", losers="none", steps=1, seed=3), tmp_path / "run"
    prepare(sd15, PromptsFile(p, verbose=False), out, cfg, batch_size=1, limit=1, verbose=False, rewriter=rw)
    assert len(read_manifest(out)) == 1
    enospc(r"/manifest\.d/\.part-")
    with pytest.raises(OSError, match=re.escape(str(out / PARTS_DIR))) as e:
        prepare(sd15, PromptsFile(p, verbose=False), out, cfg, batch_size=1, verbose=False, rewriter=rw)
    assert e.value.errno == errno.ENOSPC and len(read_manifest(out)) == 1
    assert not [q for q in (out / PARTS_DIR).iterdir() if q.name.startswith(".")]
    enospc(None)
    prepare(sd15, PromptsFile(p, verbose=False), out, cfg, batch_size=1, verbose=False, rewriter=rw)
    assert len(read_manifest(out)) == 3


def test_atomic_helpers(tmp_path, enospc):
    target = tmp_path / "f.json"
    atomic.write_text(target, "old")
    enospc(r"f\.json")
    with pytest.raises(OSError, match=re.escape(str(target))) as e:
        atomic.write_text(target, "new")
    assert e.value.errno == errno.ENOSPC and target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]
    log = tmp_path / "log.jsonl"
    log.write_text('{"a": 1}\n')
    enospc(r"log\.jsonl")
    with pytest.raises(OSError, match=re.escape(str(log))):
        atomic.append_bytes(log, b'{"b": 2}\n')
    assert log.read_text() == '{"a": 1}\n'  # cut back: no torn line
    enospc(None)
    atomic.append_bytes(log, b'{"b": 2}\n')
    assert log.read_text().splitlines() == ['{"a": 1}', '{"b": 2}']
    folder = tmp_path / "dir"
    with atomic.atomic_dir(folder) as d:
        (d / "x").write_text("1")
    with pytest.raises(RuntimeError):
        with atomic.atomic_dir(folder) as d:
            (d / "x").write_text("2")
            raise RuntimeError("boom")
    assert (folder / "x").read_text() == "1" and sorted(p.name for p in tmp_path.iterdir()) == ["dir", "f.json",
                                                                                                  "log.jsonl"]


# ---------------------------------------------------------------------------------------------
# SIGTERM / SIGINT on the CLI
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_at_a_step_boundary_and_saves(sig, sd15_dir, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "npo_suite", "train", "--model", str(sd15_dir), "--data-path",
           str(make_pairs(tmp_path / "pairs")), "--output-dir", str(out), "--resolution", "16", "--steps", "100000",
           "--batch-size", "2", "--lora-rank", "2", "--lr", "1e-3", "--lr-scheduler", "constant",
           "--checkpoint-every", "0", "--log-every", "1", "--cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 300  # a safety net against a hung child, not a speed check
        while time.monotonic() < deadline and proc.poll() is None:
            if (out / "metrics.csv").is_file() and len((out / "metrics.csv").read_text().splitlines()) > 3:
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr[-3000:]
    assert signal.Signals(sig).name in stderr
    done = int(re.search(r"train: interrupted at step (\d+)/100000", stdout).group(1))
    assert done >= 3
    ck = ckpt.resolve("latest", out)
    assert ckpt.load(ck).step == done and ck.name == ckpt.step_name(done)
    assert len(metrics_rows(out)) == done
    from safetensors import safe_open

    from npo_suite.core.offsets.schema import read_npo_metadata

    with safe_open(str(out / "dpo_lora.safetensors"), "pt") as f:
        assert read_npo_metadata(f.metadata())["steps"] == str(done)


# ---------------------------------------------------------------------------------------------
# health of a preference run
# ---------------------------------------------------------------------------------------------
def _feed(health, rows, cfg=None):
    out = []
    for i, m in enumerate(rows, 1):
        out += health.observe(i, m, cfg=cfg)
    return out


def test_health_saturation_warns_once():
    cfg = tiny_cfg("m", "d", "o", beta=5000.0, lr=1e-3)
    rows = [{"loss": 0.69, "implicit_acc": 0.5, "llr/winner": 0.0}] * 5
    rows += [{"loss": 1e-4, "implicit_acc": 1.0, "llr/winner": (-1) ** i * 1e-3} for i in range(60)]
    warnings = _feed(RunHealth(window=20, min_history=10), rows, cfg)
    assert len(warnings) == 1
    assert re.match(r"step \d+: implicit accuracy 1\.000 with loss .* beta or lr is likely too high "
                    r"\(beta 5000, lr 0\.001\)", warnings[0])


def test_health_winner_likelihood_falling_warns_once():
    rows = [{"loss": 0.6, "implicit_acc": 0.7, "llr/winner": 0.002 + 0.001 * (-1) ** i} for i in range(80)]
    warnings = _feed(RunHealth(window=30, min_history=20), rows)
    assert len(warnings) == 1 and "winner's likelihood is falling" in warnings[0]
    assert warnings[0].startswith("step 20:") and "llr/winner mean +0.002 " in warnings[0]
    noise = [{"loss": 0.6, "implicit_acc": 0.7, "llr/winner": 0.001 * (-1) ** i} for i in range(80)]
    assert _feed(RunHealth(window=30, min_history=20), noise) == []


def test_health_loss_spike_against_running_median():
    rows = [{"loss": 0.5 + 0.01 * (i % 3)} for i in range(30)] + [{"loss": 4.0}] + [{"loss": 0.5}] * 5 + [{"loss": 9.0}]
    warnings = _feed(RunHealth(window=50, min_history=20), rows)
    assert warnings == ["step 31: loss spike 4 = 7.8x the running median 0.51 of the last 30 steps"]


def test_health_warning_stays_in_the_progress_text():
    d = ProgressDisplay(10, text_every=1e9, clock=lambda: 0.0)
    d.update(1, 10, 0.5)
    assert d.update(2, 10, 0.5).text is None  # rate-limited
    d.warn("step 2: loss spike 4")
    first = d.update(3, 10, 0.5).text
    assert first.splitlines()[1:] == ["warning: step 2: loss spike 4"]  # sent at once, under the status line
    assert d.update(10, 10, 0.5).text.endswith("\nwarning: step 2: loss spike 4")


# ---------------------------------------------------------------------------------------------
# fp16: the GradScaler's own skip (real torch GradScaler + accelerate's AcceleratedOptimizer, on CPU)
# ---------------------------------------------------------------------------------------------
class _ScaledAcc:
    """The parts of accelerate's Accelerator that train_step uses, under fp16 loss scaling."""

    num_processes, process_index, device = 1, 0, torch.device("cpu")

    def __init__(self, scaler):
        self.scaler = scaler
        self.opt = None

    def autocast(self):
        import contextlib

        return contextlib.nullcontext()

    def backward(self, loss):
        self.scaler.scale(loss).backward()

    def clip_grad_norm_(self, params, max_norm):
        self.scaler.unscale_(self.opt.optimizer)  # as Accelerator.unscale_gradients does
        return torch.nn.utils.clip_grad_norm_(params, max_norm)


def test_fp16_scaler_skip_counts_and_nan_loss_lowers_the_scale():
    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer

    from npo_suite.trainer.loop import train_step

    Accelerator(cpu=True)  # the shared state AcceleratedOptimizer reads
    from npo_suite.trainer.methods import StepOut

    p = torch.nn.Parameter(torch.ones(3))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    acc = _ScaledAcc(scaler)
    acc.opt = opt = AcceleratedOptimizer(torch.optim.AdamW([p], lr=0.1), device_placement=False, scaler=scaler)
    losses = iter([lambda: (p ** 2).sum(), lambda: (p ** 2).sum() * float("nan"),
                   lambda: (p * 1e36).sum(), lambda: (p ** 2).sum()])  # the 3rd: finite loss, scaled grads overflow

    class Backend:
        def trainable_parameters(self):
            return [p]

    class Method:
        def compute(self, backend, batch, cfg, generator):
            loss = next(losses)()
            return StepOut(loss, {})

    cfg = tiny_cfg("m", "d", "o")
    results = []
    for step in range(4):
        before, scale = p.detach().clone(), scaler.get_scale()
        _, _, applied = train_step(cfg, acc, Backend(), Method(), iter([None]), opt, step, torch.Generator())
        results.append((applied, torch.equal(before, p.detach()), scaler.get_scale() / scale))
    assert results == [(True, False, 1.0), (False, True, 0.5), (False, True, 0.5), (True, False, 1.0)]


def test_run_with_too_many_nonfinite_steps_fails_and_names_the_last_finite_lora(sd15_dir, tmp_path, capsys):
    """`train --lr 1e6 --steps 12`: 11 of 12 steps were skipped and the run said "finished", exit 0
    (the consecutive guard, 20, never fired). More than MAX_NONFINITE_SHARE of the steps -> exit 1,
    the LoRA is kept under a name that says what it is, and the message says what to change."""
    from npo_suite import cli
    from npo_suite.trainer.loop import MAX_NONFINITE_SHARE

    out = tmp_path / "out"
    argv = ["train", "--model", str(sd15_dir), "--data-path", str(make_pairs(tmp_path / "pairs")), "--output-dir",
            str(out), "--resolution", "16", "--steps", "12", "--batch-size", "2", "--lr", "1e6", "--lora-rank", "2",
            "--checkpoint-every", "0", "--log-every", "1", "--cpu"]
    assert cli.main(argv) == 1
    captured = capsys.readouterr()
    assert "finished" not in captured.out
    skipped = int(metrics_rows(out)[-1]["train/skipped_nonfinite"])
    assert skipped > MAX_NONFINITE_SHARE * 12
    assert re.search(rf"{skipped} of 12 optimizer steps .*non-finite", captured.err)
    for advice in ("lower lr", "mixed_precision", "max_grad_norm"):
        assert advice in captured.err
    assert not (out / "dpo_lora.safetensors").exists()
    kept = out / "dpo_lora.last_finite.safetensors"
    assert str(kept) in captured.err and all_finite(load_file(str(kept)))


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_atomic_writes_follow_the_umask(tmp_path, mask):
    """Files came out 0600 (mkstemp), folders 0700 (mkdtemp): a ComfyUI/A1111 service running as
    another user could not read the LoRAs, images, metrics.csv and manifests. They follow the umask."""
    import stat

    from npo_suite.trainer.validation import MetricsLog

    old = os.umask(mask)
    try:
        files = [atomic.write_bytes(tmp_path / "a.bin", b"x"), atomic.write_text(tmp_path / "m.json", "{}"),
                 atomic.save_safetensors(tmp_path / "l.safetensors", {"w": torch.zeros(2)}),
                 atomic.copy_file(tmp_path / "a.bin", tmp_path / "b.bin")]
        log = MetricsLog(tmp_path / "run")
        log.write(1, {"loss": 0.5})
        log.close()
        files.append(tmp_path / "run" / "metrics.csv")
        with atomic.atomic_dir(tmp_path / "d") as d:
            (d / "f").write_bytes(b"")
    finally:
        os.umask(old)
    for f in files:
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~mask, f
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o777 & ~mask


def test_health_saturation_fires_when_every_logit_is_saturated():
    """DDSPO at 100% saturated logits (loss 1.4e-6 at step 120) got no warning: the 50-step means
    still held the unsaturated steps before. The last 20 steps with every logit past |10| and a
    vanishing loss are enough; the message names the β the method reads."""
    cfg = tiny_cfg("m", "d", "o", method="ddspo", lr=1e-3)
    rows = [{"loss": 0.5, "implicit_acc": 0.6, "logit/saturated_frac": 0.0}] * 100
    rows += [{"loss": 1.4e-6, "implicit_acc": 1.0, "logit/saturated_frac": 1.0}] * 20
    warnings = _feed(RunHealth(), rows, cfg)
    assert len(warnings) == 1 and 100 < int(re.match(r"step (\d+):", warnings[0])[1]) <= 120, warnings
    assert "saturated" in warnings[0] and "ddspo_beta 16000, lr 0.001" in warnings[0]
    calm = [{"loss": 0.5, "implicit_acc": 0.6, "logit/saturated_frac": 0.1}] * 200
    assert _feed(RunHealth(), calm, cfg) == []
