import subprocess
import sys
from pathlib import Path

from npo_suite import cli

ROOT = Path(__file__).resolve().parents[1]


def test_every_registered_command_has_a_module_with_the_protocol():
    import importlib

    for name, (module, _) in cli.COMMANDS.items():
        mod = importlib.import_module(module, "npo_suite.cli")
        assert callable(getattr(mod, "add_arguments", None)), name
        assert callable(getattr(mod, "main", None)), name


def test_help_lists_commands_and_unknown_command_fails(capsys):
    assert cli.main([]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in cli.COMMANDS)
    assert cli.main(["no-such-command"]) == 2


def test_script_wrappers_cover_commands_and_import_cleanly():
    """Each scripts/npo_<cmd>.py wraps a registered command; every file in scripts/ (the WebUI loads
    them all, `npo_webui.py` is the WebUI script itself) imports cleanly outside the WebUI."""
    for path in sorted((ROOT / "scripts").glob("*.py")):
        cmd = path.stem[len("npo_"):]
        assert path.name == "npo_webui.py" or cmd in cli.COMMANDS, path
        ns = {"__name__": "not_main", "__file__": str(path)}
        exec(compile(path.read_text(), str(path), "exec"), ns)
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "npo_bench.py"), "--help"], capture_output=True, text=True)
    assert res.returncode == 0 and "bench" in res.stdout


def test_train_never_overwrites_a_finished_run_unless_asked(sd15_dir, tmp_path, capsys):
    """A second `train` into a finished run's folder silently rewrote its metrics.csv. It is refused
    (naming --overwrite and --resume); --overwrite starts over; an unfinished run still restarts as today."""
    from train_fixtures import make_pairs

    out = tmp_path / "out"
    argv = ["train", "--model", str(sd15_dir), "--data-path", str(make_pairs(tmp_path / "pairs")), "--output-dir",
            str(out), "--resolution", "16", "--steps", "2", "--batch-size", "2", "--lora-rank", "2", "--checkpoint-every", "1", "--cpu"]
    assert cli.main(argv) == 0
    metrics = (out / "metrics.csv").read_bytes()
    capsys.readouterr()
    assert cli.main(argv + ["--method", "dpo", "--lr", "1e-3"]) == 2
    err = capsys.readouterr().err
    assert "finished run" in err and "--overwrite" in err and "--resume" in err and str(out) in err
    assert (out / "metrics.csv").read_bytes() == metrics
    assert cli.main(argv[:-1] + ["--resume", "latest", "--steps", "3", "--cpu"]) == 0  # asked: continue it
    assert cli.main(argv + ["--overwrite", "--lr", "1e-3"]) == 0
    assert (out / "metrics.csv").read_bytes() != metrics
