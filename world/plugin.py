"""The digits world's plug-in entry point (`npo_suite.plugins`: `digits_world`): registers what the
world brings in the registries of the packages that use it."""


def register() -> None:
    from ..families import register_family
    from .family import WORLD

    register_family(WORLD)
