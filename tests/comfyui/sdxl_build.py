"""A random-weight, full-size SDXL base checkpoint built from ComfyUI's own classes (opt-in tests).

Layout = what ComfyUI's CheckpointSave writes for SDXL (and what the released
`sd_xl_base_1.0.safetensors` uses): `model.diffusion_model.*` (LDM UNet, ComfyUI's `UNetModel` with
the config `comfy.model_detection` infers for SDXL: model_channels 320, transformer_depth
[0,0,2,2,10,10], context_dim 2048, adm_in_channels 2816, linear proj_in/out), CLIP-L at
`conditioner.embedders.0.transformer.text_model.*`, OpenCLIP bigG at `conditioner.embedders.1.model.*`
(converted by ComfyUI's own `SDXL.process_clip_state_dict_for_saving`), VAE at `first_stage_model.*`.

Memory: the networks are instantiated on the `meta` device (shapes only, no storage); each tensor's
values are generated on its own and streamed into the file, so the builder never holds more than
one tensor (~250 MB, CLIP-G's token embedding, in fp32 while generating) — the 2.6 B-parameter UNet
costs no RAM here. The file is written in the documented safetensors layout (8-byte little-endian
header length, JSON header with dtype/shape/data_offsets, raw little-endian data), to a temp file in
the cache folder, then `os.replace`d.

Initialisation (ComfyUI's layers skip it): matrices and conv kernels N(0, std) with std 0.02, norm
weights 1, biases 0, CLIP-L `position_ids` = arange(77), `logit_scale` = ComfyUI's default 4.6055.
With std 0.02 every activation stays finite in fp16/bf16/fp32 (checked by tests/comfyui/test_sdxl.py).

CLI (run under the heavy-job lock; measure peak RSS with /usr/bin/time -v):
    COMFYUI_PATH=/work/ComfyUI OMP_NUM_THREADS=1 flock /tmp/npo_heavy.lock /usr/bin/time -v \
        /work/comfy_venv/bin/python tests/comfyui/sdxl_build.py [--out PATH] [--force]
"""
from __future__ import annotations

import argparse
import json
import os
import struct
import sys
from pathlib import Path

CACHE = Path(os.environ.get("NPO_COMFY_CACHE", "/tmp/npo_suite_comfy_cache"))
SDXL_CKPT_NAME = "npo_random_sdxl_v1.safetensors"
STD = 0.02

# comfy/model_detection.py `unet_config_from_diffusers_unet` SDXL entry (the base model), minus dtype.
SDXL_UNET = dict(
    use_checkpoint=False, image_size=32, out_channels=4, use_spatial_transformer=True, legacy=False,
    num_classes="sequential", adm_in_channels=2816, in_channels=4, model_channels=320, num_res_blocks=[2, 2, 2],
    transformer_depth=[0, 0, 2, 2, 10, 10], channel_mult=[1, 2, 4], transformer_depth_middle=10,
    use_linear_in_transformer=True, context_dim=2048, num_head_channels=64,
    transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10], use_temporal_attention=False,
    use_temporal_resblock=False,
)
# the SDXL VAE has the SD1.5 architecture (different weights)
VAE_DDCONFIG = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}

_ST_DTYPES = {"float16": "F16", "bfloat16": "BF16", "float32": "F32", "int64": "I64"}


def _comfy_on_path() -> None:
    root = os.environ.get("COMFYUI_PATH")
    if not root:
        raise RuntimeError("COMFYUI_PATH is not set (the SDXL builder uses ComfyUI's own classes)")
    if root not in sys.path:
        sys.path.insert(0, root)
    if "comfy.model_management" not in sys.modules:  # standalone: CPU, as the harness runs ComfyUI
        import comfy.cli_args

        comfy.cli_args.args.cpu = True


def sdxl_layout(dtype=None) -> dict:
    """{checkpoint key: meta tensor} of a full SDXL base checkpoint, from ComfyUI's classes (no storage)."""
    import torch

    _comfy_on_path()
    import comfy.ops
    import comfy.sdxl_clip
    import comfy.supported_models
    from comfy.ldm.models.autoencoder import AutoencoderKL
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    dtype = dtype or torch.float16
    out = {}
    with torch.device("meta"):
        unet = UNetModel(**SDXL_UNET, dtype=dtype, operations=comfy.ops.disable_weight_init)
        out.update({f"model.diffusion_model.{k}": v for k, v in unet.state_dict().items()})
        del unet
        clip = comfy.sdxl_clip.SDXLClipModel(device="meta", dtype=dtype)
        clip_sd = clip.state_dict()
        del clip
        # ComfyUI's own SDXL save conversion: clip_g -> OpenCLIP layout (fused qkv, transposed projection)
        model_cfg = comfy.supported_models.SDXL(dict(SDXL_UNET))
        out.update(model_cfg.process_clip_state_dict_for_saving(clip_sd))
        vae = AutoencoderKL(ddconfig=VAE_DDCONFIG, embed_dim=4)
        out.update({f"first_stage_model.{k}": v for k, v in vae.state_dict().items()})
        del vae
    return out


def init_value(name: str, meta, gen, dtype, std: float = STD):
    """The explicit initial value of one tensor (see the module docstring), in `dtype` (ints kept)."""
    import torch

    shape = tuple(meta.shape)
    if "position_ids" in name:
        return torch.arange(shape[-1], dtype=torch.int64).expand(shape).contiguous()
    if name.endswith("logit_scale"):
        return torch.full(shape, 4.6055, dtype=dtype)
    if len(shape) >= 2:
        return (torch.randn(shape, generator=gen) * std).to(dtype)
    if name.endswith("weight"):
        return torch.ones(shape, dtype=dtype)
    return torch.zeros(shape, dtype=dtype)


