"""`fsdp: true` (trainer/fsdp.py): a flow transformer sharded over two CPU processes (gloo, FSDP2 `fully_shard`).

- the run completes; each process holds half of the transformer's frozen values (what it prints, from the
  local shards of its DTensor parameters), the two halves summing to the whole, the LoRA whole on both;
- the LoRA it writes equals one process's with the same global batch (1 process x batch 1 x accumulation 2),
  as the DDP invariant (tests/test_train_invariants.py): sharding changes where the frozen weights live, not
  what is computed — each block's forward runs on the all-gathered weights, bit for bit the unsharded ones.
  Tolerance atol 1e-6, the DDP test's: the all-reduce averages (g0 + g1) / 2 where one process accumulates
  g0/2 + g1/2, equal in exact arithmetic, not always in float32 (measured here: bit-equal, with and without
  gradient checkpointing; the test runs with it, as a 12B run would: each block recomputed in the backward on
  weights gathered again); Flux and SANA, whose shard units return views (torch's warning), bit for bit, with
  and without checkpointing;
- what fsdp refuses, each with its reason (validation grids, a UNet, a prebuilt backend), and one process
  runs unsharded (said);
- `train --dry-run --processes N`: one process's memory estimate, against what each of two real processes'
  CPU allocator measures in the training steps.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_train_invariants import _assert_same_lora, _env, _lora_tensors, one_thread  # noqa: E402
from flow_fixtures import build_flow_dirs  # noqa: E402
from train_fixtures import make_pairs, tiny_cfg, torchrun_train  # noqa: E402


@pytest.fixture(scope="module")
def flow_dirs(tmp_path_factory):
    """Tiny SD3, Flux and SANA folders (seed 0)."""
    from npo_suite.testing.tiny_models import build_sana

    dirs = build_flow_dirs(tmp_path_factory.mktemp("tiny_flow_fsdp"))
    build_sana(dirs["sd3"].parent / "sana", seed=0)
    return {**dirs, "sana": dirs["sd3"].parent / "sana"}


@pytest.fixture(scope="module")
def sd3_dir(flow_dirs):
    return flow_dirs["sd3"]


def _shards(stderr: str) -> tuple[int, int]:
    """(frozen total, shard units) from the lines `shard_backend` prints, checked: one line per process, the two
    shards the whole transformer (nothing held twice), about half each (dim-0 chunks: halves up to one row of
    each odd-sized parameter), the LoRA whole on both, the same units."""
    lines = re.findall(r"fsdp: process (\d)/2 holds ([\d,]+) of the transformer's ([\d,]+) frozen values .*?"
                       r"(\d+) shard units\); the LoRA adapters' ([\d,]+) values whole", stderr)
    assert sorted(int(r) for r, *_ in lines) == [0, 1], stderr[-3000:]
    num = [tuple(int(x.replace(",", "")) for x in row[1:]) for row in lines]
    total = num[0][1]
    assert num[0][1:] == num[1][1:] and num[0][3] > 0
    assert num[0][0] + num[1][0] == total
    for local, *_ in num:
        assert 0.45 * total <= local <= 0.55 * total
    return total, num[0][2]


@pytest.mark.slow
def test_fsdp_two_processes_shard_the_transformer_and_equal_one(sd3_dir, tmp_path):
    from npo_suite.trainer.loop import train

    data = make_pairs(tmp_path / "data", n=4)
    cfg = tiny_cfg(sd3_dir, data, tmp_path / "fsdp", batch_size=1, grad_accum=1, steps=2, fsdp=True,
                   cache_dir=str(tmp_path / "cache_fsdp"), lr=1e-2, gradient_checkpointing=True)
    proc = torchrun_train(cfg, tmp_path, _env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    total, units = _shards(proc.stderr)
    assert units == 3  # the two joint blocks, the root
    from npo_suite.testing.tiny_models import sd3_transformer_config
    from diffusers import SD3Transformer2DModel

    assert total == sum(p.numel() for p in SD3Transformer2DModel(**sd3_transformer_config()).parameters())

    one = tiny_cfg(sd3_dir, data, tmp_path / "one", batch_size=1, grad_accum=2, steps=2,
                   cache_dir=str(tmp_path / "cache_one"), lr=1e-2, gradient_checkpointing=True)
    with one_thread():
        res = train(one)
    _assert_same_lora(tmp_path / "fsdp" / "dpo_lora.safetensors", res.lora_path, rtol=0, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("family,checkpointing", [("flux", False), ("flux", True), ("sana", False), ("sana", True)])
def test_fsdp_flux_and_sana_equal_one_process(flow_dirs, tmp_path, family, checkpointing):
    """Flux and SANA sharded over two processes write, bit for bit, one process's LoRA (same global batch).

    Why these two: their FSDP2 units return view tensors — Flux's single-stream blocks return two slices of
    one tensor (text, image), the Flux and SANA roots the output of a Linear on [B, L, D] (addmm, then
    `.view`) — and torch warns that an in-place op on such a view drops the pre-backward hook that
    all-gathers the unit's weights again for its backward (they were freed after its forward). Nothing in
    diffusers' forwards or in ours writes in place on them (out-of-place `torch.cat`, norms, `spec.unpack`,
    `.float()`), so the hook fires. Measured 2026-12-05 (torch 2.13, diffusers 0.42): injecting `out.mul_(1)` on
    the single blocks' outputs (a forward hook after sharding) fails the backward without checkpointing
    (`setStorage: ... storage of size 0`: the weights not gathered again) and changes nothing with it
    (each block's recompute gathers them in its forward) — so both settings run here, the first being the
    one such a change upstream would break.

    Exact equality, not a tolerance: the two runs compute the same float ops on the same shapes in one
    thread each (batch 1 per micro-batch both ways); the gathered weights are the loaded ones bit for bit;
    the loss scaled by 1/2 per micro-batch and gloo's (g0 + g1) / 2 differ from g0/2 + g1/2 only by exact
    halvings. Measured bit-equal, all four cases."""
    from npo_suite.trainer.loop import train

    model = flow_dirs[family]
    data = make_pairs(tmp_path / "data", n=4)
    common = dict(batch_size=1, steps=2, lr=1e-2, gradient_checkpointing=checkpointing)
    cfg = tiny_cfg(model, data, tmp_path / "fsdp", grad_accum=1, fsdp=True, cache_dir=str(tmp_path / "c_fsdp"),
                   **common)
    proc = torchrun_train(cfg, tmp_path, _env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Flux: 1 double + 2 single blocks, the root; SANA: 2 blocks, the patch embedding, the root (its norm_out,
    # named in _no_split_modules, has no weights: no unit)
    assert _shards(proc.stderr)[1] == 4
    one = tiny_cfg(model, data, tmp_path / "one", grad_accum=2, cache_dir=str(tmp_path / "c_one"), **common)
    with one_thread():
        res = train(one)
    _assert_same_lora(tmp_path / "fsdp" / "dpo_lora.safetensors", res.lora_path)
    trained = _lora_tensors(res.lora_path)  # the LoRA moved (B starts at zero): equal, not trivially so
    assert any(k.endswith("lora_B.weight") and t.abs().max() > 1e-3 for k, t in trained.items())


def test_fsdp_refusals_and_one_process(sd3_dir, sd15_dir, capsys):
    from npo_suite.trainer import fsdp
    from npo_suite.trainer.backends.diffusers import DiffusersBackend
    from npo_suite.trainer.config import TrainConfig

    two = SimpleNamespace(num_processes=2, is_main_process=True, process_index=0)
    sd3 = DiffusersBackend.from_pretrained(str(sd3_dir))
    with pytest.raises(ValueError, match="set validate_every 0"):  # refused by the config, before any model loads
        TrainConfig(fsdp=True, validate_every=5, validation_prompts=["a"], validation_seeds=[0])
    with pytest.raises(ValueError, match="built by the host"):
        fsdp.prepare(TrainConfig(fsdp=True), two, sd3, prebuilt=True)
    sd15 = DiffusersBackend.from_pretrained(str(sd15_dir))
    with pytest.raises(ValueError, match="not a flow transformer"):
        fsdp.prepare(TrainConfig(fsdp=True), two, sd15)
    one = SimpleNamespace(num_processes=1, is_main_process=True, process_index=0)
    assert fsdp.prepare(TrainConfig(fsdp=True), one, sd3) is False
    assert fsdp.shard_backend(TrainConfig(fsdp=True), one, sd3) is None
    assert "one process, nothing to shard" in capsys.readouterr().err
    assert fsdp.prepare(TrainConfig(), two, sd3) is False and fsdp.shard_backend(TrainConfig(), two, sd3) is None


def test_dry_run_fsdp_is_per_process(sd3_dir, sd15_dir, capsys):
    """`train --dry-run` on an fsdp config: refused without the number of processes (the estimate is one
    process's), refused for a UNet (as the run), `--processes` refused outside --dry-run; with it, the JSON
    carries the shard (half the frozen values on two processes) and a `shard` phase."""
    import json

    from npo_suite.cli import main

    args = ["train", "--model", str(sd3_dir), "--fsdp", "--resolution", "16", "--lora-rank", "2",
            "--cache-dir", "unused", "--dry-run", "--json"]
    assert main(args) == 2
    assert "give their number (`train --dry-run --processes N`" in capsys.readouterr().err
    assert main(["train", "--model", str(sd15_dir), "--fsdp", "--dry-run", "--processes", "2"]) == 2
    assert "not a flow transformer" in capsys.readouterr().err
    assert main(["train", "--model", str(sd3_dir), "--processes", "2"]) == 2
    assert "--processes is for --dry-run" in capsys.readouterr().err
    assert main(args + ["--processes", "2"]) == 0
    d = json.loads(capsys.readouterr().out)
    f = d["settings"]["fsdp"]
    assert d["settings"]["processes"] == 2 and f["units"] == 3 and 2 * f["frozen_local"] == f["frozen_total"]
    assert set(d["phases"]) == {"weights", "cache_fill", "shard", "train_step"}
    assert any(n.startswith("fsdp: one of 2 processes traced") for n in d["notes"])
    assert main(args[:-1] + ["--processes", "2"]) == 0  # the text form names the shard
    assert "fsdp shard: 43,584 of 87,168 frozen values, 3 units" in capsys.readouterr().out
    ddp = [a for a in args if a != "--fsdp"] + ["--lora-rank", "64"]  # without fsdp (DDP): one process's, plus
    # the gradients' all-reduce (its flat copy: rank 64, so that it shows in the JSON's 1e-4 GiB)
    assert main(ddp) == 0
    one = json.loads(capsys.readouterr().out)
    assert main(ddp + ["--processes", "2"]) == 0
    two = json.loads(capsys.readouterr().out)
    assert two["settings"]["processes"] == 2 and "shard" not in two["phases"] and any("DDP" in n for n in two["notes"])
    assert two["phases"]["train_step"]["optimizer"]["peak"] > one["phases"]["train_step"]["optimizer"]["peak"]
    assert two["phases"]["train_step"]["forward"] == one["phases"]["train_step"]["forward"]


# wider and deeper than the test model, so the frozen weights outweigh the activations and the units FSDP2
# gathers are a small part of them: there the sharded and the unsharded estimates are 20% apart
WIDE = {"num_layers": 12, "attention_head_dim": 16, "num_attention_heads": 8, "caption_projection_dim": 128}


@pytest.mark.slow
def test_fsdp_estimate_against_two_processes(tmp_path):
    """The per-process estimate (`trace_run(..., processes=2)`: the run's own `fsdp.shard_transformer` on a
    fake process group, FSDP2's gathers counted as they allocate and free) against a real two-process gloo run,
    each process measured by PyTorch's CPU allocator (`memory_estimate.measure_train`, as the unsharded check in
    tests/test_memory_estimate.py) from the end of the sharding on: the training steps, what fsdp changes.

    Measured 2026-12 (12 blocks, 7.1 M frozen values, batch 1, checkpointing): estimate 0.0307 GiB; rank 0
    0.0317, rank 1 0.0303; the unsharded estimate 0.0388. Tolerance 8%: the real run also holds what the trace
    does not (the batch stream's cached latents and collate, the metric reductions; rank 0 logs and writes the
    LoRA: its peak is 4.5% above rank 1's), and gloo's own buffers are not the allocator's. The
    whole-run peak is not compared: on the CPU it is the loading (diffusers reads the transformer's file
    whole), which the estimate does not trace."""
    import json

    from npo_suite.testing.tiny_models import build_sd3, sd3_transformer_config
    from npo_suite.trainer.memory_estimate import trace_run

    model = tmp_path / "sd3_wide"
    build_sd3(model, seed=0, transformer_config={**sd3_transformer_config(), **WIDE})
    data = make_pairs(tmp_path / "data", n=4)
    cfg = tiny_cfg(model, data, tmp_path / "out", batch_size=1, grad_accum=1, steps=2, fsdp=True,
                   cache_dir=str(tmp_path / "cache"), gradient_checkpointing=True)
    (tmp_path / "measured").mkdir()
    proc = torchrun_train(cfg, tmp_path, _env(), script=Path(__file__).parent / "fsdp_memory_worker.py",
                          args=[tmp_path / "measured"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    measured = [json.loads((tmp_path / "measured" / f"rank{r}.json").read_text()) for r in (0, 1)]

    est = trace_run(cfg, str(model), device="cpu", processes=2, n_records=4)
    step = max(ph["peak"] for ph in est.phases["train_step"].values())
    for m in measured:
        assert m["after_shard_peak_gib"] == pytest.approx(step, rel=0.08), (measured, est.phases)
    unsharded = trace_run(tiny_cfg(model, data, "unused", batch_size=1, cache_dir="unused",
                                   gradient_checkpointing=True), str(model), device="cpu", n_records=4)
    whole = max(ph["peak"] for ph in unsharded.phases["train_step"].values())
    assert all(m["after_shard_peak_gib"] < 0.9 * whole for m in measured)  # the sharding is what was measured
