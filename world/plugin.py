"""The digits world as a plug-in (core/plugins.py; pyproject entry point `digits_world`): it registers
its scorers and its DDSPO rewriter in the product's registries, as any plug-in would."""
from __future__ import annotations


def register() -> None:
    """Register the world's scorers (evaluation.scorers) and its `world_digits` rewriter (trainer.ddspo)."""
    from ..evaluation.scorers import register_scorer
    from ..trainer.ddspo import register_rewriter
    from .rewrite import REWRITER_NAME, WorldDigitsRewriter
    from .scorers import WORLD_SCORERS

    for name, (factory, help_) in WORLD_SCORERS.items():
        register_scorer(name, factory, help_)
    register_rewriter(REWRITER_NAME, WorldDigitsRewriter)
