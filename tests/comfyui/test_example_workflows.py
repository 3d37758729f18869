"""The shipped example workflows (UI format) run in a real ComfyUI.

Each `example_workflows/*.json` is converted to an API prompt the way the frontend does it
(`graphToPrompt`): widget values are matched to the node's widget inputs in the order of the live
node schema (required, then optional), an INT with `control_after_generate` (or named seed /
noise_seed) has one extra UI-only value after it, links become `[node_id, output_slot]`, notes are
dropped. Trailing widget inputs the file does not have yet take the schema default (a node may grow
optional inputs at the end). The prompt then goes through ComfyUI's own `validate_prompt`, with the
user-facing file names replaced by local test files; the sampling workflows are executed at 64x64
with 1 step on the random-weight checkpoint and must decode to an image.
"""
from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest

if not os.environ.get("COMFYUI_PATH"):
    pytest.skip("COMFYUI_PATH is not set (real-ComfyUI tests are opt-in, see docs/comfyui.md)", allow_module_level=True)

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
WORKFLOWS = sorted((REPO / "example_workflows").glob("*.json"))
CKPT = "npo_random_sd15_v1.safetensors"
NOTE_TYPES = {"Note", "MarkdownNote"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
# training (run in test_training_nodes.py) / SVD of two full checkpoints; npo_sd35: ComfyUI builds SD3's
# text encoders at their fixed full size (T5-XXL 4.7 B parameters) and the tiny SD3 of dit_build.py is
# no checkpoint file: Load Weight Offset -> Apply NPO -> KSampler on SD3 runs in test_dit_npo.py instead
VALIDATE_ONLY = {"train_npo_lora", "train_self_npo", "extract_offset", "collect_pairs_by_hand", "npo_sd35"}
SEED_NAMES = ("seed", "noise_seed")


def _opts(spec) -> dict:
    return spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}


def _is_widget(spec) -> bool:
    """Inputs the frontend shows as widgets (their values live in widgets_values)."""
    return (isinstance(spec[0], list) or spec[0] in WIDGET_TYPES) and not _opts(spec).get("forceInput")


def _default(spec):
    opts = _opts(spec)
    if "default" in opts:
        return opts["default"]
    options = spec[0] if isinstance(spec[0], list) else opts.get("options")
    return options[0] if options else None


def ui_to_api(workflow: dict, input_types) -> dict:
    """API prompt from a UI workflow. `input_types(class_type)` returns the node's INPUT_TYPES()."""
    links = {l[0]: l for l in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        if node["type"] in NOTE_TYPES or node.get("mode", 0) in (2, 4):  # notes; muted / bypassed nodes
            continue
        where = f"node {node['id']} ({node['type']})"
        spec = input_types(node["type"])
        ordered = [(name, s) for sect in ("required", "optional") for name, s in (spec.get(sect) or {}).items()]
        widget_names = [name for name, s in ordered if _is_widget(s)]
        ui_widgets = [i["name"] for i in node.get("inputs", []) if i.get("widget")]
        assert ui_widgets == widget_names[:len(ui_widgets)], \
            f"{where}: saved widgets {ui_widgets} do not follow the node's widget inputs {widget_names}"
        linked = {i["name"]: links[i["link"]] for i in node.get("inputs", []) if i.get("link") is not None}
        unknown = set(linked) - {name for name, _ in ordered}
        assert not unknown, f"{where}: links into inputs the node does not have: {sorted(unknown)}"
        values = list(node.get("widgets_values") or [])
        inputs = {}
        for name, s in ordered:
            if _is_widget(s):
                if values:
                    value = values.pop(0)
                    if s[0] == "INT" and (_opts(s).get("control_after_generate") or name in SEED_NAMES):
                        assert values and values[0] in ("fixed", "increment", "decrement", "randomize"), \
                            f"{where}: {name} lacks its control_after_generate value"
                        values.pop(0)
                else:
                    value = _default(s)
                if value is not None:
                    inputs[name] = value
            if name in linked:
                _, src, src_slot, *_ = linked[name]
                inputs[name] = [str(src), src_slot]
        assert not values, f"{where}: {len(values)} widget values left over: {values}"
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs,
                                   "_meta": {"title": node.get("title") or node["type"]}}
    return prompt


def _import_package(comfy):
    """`npo_suite` as a package; if this Python lacks the editable install, via the custom_nodes link."""
    import importlib
    import sys

    try:
        return importlib.import_module("npo_suite")
    except ModuleNotFoundError:
        sys.path.insert(0, str(comfy.root / "custom_nodes"))  # holds the symlink npo_suite -> repo
        return importlib.import_module("npo_suite")


