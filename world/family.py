"""The digits world as a model family: a pixel-space SD1.x-shaped UNet (no VAE: the latents are the
8x8 grey pixels), one small CLIP text encoder (last hidden state), SD's schedule, eps-prediction.
Registered by `world/plugin.py::register()`, like any plug-in family; no product code names it.
WORLD_FLOW: the flow-matching world (issue 22), the same layout with a velocity UNet and a
FlowMatchEulerDiscreteScheduler (what tells the two folders apart)."""
from ..core.flow import FLOW
from ..families.base import Family

WORLD = Family(
    name="world", display_name="digits world", prediction_type="epsilon",
    text_encoders=1, hidden_layer="last", pooled=False, time_ids=False, force_zeros_for_empty_prompt=False,
    latent=False, default_resolution=8, default_cfg=3.0,
    offsets=None,  # offsets of the world are in-memory LoRAs of the trainer, not offset files
    folder_components=("unet", "text_encoder"), folder_absent=("vae",),
)

WORLD_FLOW = Family(
    name="world_flow", display_name="digits world (rectified flow)", prediction_type=FLOW, schedule={},
    text_encoders=1, hidden_layer="last", pooled=False, time_ids=False, force_zeros_for_empty_prompt=False,
    latent=False, default_resolution=8, default_cfg=3.0, offsets=None,
    folder_components=("unet", "text_encoder"), folder_absent=("vae",),
    folder_scheduler=("FlowMatchEulerDiscreteScheduler",), default_scheduler="flow-euler",
)
