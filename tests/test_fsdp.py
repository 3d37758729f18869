"""`fsdp: true` (trainer/fsdp.py): a flow transformer sharded over two CPU processes (gloo, FSDP2 `fully_shard`).

- the run completes; each process holds half of the transformer's frozen values (what it prints, from the
  local shards of its DTensor parameters), the two halves summing to the whole, the LoRA whole on both;
- the LoRA it writes equals one process's with the same global batch (1 process x batch 1 x accumulation 2),
  as the DDP invariant (tests/test_train_invariants.py): sharding changes where the frozen weights live, not
  what is computed — each block's forward runs on the all-gathered weights, bit for bit the unsharded ones.
  Tolerance atol 1e-6, the DDP test's: the all-reduce averages (g0 + g1) / 2 where one process accumulates
  g0/2 + g1/2, equal in exact arithmetic, not always in float32 (measured here: bit-equal, with and without
  gradient checkpointing; the test runs with it, as a 12B run would: each block recomputed in the backward on
  weights gathered again);
- what fsdp refuses, each with its reason (validation grids, a UNet, a prebuilt backend), and one process
  runs unsharded (said).
"""
from __future__ import annotations

import re
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_train_invariants import _assert_same_lora, _env, one_thread  # noqa: E402
from train_fixtures import make_pairs, tiny_cfg, torchrun_train  # noqa: E402


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory):
    from npo_suite.testing.tiny_models import build_sd3

    d = tmp_path_factory.mktemp("tiny_sd3_fsdp")
    build_sd3(d, seed=0)
    return d


@pytest.mark.slow
def test_fsdp_two_processes_shard_the_transformer_and_equal_one(sd3_dir, tmp_path):
    from npo_suite.trainer.loop import train

    data = make_pairs(tmp_path / "data", n=4)
    cfg = tiny_cfg(sd3_dir, data, tmp_path / "fsdp", batch_size=1, grad_accum=1, steps=2, fsdp=True,
                   cache_dir=str(tmp_path / "cache_fsdp"), lr=1e-2, gradient_checkpointing=True)
    proc = torchrun_train(cfg, tmp_path, _env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = re.findall(r"fsdp: process (\d)/2 holds ([\d,]+) of the transformer's ([\d,]+) frozen values .*?"
                       r"the LoRA adapters' ([\d,]+) values whole", proc.stderr)
    assert sorted(int(r) for r, *_ in lines) == [0, 1], proc.stderr[-3000:]
    num = [tuple(int(x.replace(",", "")) for x in row[1:]) for row in lines]
    total = num[0][1]
    assert num[0][1] == num[1][1] and num[0][2] == num[1][2] > 0
    assert num[0][0] + num[1][0] == total  # the two shards are the whole, nothing held twice
    for local, _, _ in num:  # dim-0 chunks: halves up to one row of each odd-sized parameter
        assert 0.45 * total <= local <= 0.55 * total
    from npo_suite.testing.tiny_models import sd3_transformer_config
    from diffusers import SD3Transformer2DModel

    assert total == sum(p.numel() for p in SD3Transformer2DModel(**sd3_transformer_config()).parameters())

    one = tiny_cfg(sd3_dir, data, tmp_path / "one", batch_size=1, grad_accum=2, steps=2,
                   cache_dir=str(tmp_path / "cache_one"), lr=1e-2, gradient_checkpointing=True)
    with one_thread():
        res = train(one)
    _assert_same_lora(tmp_path / "fsdp" / "dpo_lora.safetensors", res.lora_path, rtol=0, atol=1e-6)


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


def test_dry_run_refuses_fsdp(sd3_dir):
    from npo_suite.trainer.memory_estimate import trace_run

    cfg = tiny_cfg(sd3_dir, "unused", "unused", fsdp=True)
    with pytest.raises(ValueError, match="fsdp"):
        trace_run(cfg, str(sd3_dir), device="cpu")
