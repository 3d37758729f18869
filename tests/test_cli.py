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


def _subcommands(parser) -> list[str]:
    import argparse

    return [name for a in parser._actions if isinstance(a, argparse._SubParsersAction) for name in a.choices]


def _help(capsys, argv) -> str:
    import pytest

    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    out = capsys.readouterr().out
    assert e.value.code == 0, argv
    return out


def test_commands_live_in_cli_only():
    """Every command is a module of cli/ (argparse appears nowhere else but the import-free scripts/)."""
    assert all(module.startswith(".") and not module.startswith("..") for module, _ in cli.COMMANDS.values())
    offenders = []
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT)
        if len(rel.parts) == 1 or rel.parts[0] in ("cli", "scripts", "tests") or any(p.startswith(".") for p in rel.parts):
            continue  # the root's entry points (install.py runs as a script), the command line, the tests
        text = path.read_text(encoding="utf-8")
        if "import argparse" in text or "def add_arguments(" in text or 'if __name__ == "__main__"' in text:
            offenders.append(str(rel))
    assert offenders == []


def test_every_help_renders(capsys):
    """`--help` of every command and every subcommand prints its usage; before, `train --help` printed an
    argparse dict at --gradient-checkpointing (an unescaped % in a help string)."""
    seen = 0
    for name in cli.COMMANDS:
        _, parser = cli.command_parser(name)
        for argv in [[name], *([name, sub] for sub in _subcommands(parser))]:
            out = _help(capsys, [*argv, "--help"])
            assert out.startswith(f"usage: python -m npo_suite {' '.join(argv)}"), argv
            assert "option_strings" not in out and "%(" not in out, argv
            seen += 1
    assert seen >= len(cli.COMMANDS) + 4  # world build/info/results/probe, bench guidance/train, ...
    train = _help(capsys, ["train", "--help"])
    assert "~30% slower" in train


def test_generate_help_shows_the_defaults(capsys):
    import re

    out = " ".join(_help(capsys, ["generate", "--help"]).split("options:")[1].split())
    for flag, value in (("--alpha", "1.0"), ("--beta", "1.0"), ("--cfg", "7.5"), ("--steps", "20"),
                        ("--scheduler", "ddim"), ("--batch-size", "4")):
        help_ = re.search(rf"{flag} \S+ (.*?)(?= --[a-z]|$)", out).group(1)
        assert f"default {value}" in help_, (flag, help_)


def test_user_errors_are_one_line_and_exit_2(tmp_path, capsys, monkeypatch):
    """A missing file or a bad value ends in one `error: ...` line on stderr, not a traceback."""
    import pytest

    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)
    cases = [
        ["generate", str(tmp_path / "no_model"), "--prompt", "x", "--out", str(tmp_path / "o")],  # bad path
        ["generate", str(tmp_path), "--out", str(tmp_path / "o")],  # no prompts
        ["generate", str(tmp_path), "--prompt", "x", "--batch-size", "0", "--out", str(tmp_path / "o")],  # bad value
        ["ddspo-prepare", "--model", str(tmp_path), "--prompts", str(tmp_path / "p.txt"), "--out", str(tmp_path / "d")],
        ["bench", "train", "--methods", "no_such_method"],
        ["bench", "guidance", "--rank", "0"],
    ]
    for argv in cases:
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, (argv, err)
    monkeypatch.setenv(cli.DEBUG_ENV, "1")  # a developer gets the traceback
    with pytest.raises(FileNotFoundError):
        cli.main(cases[0])


def test_a_bug_keeps_its_traceback(monkeypatch):
    import pytest

    def boom(*a, **k):
        raise RuntimeError("a bug")

    monkeypatch.setattr("npo_suite.world.demo.run_demo", boom)
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main(["demo", "--quick"])


def test_old_module_entry_points_are_gone():
    """`python -m npo_suite world results|probe` replace running the modules world/results.py and world/probe.py."""
    for rel in ("world/results.py", "world/probe.py"):
        assert "__main__" not in (ROOT / rel).read_text(encoding="utf-8")
    pattern = "python -m npo_suite" + ".world."  # (split: this file does not name it)
    hits = [str(p.relative_to(ROOT)) for p in ROOT.rglob("*")
            if p.suffix in (".md", ".py", ".toml", ".txt") and ".git" not in p.parts
            and pattern in p.read_text(encoding="utf-8", errors="ignore")]
    assert hits == []


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
