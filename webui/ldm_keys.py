"""Offset keys (diffusers module paths) re-keyed to the module paths of the WebUI's UNet (LDM names)."""
from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import nn

from ..core.npo import match_deltas
from ..core.offsets.keys import LAYOUTS, diffusers_to_ldm, unet_block_prefixes
from ..core.offsets.types import Delta, Offset

def unet_deltas_to_ldm(offset: Offset | None, unet: nn.Module, layouts: Sequence[Mapping] | None = None
                       ) -> tuple[dict[str, Delta], list[str]]:
    """The offset's UNet deltas re-keyed to `unet`'s own module paths, and the keys matching nothing.

    The WebUIs' UNets use LDM names (`input_blocks.4.1.transformer_blocks.0.attn1.to_q`); offsets
    are keyed by diffusers paths. The block numbering depends only on the block layout, which is
    the same for SD1.x/SD2.x and differs for SDXL: every registered family's standard layout is tried and the one
    under which more deltas fit (module exists, weight size matches) wins. Keys already in the
    target's naming (e.g. a diffusers-named UNet) pass through. `layouts`: diffusers UNet configs
    (block types, layers_per_block) to try instead of the registered families' ones.
    """
    if offset is None or not offset.unet:
        return {}, []
    best: tuple[dict, list] | None = None
    for layout in (layouts or [lay.unet for lay in LAYOUTS.values()]):
        prefixes = unet_block_prefixes(layout)
        mapped, unmatched = match_deltas(offset.unet, unet, lambda path: (path, diffusers_to_ldm(path, prefixes)))
        if best is None or len(mapped) > len(best[0]):
            best = (mapped, unmatched)
    return best
