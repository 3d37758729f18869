"""Plug-ins: code that adds names to the product's registries (`evaluation.scorers.SCORERS`,
`trainer.ddspo.REWRITERS`, ...) through their `register_*` functions, as the embedded digits world
does (`world/plugin.py`). A plug-in is a function of no arguments declared in the entry-point group
`npo_suite.plugins` (pyproject):

    [project.entry-points."npo_suite.plugins"]
    digits_world = "npo_suite.world.plugin:register"

`load_plugins()` runs every declared plug-in once per process; a registry calls it before it lists
its names or reports an unknown one. A plug-in that fails is reported as a warning naming it (the
others still load). Declarations come from the installed distributions' metadata and, for a source
folder that pip did not install (ComfyUI `custom_nodes/`, a Forge extension) or installed from an
older pyproject, from the pyproject.toml at this package's root.
"""
from __future__ import annotations

import warnings
from importlib import import_module, metadata
from pathlib import Path

GROUP = "npo_suite.plugins"
_ROOT = __package__.rsplit(".", 1)[0]  # this package's import name: "npo_suite", or ComfyUI's folder name
_loaded: list[str] | None = None


def declared_plugins() -> dict[str, str]:
    """name -> "module:function" of every declared plug-in (installed metadata first, then this folder's pyproject)."""
    found = {ep.name: ep.value for ep in metadata.entry_points(group=GROUP)}
    for name, value in _pyproject_plugins().items():
        found.setdefault(name, value)
    return found


def _pyproject_plugins() -> dict[str, str]:
    try:
        import tomllib
    except ImportError:  # Python 3.10: installed metadata only
        return {}
    try:
        project = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text("utf-8"))["project"]
    except (OSError, ValueError, KeyError):
        return {}
    return dict(project.get("entry-points", {}).get(GROUP, {})) if project.get("name") == "npo-suite" else {}


def _resolve(value: str):
    """The object named by "module:attr"; `npo_suite.` is this package, whatever its import name."""
    module, _, attr = value.partition(":")
    if module == "npo_suite" or module.startswith("npo_suite."):
        module = _ROOT + module[len("npo_suite"):]
    obj = import_module(module)
    for part in filter(None, attr.split(".")):
        obj = getattr(obj, part)
    return obj


def load_plugins() -> tuple[str, ...]:
    """Run every declared plug-in once per process (later calls do nothing); the names that loaded."""
    global _loaded
    if _loaded is None:
        _loaded = []  # before running any: a registry a plug-in calls does not start the loading again
        for name, value in declared_plugins().items():
            try:
                _resolve(value)()
            except Exception as e:  # a broken plug-in must not take the product down, nor vanish silently
                warnings.warn(f"npo_suite plug-in {name!r} ({value}) failed to load and was skipped: "
                              f"{type(e).__name__}: {e}", RuntimeWarning, stacklevel=2)
            else:
                _loaded.append(name)
    return tuple(_loaded)
