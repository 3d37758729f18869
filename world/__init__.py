"""The embedded digits world (docs/world.md)."""
