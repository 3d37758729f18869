"""install.py (Forge/A1111): installs only what is missing, through the WebUI's pip helper, never torch."""
import importlib.util
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _load_install():
    os.environ["NPO_SUITE_SKIP_INSTALL"] = "1"
    try:
        spec = importlib.util.spec_from_file_location("npo_install", ROOT / "install.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    finally:
        del os.environ["NPO_SUITE_SKIP_INSTALL"]


def test_installs_only_missing_and_never_torch(tmp_path):
    mod = _load_install()
    req = tmp_path / "requirements.txt"
    req.write_text("torch>=2.0\ntorchvision\nsafetensors>=0.1\nnumpy>=999.0\nnpo-suite-surely-absent-pkg>=1.0\n# comment\n\n")
    calls = []
    asked = mod.install(str(req), lambda args, desc: calls.append(args))
    assert asked == ["numpy>=999.0", "npo-suite-surely-absent-pkg>=1.0"]
    assert calls == ['install "numpy>=999.0"', 'install "npo-suite-surely-absent-pkg>=1.0"']
    assert not any("torch" in c for c in calls)


def test_project_requirements_have_no_torch():
    names = [l.split(">=")[0].strip().lower() for l in (ROOT / "requirements.txt").read_text().splitlines()
             if l.strip() and not l.startswith("#")]
    assert "torch" not in names and "torchvision" not in names