def _random_lora(seed: int, std: float = 0.05):
    """A small random kohya LoRA on SD1.5's first cross-attention block (enough to load and act)."""
    from npo_suite.core.offsets.types import LowRankDelta, Offset

    g = torch.Generator().manual_seed(seed)
    blk = "down_blocks.0.attentions.0.transformer_blocks.0"
    unet = {f"{blk}.{a}.{p}": LowRankDelta(down=torch.randn(4, fi, generator=g) * std,
                                           up=torch.randn(320, 4, generator=g) * std, scale=1.0)
            for a, fi in (("attn1", 320), ("attn2", 768)) for p, fi in (("to_q", 320), ("to_k", fi), ("to_v", fi))}
    return Offset(unet=unet)


@pytest.fixture(scope="module")
def files(comfy):
    """Local stand-ins for the files the examples name: {folder: file name}."""
    _import_package(comfy)
    from npo_suite.core.offsets import save_offset

    out = {}
    for folder, seed in (("npo", 11), ("loras", 12)):
        path = comfy.root / folder / f"example_{folder}.safetensors"
        if not path.exists():
            save_offset(_random_lora(seed), path, format="kohya", family="sd1")
        out[folder] = path.name
    te = comfy.root / "text_encoders" / "example_te.safetensors"  # a name in the text-encoder list (never loaded)
    if not te.exists():
        save_offset(_random_lora(13), te, format="kohya", family="sd1")
    out["text_encoders"] = te.name
    return out


def _input_types(comfy):
    def get(class_type):
        cls = comfy.nodes.NODE_CLASS_MAPPINGS.get(class_type)
        assert cls is not None, f"ComfyUI has no node {class_type}"
        return cls.INPUT_TYPES()
    return get


def _localise(prompt: dict, files: dict, input_types) -> None:
    """Point user file names at the local test files and shrink the run to 64x64, 1 step."""
    for node in prompt.values():
        t, inp = node["class_type"], node["inputs"]
        if t == "CheckpointLoaderSimple":
            inp["ckpt_name"] = CKPT
        elif t == "NPOSuite_LoadWeightOffset":
            folder = inp["offset_name"].split("/", 1)[0]
            inp["offset_name"] = f"{folder}/{files['loras' if folder == 'loras' else 'npo']}"
        elif t in ("TripleCLIPLoader", "DualCLIPLoader", "CLIPLoader"):  # validation only: any listed file
            for k in [k for k in inp if k.startswith("clip_name")]:
                inp[k] = files["text_encoders"]
        elif t in ("LoraLoaderModelOnly", "LoraLoader"):
            inp["lora_name"] = files["loras"]
        elif t == "NPOSuite_PreferenceDataset":  # no dataset here: the always-present first choice validates
            spec = input_types(t)["required"]["dataset"]
            inp["dataset"] = (spec[0] if isinstance(spec[0], list) else _opts(spec)["options"])[0]
        elif t in ("EmptyLatentImage", "EmptySD3LatentImage"):
            inp.update(width=64, height=64, batch_size=1)
        elif t in ("BasicScheduler", "KSampler"):
            inp["steps"] = 1
        elif t == "SaveImage":
            inp["filename_prefix"] = "npo_examples/" + inp["filename_prefix"]


def test_example_workflows_are_ui_format():
    assert len(WORKFLOWS) >= 7
    for f in WORKFLOWS:
        wf = json.loads(f.read_text())
        assert isinstance(wf.get("nodes"), list), f"{f.name} is not a UI workflow"


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_example_workflow_validates_and_runs(comfy, files, path):
    input_types = _input_types(comfy)
    prompt = ui_to_api(json.loads(path.read_text()), input_types)
    assert any(n["class_type"].startswith("NPOSuite_") for n in prompt.values())
    _localise(prompt, files, input_types)
    ok, err, outputs, node_errors = asyncio.run(comfy.execution.validate_prompt("t", prompt, None))
    assert ok, f"{path.name}: {err} {node_errors}"
    if path.stem in VALIDATE_ONLY:
        return
    decoders = [nid for nid, n in prompt.items() if n["class_type"] == "VAEDecode"]
    assert decoders, f"{path.name}: no VAEDecode to check"
    out = comfy.run(prompt, decoders)
    for nid in decoders:
        image = out[nid][0][0]  # [B, H, W, 3]
        assert tuple(image.shape) == (1, 64, 64, 3), f"{path.name}: decoded {tuple(image.shape)}"
        assert torch.isfinite(image).all(), f"{path.name}: non-finite pixels"
