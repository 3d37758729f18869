"""The NPO axes of the WebUI's X/Y/Z plot script: α, β, negative offset and mode.

Each axis writes its value onto the processing object `p` (`p.npo_beta = 0.5`, ...);
`apply_overrides` then lays those values over the panel's settings of that cell of the grid.
The X/Y/Z script is found among the WebUI's loaded scripts (`modules.scripts.scripts_data`); it is
handed in, nothing here imports the WebUI.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

from .settings import MODES, NPOSettings, settings_dict

XYZ_FIELDS = {"alpha": "npo_alpha", "beta": "npo_beta", "negative": "npo_negative", "mode": "npo_mode"}
AXIS_PREFIX = "[NPO]"
XYZ_SCRIPT_MODULES = ("xyz_grid.py", "xyz_grid")  # the X/Y/Z script's module name in A1111 / Forge


def find_xyz_module(scripts_data: Sequence):
    """The X/Y/Z plot script's module among the WebUI's loaded scripts, or None."""
    return next((d.module for d in scripts_data if d.script_class.__module__ in XYZ_SCRIPT_MODULES), None)


def add_axes(xyz, offset_choices: Callable[[], list[str]]) -> bool:
    """Append the NPO axes to `xyz.axis_options` (once: False when they are already there).
    `offset_choices()` lists the offset files for the negative-offset axis."""
    if any(getattr(o, "label", "").startswith(AXIS_PREFIX) for o in xyz.axis_options):
        return False

    def setter(attr):
        def apply(p, x, xs):
            setattr(p, attr, x)
        return apply

    xyz.axis_options.extend([
        xyz.AxisOption(f"{AXIS_PREFIX} Alpha", float, setter(XYZ_FIELDS["alpha"])),
        xyz.AxisOption(f"{AXIS_PREFIX} Beta", float, setter(XYZ_FIELDS["beta"])),
        xyz.AxisOption(f"{AXIS_PREFIX} Negative offset", str, setter(XYZ_FIELDS["negative"]), choices=offset_choices),
        xyz.AxisOption(f"{AXIS_PREFIX} Mode", str, setter(XYZ_FIELDS["mode"]), choices=lambda: list(MODES)),
    ])
    return True


def apply_overrides(settings: NPOSettings, p) -> NPOSettings:
    """`settings` with the values the X/Y/Z axes set on `p`, normalised again (`NPOSettings.__post_init__`)."""
    for field, attr in XYZ_FIELDS.items():
        if hasattr(p, attr):
            setattr(settings, field, getattr(p, attr))
    return NPOSettings(**settings_dict(settings))
