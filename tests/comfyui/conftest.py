"""Real-ComfyUI harness (opt-in): set COMFYUI_PATH to a ComfyUI checkout and run with a Python
that has ComfyUI's requirements, e.g.

    COMFYUI_PATH=/work/ComfyUI OMP_NUM_THREADS=1 /work/comfy_venv/bin/python -m pytest -q tests/comfyui

Nothing here imports ComfyUI unless COMFYUI_PATH is set (the test modules skip at module level).
ComfyUI runs in-process on CPU; its model folders point into a temp dir; this package is
symlinked into a temp `custom_nodes` folder as `npo_suite`. A random-weight SD1.5-shaped
checkpoint is built from ComfyUI's own classes once and cached (NPO_COMFY_CACHE, default
/tmp/npo_suite_comfy_cache): nothing is downloaded.
"""
from __future__ import annotations

import asyncio
import os
import sys
import uuid
from pathlib import Path

import pytest

COMFYUI_PATH = os.environ.get("COMFYUI_PATH")
REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("NPO_COMFY_CACHE", "/tmp/npo_suite_comfy_cache"))
CKPT_NAME = "npo_random_sd15_v1.safetensors"


if COMFYUI_PATH:  # the test modules import `npo_suite.*`; ComfyUI's venv may lack our editable install
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from sdxl_build import ensure_npo_suite_importable

    ensure_npo_suite_importable()

SD15_UNET = dict(
    use_checkpoint=False, image_size=32, out_channels=4, use_spatial_transformer=True, legacy=False,
    adm_in_channels=None, in_channels=4, model_channels=320, num_res_blocks=[2, 2, 2, 2],
    transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], channel_mult=[1, 2, 4, 4], transformer_depth_middle=1,
    use_linear_in_transformer=False, context_dim=768, num_heads=8,
    transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], use_temporal_attention=False,
    use_temporal_resblock=False,
)


def _init_random(module, gen, std: float = 0.02) -> dict:
    """ComfyUI's layers skip weight init: fill explicitly (matrices N(0, std), norms 1, biases 0)."""
    import torch

    sd = {}
    for name, p in module.state_dict().items():
        if p.ndim >= 2:
            t = torch.randn(p.shape, generator=gen) * std
        elif name.endswith("weight"):
            t = torch.ones(p.shape)
        elif "position_ids" in name:
            t = p.clone()
        else:
            t = torch.zeros(p.shape)
        sd[name] = t.to(torch.float16) if t.is_floating_point() else t
    return sd


def build_random_sd15(path: Path) -> None:
    """A random-weight SD1.5 checkpoint (UNet, CLIP-L, VAE) built from ComfyUI's classes, fp16."""
    import json

    import torch
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel

    import comfy.ops
    from comfy.ldm.models.autoencoder import AutoencoderKL
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    gen = torch.Generator().manual_seed(0)
    sd = {}
    unet = UNetModel(**SD15_UNET, operations=comfy.ops.disable_weight_init)
    sd.update({f"model.diffusion_model.{k}": v for k, v in _init_random(unet, gen).items()})
    del unet
    cfg = json.loads((Path(COMFYUI_PATH) / "comfy" / "sd1_clip_config.json").read_text())
    clip = CLIPTextModel(CLIPTextConfig(**{k: v for k, v in cfg.items() if k != "architectures"}))
    sd.update({f"cond_stage_model.transformer.{k}": v for k, v in _init_random(clip, gen).items()})
    del clip
    ddconfig = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
    vae = AutoencoderKL(ddconfig=ddconfig, embed_dim=4)
    sd.update({f"first_stage_model.{k}": v for k, v in _init_random(vae, gen).items()})
    del vae
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(sd, str(tmp))
    os.replace(tmp, path)


