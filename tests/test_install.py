"""install.py (Forge/A1111): installs only absent requirements of requirements-webui.txt, through
the WebUI's pip helper, with every installed distribution pinned; never torch, never an upgrade."""
import importlib.util
import os
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _load_install():
    spec = importlib.util.spec_from_file_location("npo_install", ROOT / "install.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # not __main__: installs nothing
    return mod


def test_installs_only_absent_pinned_to_installed_versions(tmp_path, capsys):
    mod = _load_install()
    req = tmp_path / "requirements.txt"
    req.write_text("torch>=2.0\ntorchvision\nsafetensors>=0.1\nnumpy>=999.0\nnpo-suite-surely-absent-pkg>=1.0\n"
                   "# comment\n\n")
    calls = []

    def run_pip(args, desc):
        m = re.fullmatch(r'install "([^"]+)" -c "([^"]+)"', args)
        assert m, args
        calls.append((m.group(1), Path(m.group(2)).read_text().splitlines(), Path(m.group(2))))

    asked = mod.install(str(req), run_pip)
    assert asked == ["npo-suite-surely-absent-pkg>=1.0"]  # numpy is installed: older than asked, NOT upgraded
    assert [c[0] for c in calls] == asked
    pins = calls[0][1]
    assert f"numpy=={metadata.version('numpy')}" in pins and f"torch=={metadata.version('torch')}" in pins
    assert "numpy" in capsys.readouterr().out  # the too-old one is reported
    assert not calls[0][2].exists()  # the constraints file is removed


def test_nothing_to_do_calls_no_pip(tmp_path):
    mod = _load_install()
    req = tmp_path / "r.txt"
    req.write_text("safetensors\ntorch\n")
    assert mod.install(str(req), lambda *a: (_ for _ in ()).throw(AssertionError("pip called"))) == []


def test_webui_requirements_are_few_and_have_no_torch():
    mod = _load_install()
    names = {mod._norm(n) for _, n, _ in mod.read_requirements(str(ROOT / mod.REQUIREMENTS))}
    assert names == {"safetensors", "diffusers", "transformers"}
    names = [l.split(">=")[0].strip().lower() for l in (ROOT / "requirements.txt").read_text().splitlines()
             if l.strip() and not l.startswith("#")]
    assert "torch" not in names and "torchvision" not in names


def test_run_outside_a_webui_does_nothing(tmp_path):
    """ComfyUI-Manager runs install.py too: without the WebUI's `launch` module it is a no-op."""
    r = subprocess.run([sys.executable, str(ROOT / "install.py")], cwd=tmp_path, capture_output=True, text=True,
                       env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, timeout=60)
    assert r.returncode == 0 and r.stdout == "" and r.stderr == ""


def test_comfyui_serves_the_widget_folder_once():
    """ComfyUI registers a web folder from WEB_DIRECTORY (key: the folder name) and, separately, from
    pyproject's [tool.comfy] web (key: the project name): both would load npo_pairs.js twice."""
    import tomllib

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("npo_root_init", root / "__init__.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    web = (root / mod.WEB_DIRECTORY).resolve()
    assert (web / "npo_pairs.js").is_file()
    comfy = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["comfy"]
    assert "web" not in comfy, "declare the web folder once (WEB_DIRECTORY), not also in [tool.comfy]"


def test_pyproject_ships_every_package_and_the_installer_requirements():
    """`pip install .` ships what the hosts import: every folder with an `__init__.py` (the WebUI
    modules included) is a listed package, and install.py's requirements file is package data."""
    import tomllib

    def packages(folder: Path, name: str) -> list[str]:  # folders reached through __init__.py files only
        return [name] + [p for d in sorted(folder.iterdir()) if (d / "__init__.py").is_file() and d.name != "tests"
                         for p in packages(d, f"{name}.{d.name}")]

    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert sorted(packages(ROOT, "npo_suite")) == sorted(setuptools["packages"])
    assert _load_install().REQUIREMENTS in setuptools["package-data"]["npo_suite"]


def test_real_host_test_extras_install_with_one_documented_command():
    """#24: the browser test of the pair picker needs playwright (the `browser` extra) and a system chromium;
    docs/comfyui.md gives ONE command for everything the real-ComfyUI tests need, and the test's skip
    message quotes that same command."""
    import tomllib

    from host_setup import COMFYUI_TESTS_INSTALL

    root = Path(__file__).resolve().parents[1]
    extras = tomllib.loads((root / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert extras["browser"] == ["playwright"] and any(r.startswith("pytest") for r in extras["dev"])
    assert '".[dev,browser]"' in COMFYUI_TESTS_INSTALL and "apt-get install -y chromium" in COMFYUI_TESTS_INSTALL
    assert "playwright install" not in COMFYUI_TESTS_INSTALL  # no browser download
    assert COMFYUI_TESTS_INSTALL in (root / "docs" / "comfyui.md").read_text()
    src = (root / "tests" / "comfyui" / "test_pair_picker_browser.py").read_text()
    assert src.count("{COMFYUI_TESTS_INSTALL}") == 2  # both skips (no chromium, no playwright) say the command
