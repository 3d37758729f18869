"""The run's first lines say what is actually used: device, the weight dtype and autocast in effect
(the fp16 preset on a CPU runs float32 without autocast, and says so), the optimizer built (adamw8bit
without bitsandbytes is torch's AdamW, said), the attention kernel."""
from __future__ import annotations

import sys

from npo_suite import cli


def _first_lines(capsys, argv):
    assert cli.main(argv) == 0
    err = capsys.readouterr().err
    return [line for line in err.splitlines() if line.split(":")[0] in ("device", "precision", "optimizer", "attention")]


def test_first_lines_of_a_preset_run_on_cpu(sd15_dir, tmp_path, capsys, monkeypatch):
    from train_fixtures import make_pairs

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # absent, whatever this machine has: import fails
    base = ["train", "--model", str(sd15_dir), "--data-path", str(make_pairs(tmp_path / "pairs")),
            "--resolution", "16", "--steps", "1", "--grad-accum", "1", "--batch-size", "1", "--lora-rank", "2",
            "--cache-dir", str(tmp_path / "cache"), "--cpu", "--validate-every", "0"]
    lines = _first_lines(capsys, base + ["--preset", "sd15_8gb", "--output-dir", str(tmp_path / "a")])
    assert [line.split(":")[0] for line in lines] == ["device", "precision", "optimizer", "attention"]
    assert lines[0] == "device: cpu"
    assert lines[1] == ("precision: mixed_precision fp16 requested; running float32 weights without autocast on cpu "
                        "(fp16 autocast is not available there)")
    assert lines[2].startswith("optimizer: torch AdamW (adamw8bit requested: bitsandbytes is not installed")
    assert lines[3] == "attention: SDPA (torch scaled_dot_product_attention)"
    plain = _first_lines(capsys, base + ["--optimizer", "adamw", "--mixed-precision", "no",
                                         "--output-dir", str(tmp_path / "b")])
    assert plain[1] == "precision: float32 weights, no autocast (mixed_precision no)"
    assert plain[2] == "optimizer: torch AdamW (optimizer adamw)"
