"""Plug-in discovery: `load_plugins()` calls every entry point of the group `npo_suite.plugins`
(pyproject `[project.entry-points."npo_suite.plugins"]`), once per process. A plug-in's entry
point is a function that registers what it brings (a model family, scorers, a rewriter) in the
registries of the packages that use them (`families.register_family`, ...). Registries call this
on a lookup miss and before listing names."""
from __future__ import annotations

GROUP = "npo_suite.plugins"
_loaded = False


def load_plugins() -> None:
    """Run every registered plug-in's entry point (idempotent: only the first call loads)."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    from importlib.metadata import entry_points

    for ep in entry_points(group=GROUP):
        ep.load()()
