"""The embedded digits world (docs/world.md). Importing it registers the world's DDSPO rewriter."""
from .rewrite import register as _register_rewriter

_register_rewriter()
