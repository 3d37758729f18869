"""example_workflows/ holds UI (litegraph) workflows that ComfyUI's templates browser can open.

The frontend (comfyui_frontend_package 1.27) lists `<custom node>/example_workflows/<name>.json`,
opens it with `app.loadGraphData` (which needs the UI format: an API-format prompt fails there with
"nodes is not iterable") and shows `/api/workflow_templates/<custom node>/<name>.jpg` as the thumbnail.
These checks need no ComfyUI; tests/comfyui/test_example_workflows.py runs the workflows in a real one.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = sorted((ROOT / "example_workflows").glob("*.json"))
IMAGES = ROOT / "docs" / "images" / "workflows"
# Core ComfyUI node types the examples may use; anything else must be one of ours (NPOSuite_*).
CORE_TYPES = {
    "CheckpointLoaderSimple", "CLIPTextEncode", "EmptyLatentImage", "KSampler", "VAEDecode", "SaveImage",
    "PreviewImage", "LoraLoaderModelOnly", "LoraLoader", "RandomNoise", "KSamplerSelect", "BasicScheduler",
    "SamplerCustomAdvanced", "PreviewAny", "CFGGuider", "ImageBatch", "TripleCLIPLoader", "EmptySD3LatentImage",
}
NOTE_TYPES = {"Note", "MarkdownNote"}  # frontend-only: not sent to the server
TEST_CKPT = "npo_random_sd15_v1.safetensors"
MAX_THUMB_BYTES, MAX_README_IMAGE_BYTES = 150_000, 400_000


def _our_node_ids() -> set[str]:
    ids = set()
    for f in (ROOT / "nodes").glob("*.py"):
        ids.update(re.findall(r'node_id="(NPOSuite_\w+)"', f.read_text()))
    return ids


def _jpeg_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a baseline/progressive JPEG's SOF marker (no Pillow needed)."""
    assert data[:3] == b"\xff\xd8\xff", "not a JPEG"
    i = 2
    while i < len(data) - 9:
        if data[i] != 0xFF:
            i += 1
            continue
        marker, length = data[i + 1], int.from_bytes(data[i + 2:i + 4], "big")
        if marker in (0xC0, 0xC1, 0xC2):
            return int.from_bytes(data[i + 7:i + 9], "big"), int.from_bytes(data[i + 5:i + 7], "big")
        i += 2 + length
    raise AssertionError("JPEG without a SOF marker")


def test_there_are_example_workflows():
    names = {f.stem for f in WORKFLOWS}
    assert {"npo_apply_ksampler", "npo_guider", "self_npo_guider", "npo_dual_model", "snpo_guider",
            "extract_offset", "train_npo_lora"} <= names


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_is_a_consistent_ui_graph(path):
    wf = json.loads(path.read_text())
    assert isinstance(wf.get("nodes"), list) and isinstance(wf.get("links"), list), \
        f"{path.name}: not a UI workflow (no nodes/links lists; API-format prompts do not open in the templates browser)"
    assert wf.get("version") == 0.4, f"{path.name}: version {wf.get('version')!r}"
    nodes = {n["id"]: n for n in wf["nodes"]}
    assert len(nodes) == len(wf["nodes"]), f"{path.name}: duplicate node ids"
    links = {l[0]: l for l in wf["links"]}
    assert len(links) == len(wf["links"]), f"{path.name}: duplicate link ids"
    assert wf["last_node_id"] >= max(nodes), f"{path.name}: last_node_id below a node id"
    assert wf["last_link_id"] >= max(links, default=0), f"{path.name}: last_link_id below a link id"
    for lid, (_, src, src_slot, dst, dst_slot, ltype) in links.items():
        assert src in nodes and dst in nodes, f"{path.name}: link {lid} joins missing nodes {src} -> {dst}"
        out = nodes[src]["outputs"][src_slot]
        inp = nodes[dst]["inputs"][dst_slot]
        assert lid in (out.get("links") or []), f"{path.name}: output {src}.{out['name']} does not list link {lid}"
        assert inp.get("link") == lid, f"{path.name}: input {dst}.{inp['name']} does not hold link {lid}"
        assert inp["type"] in (out["type"], "*"), \
            f"{path.name}: link {lid} joins {src}.{out['name']} ({out['type']}) to {dst}.{inp['name']} ({inp['type']})"
        assert ltype in (out["type"], inp["type"]), f"{path.name}: link {lid} has type {ltype}"
    for n in wf["nodes"]:
        for inp in n.get("inputs") or []:
            assert inp.get("link") is None or inp["link"] in links, \
                f"{path.name}: node {n['id']} input {inp['name']} names missing link {inp['link']}"
        for out in n.get("outputs") or []:
            for lid in out.get("links") or []:
                assert lid in links and links[lid][1] == n["id"], \
                    f"{path.name}: node {n['id']} output {out['name']} lists link {lid} that does not start there"
        assert n.get("mode", 0) == 0, f"{path.name}: node {n['id']} is muted or bypassed"
        assert len(n.get("pos", [])) == 2 and len(n.get("size", [])) == 2, f"{path.name}: node {n['id']} not placed"


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_uses_our_nodes_and_core_ones(path):
    wf = json.loads(path.read_text())
    ours = _our_node_ids()
    types = [n["type"] for n in wf["nodes"]]
    for t in types:
        if t.startswith("NPOSuite_"):
            assert t in ours, f"{path.name}: {t} is not a node of this package (nodes/*.py define {sorted(ours)})"
        else:
            assert t in CORE_TYPES | NOTE_TYPES, f"{path.name}: node type {t} is not in the allow-list"
    assert any(t.startswith("NPOSuite_") for t in types), f"{path.name}: uses none of our nodes"
    assert sum(t in NOTE_TYPES for t in types) >= 1, f"{path.name}: no note explaining the workflow"
    for n in wf["nodes"]:
        if n["type"] == "CheckpointLoaderSimple":
            assert TEST_CKPT not in n["widgets_values"], f"{path.name}: the random test checkpoint leaked in"
            assert n["widgets_values"][0].endswith(".safetensors")


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_has_thumbnail_and_readme_image(path):
    thumb = path.with_suffix(".jpg")  # the frontend asks for <name>.jpg beside the JSON
    assert thumb.is_file(), f"{path.name}: no thumbnail {thumb.name} (run tests/comfyui/render_workflows.py)"
    data = thumb.read_bytes()
    assert len(data) <= MAX_THUMB_BYTES, f"{thumb.name}: {len(data)} bytes"
    assert _jpeg_size(data) == (512, 512), f"{thumb.name}: {_jpeg_size(data)}"
    image = IMAGES / f"{path.stem}.jpg"
    assert image.is_file(), f"no README image {image.relative_to(ROOT)}"
    data = image.read_bytes()
    assert len(data) <= MAX_README_IMAGE_BYTES, f"{image.name}: {len(data)} bytes"
    w, h = _jpeg_size(data)
    assert 400 <= w <= 1800 and h >= 200, f"{image.name}: {w}x{h}"