def _tensor_bytes(t) -> bytes:
    import torch

    t = t.contiguous()
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16: same bits as int16
        t = t.view(torch.int16)
    return t.numpy().tobytes()  # little-endian on every platform torch runs on here


def build_random_sdxl(path: Path, dtype=None, seed: int = 0, std: float = STD) -> Path:
    """Write the random SDXL checkpoint to `path` (atomic: temp file in the same folder, then os.replace)."""
    import torch

    dtype = dtype or torch.float16
    layout = sdxl_layout(dtype)
    keys = sorted(layout)
    header, offset, values_dtype = {}, 0, {}
    for k in keys:
        m = layout[k]
        dt = torch.int64 if "position_ids" in k else dtype
        values_dtype[k] = dt
        n = m.numel() * torch.empty((), dtype=dt).element_size()
        header[k] = {"dtype": _ST_DTYPES[str(dt).split(".")[1]], "shape": list(m.shape),
                     "data_offsets": [offset, offset + n]}
        offset += n
    header["__metadata__"] = {"format": "pt", "npo_suite.note": f"random weights N(0,{std}) seed {seed}, test only",
                              "modelspec.architecture": "stable-diffusion-xl-v1-base"}
    hb = json.dumps(header, separators=(",", ":")).encode("utf-8")
    hb += b" " * (-len(hb) % 8)  # data starts 8-byte aligned
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    gen = torch.Generator().manual_seed(seed)
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(hb)))
            f.write(hb)
            for k in keys:
                v = init_value(k, layout[k], gen, values_dtype[k], std)
                b = _tensor_bytes(v)
                if len(b) != header[k]["data_offsets"][1] - header[k]["data_offsets"][0]:
                    raise RuntimeError(f"{k}: wrote {len(b)} bytes, header says {header[k]['data_offsets']}")
                f.write(b)
                del v, b
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def ensure_random_sdxl(path: Path | None = None) -> Path:
    """The cached checkpoint, built once."""
    path = Path(path or CACHE / SDXL_CKPT_NAME)
    if not path.exists():
        build_random_sdxl(path)
    return path


# SDXL base attention layout (diffusers paths): block -> (channels, transformer depth); 70 blocks in all.
SDXL_ATTENTION_BLOCKS = {
    **{f"down_blocks.1.attentions.{i}": (640, 2) for i in range(2)},
    **{f"down_blocks.2.attentions.{i}": (1280, 10) for i in range(2)},
    "mid_block.attentions.0": (1280, 10),
    **{f"up_blocks.0.attentions.{i}": (1280, 10) for i in range(3)},
    **{f"up_blocks.1.attentions.{i}": (640, 2) for i in range(3)},
}
CONTEXT_DIM = 2048  # CLIP-L (768) + CLIP-G (1280) hidden states, concatenated


def ensure_npo_suite_importable() -> None:
    """ComfyUI's venv may lack the editable install of this package: expose the repo root as
    `npo_suite` (what pyproject's package-dir mapping does) through a temp folder on sys.path."""
    import importlib.util
    import tempfile

    if importlib.util.find_spec("npo_suite") is not None:
        return
    import atexit
    import shutil

    alias = Path(tempfile.mkdtemp(prefix="npo_suite_import_"))
    (alias / "npo_suite").symlink_to(Path(__file__).resolve().parents[2], target_is_directory=True)
    sys.path.insert(0, str(alias))
    atexit.register(shutil.rmtree, alias, True)  # the link only (rmtree does not follow it); nothing left in /tmp


def random_sdxl_lora(seed: int, blocks=None, depth: int | None = None, rank: int = 4, std: float = 0.08,
                     proj_in: bool = False):
    """A random LoRA `Offset` (diffusers keys) on SDXL attention projections.

    blocks: attention-block paths (default: all 70 transformer blocks' parents, SDXL_ATTENTION_BLOCKS);
    depth: transformer blocks per attention block to cover (default: all); proj_in: also the block's
    linear proj_in. Every attn1/attn2 to_q, to_k, to_v, to_out.0 (attn2 k/v read the 2048-wide context).
    """
    import torch

    ensure_npo_suite_importable()
    from npo_suite.core.offsets.types import LowRankDelta, Offset

    g = torch.Generator().manual_seed(seed)

    def lr(fan_out, fan_in):
        return LowRankDelta(down=torch.randn(rank, fan_in, generator=g) * std,
                            up=torch.randn(fan_out, rank, generator=g) * std, scale=1.0)

    unet = {}
    for blk in (blocks if blocks is not None else SDXL_ATTENTION_BLOCKS):
        ch, full_depth = SDXL_ATTENTION_BLOCKS[blk]
        for t in range(full_depth if depth is None else min(depth, full_depth)):
            for attn, in_k in (("attn1", ch), ("attn2", CONTEXT_DIM)):
                for proj, fan_in in (("to_q", ch), ("to_k", in_k), ("to_v", in_k), ("to_out.0", ch)):
                    unet[f"{blk}.transformer_blocks.{t}.{attn}.{proj}"] = lr(ch, fan_in)
        if proj_in:
            unet[f"{blk}.proj_in"] = lr(ch, ch)
    return Offset(unet=unet)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=CACHE / SDXL_CKPT_NAME)
    ap.add_argument("--force", action="store_true", help="rebuild even if the file exists")
    args = ap.parse_args()
    if args.out.exists() and not args.force:
        print(f"{args.out} exists (use --force to rebuild)")
        return 0
    import time

    t0 = time.perf_counter()
    build_random_sdxl(args.out)
    print(f"wrote {args.out} ({args.out.stat().st_size / 2**30:.2f} GiB) in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
