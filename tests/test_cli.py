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
