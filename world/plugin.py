"""The digits world as a plug-in (core/plugins.py; pyproject entry point `digits_world`): it registers
its model families (eps and flow), its scorers and its DDSPO rewriter in the product's registries, as any plug-in would."""
from __future__ import annotations


def register() -> None:
    """Register the world's family (families), scorers (evaluation.scorers) and `world_digits` rewriter (trainer.ddspo)."""
    from ..evaluation.scorers import register_scorer
    from ..families import register_family
    from ..trainer.ddspo import register_rewriter
    from .family import WORLD, WORLD_FLOW
    from .rewrite import REWRITER_NAME, WorldDigitsRewriter
    from .scorers import WORLD_SCORERS

    register_family(WORLD)
    register_family(WORLD_FLOW)
    for name, (factory, help_) in WORLD_SCORERS.items():
        register_scorer(name, factory, help_)
    register_rewriter(REWRITER_NAME, WorldDigitsRewriter)
