"""SDXL (stabilityai/stable-diffusion-xl-base-1.0 and its fine-tunes): two CLIP text encoders
(CLIP-L, CLIP-bigG) whose penultimate hidden states are concatenated, the pooled projection of the
second and the size micro-conditioning (`time_ids`) as added conditioning; zeros as null
conditioning (`force_zeros_for_empty_prompt`, the pipeline default); 1024 px, CFG 5.0."""
from ..core.offsets.keys import SDXL_LAYOUT
from .base import Family

SDXL = Family(
    name="sdxl", display_name="SDXL", prediction_type="epsilon",
    text_encoders=2, hidden_layer="penultimate", pooled=True, time_ids=True, force_zeros_for_empty_prompt=True,
    default_resolution=1024, default_cfg=5.0,
    offsets=SDXL_LAYOUT,
    single_file_keys=("conditioner.embedders.1",), single_file_pipeline="StableDiffusionXLPipeline", config_dir="sdxl",
    folder_components=("unet", "text_encoder", "text_encoder_2", "vae"),
    unet_added_cond="text_time",
    tokenizer_pads=(None, "!"),  # OpenCLIP bigG pads with "!" (id 0): diffusers' tokenizer_2, ComfyUI's clip_g
    activation_bytes_per_latent_pixel=650e3,
)
