"""families/: the registry, detection (folder, single file, UNet config), the Family protocol of every
member, text encoding per family, and the world family arriving only through its plug-in."""
from __future__ import annotations

import ast
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from npo_suite.families import FAMILIES, Family, SD1, SDXL, detect_folder, detect_single_file, detect_unet_config
from npo_suite.families import family_names, family_with_text_encoders, get_family, register_family

PACKAGE = Path(__file__).resolve().parent.parent


@pytest.fixture
def world_family():
    from npo_suite.world.plugin import register

    register()
    return FAMILIES["world"]


def test_registry_holds_sd1_and_sdxl():
    assert FAMILIES["sd1"] is SD1 and FAMILIES["sdxl"] is SDXL
    assert get_family("sd1") is SD1 and get_family(SDXL) is SDXL
    assert {"sd1", "sdxl"} <= set(family_names())
    assert family_with_text_encoders(1) is SD1 and family_with_text_encoders(2) is SDXL


def test_unknown_family_is_a_clear_error():
    with pytest.raises(ValueError, match=r"unknown family 'auraflow' \(expected one of \[.*'sd1', 'sd3', 'sdxl'"):
        get_family("auraflow")


def test_register_family_adds_its_offset_layout():
    from npo_suite.core.offsets.keys import LAYOUTS, SD15_UNET, OffsetLayout

    layout = OffsetLayout("toy", "Toy", SD15_UNET, {}, "diffusers", {}, "toy_v1")
    toy = Family(name="toy", display_name="Toy", offsets=layout, folder_components=("unet", "toy_only"))
    try:
        assert register_family(toy) is toy and get_family("toy") is toy and LAYOUTS["toy"] is layout
    finally:
        FAMILIES.pop("toy")
        LAYOUTS.pop("toy")
    with pytest.raises(TypeError):
        register_family("sd1")


@pytest.mark.parametrize("name", ["sd1", "sdxl", "world"])
def test_every_member_satisfies_the_protocol(name, world_family):
    f = get_family(name)
    assert isinstance(f, Family) and f.name == name and f.display_name
    assert f.prediction_type in ("epsilon", "v_prediction") and f.schedule["num_train_timesteps"] == 1000
    assert f.text_encoders >= 1 and f.hidden_layer in ("last", "penultimate")
    assert f.default_resolution > 0 and f.default_cfg > 1.0
    assert f.lora_target_modules("attn") == ["to_q", "to_k", "to_v", "to_out.0"]
    assert f.offsets is None or f.offsets.name == name
    assert f.single_file_pipeline is None or (PACKAGE / "configs" / f.config_dir / "model_index.json").is_file()
    assert f.folder_components and callable(f.encode_text)
    assert dataclasses.is_dataclass(f)
    assert (f.size_ids(2, (64, 48)) is None) == (not f.time_ids)


def test_family_values():
    assert (SD1.default_resolution, SD1.default_cfg, SDXL.default_resolution, SDXL.default_cfg) == (512, 7.5, 1024, 5.0)
    assert not SD1.pooled and SDXL.pooled and SDXL.time_ids and SDXL.force_zeros_for_empty_prompt
    assert SD1.offsets.kohya_te == {"te1": "lora_te_"} and SDXL.offsets.kohya_unet == "ldm"
    assert SDXL.size_ids(2, (64, 48)).tolist() == [[64, 48, 0, 0, 64, 48]] * 2


def test_detect_folder(sd15_dir, sdxl_dir, tmp_path, world_family):
    import shutil

    assert detect_folder(sd15_dir) is SD1 and detect_folder(sdxl_dir) is SDXL
    d = tmp_path / "pixels"
    for sub in ("unet", "text_encoder", "tokenizer", "scheduler"):
        shutil.copytree(sd15_dir / sub, d / sub)
    assert detect_folder(d) is world_family
    assert detect_folder(tmp_path / "nothing") is None