def test_no_stray_files_in_example_workflows():
    """ComfyUI serves the folder as static files: only workflows and their thumbnails belong there."""
    stems = {f.stem for f in WORKFLOWS}
    for f in (ROOT / "example_workflows").iterdir():
        assert f.suffix in (".json", ".jpg") and f.stem in stems, f"unexpected file example_workflows/{f.name}"


def test_readme_shows_every_workflow():
    readme = (ROOT / "README.md").read_text()
    for f in WORKFLOWS:
        assert f"example_workflows/{f.name}" in readme, f"README.md does not link example_workflows/{f.name}"
        assert f"docs/images/workflows/{f.stem}.jpg" in readme, \
            f"README.md does not show docs/images/workflows/{f.stem}.jpg"


CONTROL_VALUES = ("fixed", "increment", "decrement", "randomize")  # the frontend's value after a `seed` widget


def _training_widget_values(node) -> dict:
    """name -> stored value of a Train Preference LoRA node (UI workflows store values by position)."""
    from npo_suite.nodes.comfy.session import NODE_WIDGETS

    values, out = list(node["widgets_values"]), {}
    for name in NODE_WIDGETS:
        assert values, f"node {node['id']}: no stored value for widget {name}"
        out[name] = values.pop(0)
        if name == "seed":
            assert values.pop(0) in CONTROL_VALUES
    assert not values, f"node {node['id']}: {len(values)} values more than the node has widgets"
    return out


@pytest.mark.parametrize("path", [p for p in WORKFLOWS if "NPOSuite_TrainPreferenceLoRA" in p.read_text()],
                         ids=lambda p: p.stem)
def test_training_workflow_matches_the_node_widgets(path):
    """Issue 13: the node's widgets are TrainConfig fields (nodes/comfy/session.py NODE_WIDGETS, generated
    from the fields): the example's widget inputs carry those names and every stored value fits."""
    from npo_suite.nodes.comfy.session import NODE_ONLY, NODE_WIDGETS, config_widgets

    widgets = config_widgets()
    for node in (n for n in json.loads(path.read_text())["nodes"] if n["type"] == "NPOSuite_TrainPreferenceLoRA"):
        named = [i["widget"]["name"] for i in node["inputs"] if i.get("widget")]
        assert named == list(NODE_WIDGETS), f"{path.name}: widget inputs {named}"
        for name, v in _training_widget_values(node).items():
            if name in NODE_ONLY:
                continue
            w = widgets[name]
            if w.kind == "combo":
                assert v in w.options, f"{path.name}: {name}={v!r} not in {w.options}"
            elif w.kind in ("int", "float"):
                assert isinstance(v, (int, float)) and not isinstance(v, bool), f"{path.name}: {name}={v!r}"
                assert (w.min is None or v >= w.min) and (w.max is None or v <= w.max), f"{path.name}: {name}={v}"
            else:
                assert isinstance(v, bool if w.kind == "bool" else str), f"{path.name}: {name}={v!r}"