class Comfy:
    """In-process ComfyUI: `run(prompt)` executes an API-format prompt, returns {node_id: outputs}."""

    def __init__(self, root: Path):
        self.root = root
        sys.path.insert(0, COMFYUI_PATH)
        import comfy.cli_args

        comfy.cli_args.args.cpu = True
        comfy.cli_args.args.disable_all_custom_nodes = False
        import utils.extra_config  # noqa: F401  (must precede `nodes`)
        import folder_paths

        for sub in ("checkpoints", "loras", "npo", "text_encoders", "custom_nodes", "output", "input", "temp"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        (root / "custom_nodes" / "npo_suite").symlink_to(REPO, target_is_directory=True)
        folder_paths.folder_names_and_paths["custom_nodes"] = ([str(root / "custom_nodes")], set())
        folder_paths.set_output_directory(str(root / "output"))
        folder_paths.set_input_directory(str(root / "input"))
        folder_paths.set_temp_directory(str(root / "temp"))
        folder_paths.folder_names_and_paths["checkpoints"] = ([str(root / "checkpoints")], folder_paths.supported_pt_extensions)
        folder_paths.folder_names_and_paths["loras"] = ([str(root / "loras")], folder_paths.supported_pt_extensions)
        folder_paths.folder_names_and_paths["npo"] = ([str(root / "npo")], {".safetensors", ".ckpt", ".pt", ".bin", ".pth"})
        folder_paths.folder_names_and_paths["text_encoders"] = ([str(root / "text_encoders")], folder_paths.supported_pt_extensions)
        import nodes

        asyncio.run(nodes.init_extra_nodes(init_custom_nodes=True, init_api_nodes=False))
        self.nodes = nodes
        self.folder_paths = folder_paths
        import execution

        self.execution = execution

        class _Server:
            client_id = None
            last_node_id = None

            def send_sync(self, *a, **k):
                pass

        self.executor = execution.PromptExecutor(_Server(), cache_type=False)

    def run(self, prompt: dict, outputs: list[str]) -> dict:
        """Validate + execute `prompt`; return the raw outputs of the nodes in `outputs`."""
        ok, err, good_outputs, node_errors = asyncio.run(self.execution.validate_prompt("t", prompt, None))
        if not ok:
            raise AssertionError(f"invalid prompt: {err} {node_errors}")
        # The output cache is kept between prompts (as in a ComfyUI server): the checkpoint loads
        # once, and cached MODEL/GUIDER objects are reused, which also checks they keep no run state.
        self.executor.execute(prompt, str(uuid.uuid4()), {}, good_outputs)
        if not self.executor.success:
            msgs = [m for m in self.executor.status_messages if m[0] == "execution_error"]
            raise AssertionError(f"execution failed: {msgs}")
        out = {}
        for nid in outputs:
            entry = self.executor.caches.outputs.get(nid)
            out[nid] = getattr(entry, "outputs", entry)
        return out


@pytest.fixture(scope="session")
def comfy_runtime(tmp_path_factory):
    """ComfyUI initialised in-process (custom nodes loaded), with no checkpoint."""
    if not COMFYUI_PATH:
        pytest.skip("COMFYUI_PATH is not set")
    return Comfy(tmp_path_factory.mktemp("comfy_root"))


@pytest.fixture(scope="session")
def comfy(comfy_runtime):
    h = comfy_runtime
    ckpt = CACHE / CKPT_NAME
    if not ckpt.exists():
        build_random_sd15(ckpt)
    (h.root / "checkpoints" / CKPT_NAME).symlink_to(ckpt)
    return h


def release_layout_copy(src: Path, dst: Path) -> Path:
    """The harness checkpoint in the SD1.5 release layout for diffusers' single-file loader, built once.

    The harness writes CLIP keys as `cond_stage_model.transformer.embeddings...` (transformers 5's
    CLIPTextModel has no `text_model.` level); ComfyUI accepts that, diffusers only recognises the
    release layout `cond_stage_model.transformer.text_model.embeddings...`. Same tensors, renamed keys;
    written atomically next to the cached checkpoint (not into each run's temp folder: 2.1 GB).
    """
    if dst.exists():
        return dst
    from safetensors.torch import load_file, save_file

    pre = "cond_stage_model.transformer."
    sd = load_file(str(src))
    tmp = dst.with_suffix(".tmp")
    save_file({(pre + "text_model." + k[len(pre):] if k.startswith(pre) and not k.startswith(pre + "text_model.")
                else k): v for k, v in sd.items()}, str(tmp))
    os.replace(tmp, dst)
    return dst


@pytest.fixture(scope="session")
def release_ckpt(comfy) -> Path:
    """The cached random SD1.5 checkpoint in the release key layout (for the command-line backend)."""
    return release_layout_copy(CACHE / CKPT_NAME, CACHE / CKPT_NAME.replace(".safetensors", "_release_layout.safetensors"))


@pytest.fixture(scope="session")
def sd1_tokenizer_77(tmp_path_factory) -> Path:
    """ComfyUI's CLIP tokenizer folder with model_max_length 77 (it says 8192: ComfyUI chunks by 77 itself;
    the command-line backend pads to model_max_length, CLIP-L's position table has 77). A few kB."""
    import json
    import shutil

    tok = shutil.copytree(Path(COMFYUI_PATH) / "comfy" / "sd1_tokenizer", tmp_path_factory.mktemp("tok") / "tokenizer")
    cfg = json.loads((tok / "tokenizer_config.json").read_text())
    (tok / "tokenizer_config.json").write_text(json.dumps({**cfg, "model_max_length": 77}))
    return tok