def test_detect_single_file():
    assert detect_single_file(["cond_stage_model.transformer.x", "model.diffusion_model.out.0.weight"]) is SD1
    assert detect_single_file(["conditioner.embedders.0.x", "conditioner.embedders.1.model.y"]) is SDXL
    with pytest.raises(ValueError, match="without text-encoder weights; pass family='sd1' or 'sdxl'"):
        detect_single_file(["model.diffusion_model.input_blocks.0.0.weight"], "m.safetensors")
    with pytest.raises(ValueError, match="not an SD1.x/SDXL single-file checkpoint"):
        detect_single_file(["unet.conv_in.weight"])


def test_detect_unet_config(world_family):
    from npo_suite.testing.tiny_models import unet_config_sd15, unet_config_sdxl

    assert detect_unet_config(unet_config_sd15()) is SD1 and detect_unet_config(unet_config_sdxl()) is SDXL
    assert detect_unet_config({"adm_in_channels": 2816}) is SDXL  # a ComfyUI (LDM) unet_config
    assert detect_unet_config({"adm_in_channels": None, "context_dim": 768}) is SD1


def test_encode_text_matches_the_pipelines_conventions(sd15, sdxl):
    """SD1.x: the last hidden state; SDXL: both penultimate states concatenated + the pooled projection."""
    prompts = ["a cat", ""]
    with torch.no_grad():
        h, pooled = SD1.encode_text([sd15.tokenizer], [sd15.text_encoder], prompts, "cpu")
        ids = sd15.tokenizer(prompts, padding="max_length", max_length=sd15.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        assert pooled is None and torch.equal(h, sd15.text_encoder(ids)[0])
        h, pooled = SDXL.encode_text([sdxl.tokenizer, sdxl.tokenizer_2], [sdxl.text_encoder, sdxl.text_encoder_2],
                                     prompts, "cpu")
        outs = [te(tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                       return_tensors="pt").input_ids, output_hidden_states=True)
                for te, tok in ((sdxl.text_encoder, sdxl.tokenizer), (sdxl.text_encoder_2, sdxl.tokenizer_2))]
    assert torch.equal(h, torch.cat([o.hidden_states[-2] for o in outs], dim=-1))
    assert torch.equal(pooled, outs[1].text_embeds)


def test_world_family_is_registered_only_through_the_plugin():
    """Importing the product packages registers sd1 and sdxl only; world/plugin.py::register() adds the worlds (eps and flow)."""
    code = ("import npo_suite.families as F, npo_suite.families.loading, npo_suite.diffusers_host.generate, "
            "npo_suite.trainer.backends.diffusers\n"
            "assert 'world' not in F.FAMILIES, list(F.FAMILIES)\n"
            "from npo_suite.world.plugin import register\n"
            "from npo_suite.world.family import WORLD, WORLD_FLOW\n"
            "register(); register()\n"
            "assert F.FAMILIES['world'] is WORLD and F.FAMILIES['world_flow'] is WORLD_FLOW\n"
            "assert list(F.FAMILIES) == ['sd1', 'sdxl', 'sd3', 'flux', 'sana', 'world', 'world_flow'], list(F.FAMILIES)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    for f in (PACKAGE / "families").glob("*.py"):  # no family module imports the world, lazily or not
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [getattr(node, "module", None) or ""] + [a.name for a in node.names]
                assert not any("world" in n for n in names), f"{f.name}: {ast.unparse(node)}"


def test_load_model_asks_the_family(sd15_dir, sdxl_dir):
    from npo_suite.families.loading import load_model

    b = load_model(sdxl_dir)
    assert b.family == "sdxl" and b.family_spec is SDXL and len(b.text_encoders) == 2
    assert load_model(sd15_dir).family_spec is SD1


def test_weight_module_map_is_the_one_ldm_key_loop():
    """diffusers -> LDM module paths from a state-dict key map (ComfyUI's unet_to_diffusers), .weight pairs only."""
    from npo_suite.core.offsets.keys import weight_module_map

    key_map = {"down_blocks.0.attentions.0.proj_in.weight": "input_blocks.1.1.proj_in.weight",
               "down_blocks.0.attentions.0.proj_in.bias": "input_blocks.1.1.proj_in.bias",
               "conv_in.weight": "input_blocks.0.0.weight", "odd.weight": "odd.scale"}
    assert weight_module_map(key_map) == {"down_blocks.0.attentions.0.proj_in": "input_blocks.1.1.proj_in",
                                          "conv_in": "input_blocks.0.0"}
