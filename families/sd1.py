"""SD1.x (runwayml/stable-diffusion-v1-5 and its fine-tunes): one CLIP-L text encoder, its last
hidden state as conditioning, the encoded empty prompt as null conditioning, 512 px, CFG 7.5."""
from ..core.offsets.keys import SD1_LAYOUT
from .base import Family

SD1 = Family(
    name="sd1", display_name="SD1.x", prediction_type="epsilon",
    text_encoders=1, hidden_layer="last", pooled=False, time_ids=False, force_zeros_for_empty_prompt=False,
    default_resolution=512, default_cfg=7.5,
    offsets=SD1_LAYOUT,
    single_file_keys=("cond_stage_model.",), single_file_pipeline="StableDiffusionPipeline", config_dir="sd15",
    folder_components=("unet", "text_encoder", "vae"), folder_absent=("text_encoder_2",),
    unet_added_cond=None,
)
