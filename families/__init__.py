"""Model families: one module per family (`sd1`, `sdxl`; the flow transformers `sd3`, `flux`, `sana` on `flow`) behind the small `Family` protocol of
`base.py`, the `FAMILIES` registry, detection, and model loading (`loading.load_model`).

Everything above this package asks a family (`get_family(name)`) instead of testing its name.
A plug-in family (e.g. the digits world, `world/plugin.py`) calls `register_family` itself.
"""
from .base import (
    FAMILIES,
    Family,
    detect_folder,
    detect_single_file,
    detect_unet_config,
    family_names,
    family_with_text_encoders,
    get_family,
    register_family,
)
from .sd1 import SD1
from .sdxl import SDXL
from .sd3 import SD3
from .flux import FLUX
from .sana import SANA

register_family(SD1)
register_family(SDXL)
register_family(SD3)
register_family(FLUX)
register_family(SANA)

__all__ = ["FAMILIES", "FLUX", "Family", "SANA", "SD1", "SD3", "SDXL", "detect_folder", "detect_single_file", "detect_unet_config",
           "family_names", "family_with_text_encoders", "get_family", "register_family"]
