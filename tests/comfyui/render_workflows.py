"""Render the example workflows in the real ComfyUI frontend (a dev tool, not collected by pytest).

For each `example_workflows/<name>.json` it starts nothing new per file: one ComfyUI server runs
(CPU, our package installed as the custom node `npo_suite`, a random-weight checkpoint linked into a
temporary models folder under the user-facing name `v1-5-pruned-emaonly.safetensors`), headless
chromium opens the frontend, and the workflow is

1. loaded: a UI (litegraph) workflow with `app.loadGraphData`, an API-format prompt with the
   frontend's own API loader `app.loadApiJson` (the templates browser cannot open API files:
   `loadGraphData` fails with "nodes is not iterable");
2. laid out left to right by dependency depth (`--keep-layout` keeps the saved positions);
   a Markdown note from `NOTES` is added to an API-format source that has none;
3. saved back as a UI workflow (`app.graph.serialize()`, without the saved view so the frontend
   fits the view on open): `example_workflows/<name>.json`;
4. photographed: the whole graph at 100 % zoom -> `docs/images/workflows/<name>.jpg` (README), and
   a 512x512 close-up of the workflow's main NPO node -> `example_workflows/<name>.jpg`, the
   thumbnail the templates browser shows (it requests `/api/workflow_templates/npo_suite/<name>.jpg`).

Nothing is queued: the images show the graph, not a sample (on random weights it would be noise).
Usage (one heavy process at a time on shared machines):

    flock /tmp/npo_heavy.lock python tests/comfyui/render_workflows.py \
        --comfyui /work/ComfyUI --python /work/comfy_venv/bin/python [--only npo_guider ...]

Needs `pip install playwright` (no `playwright install`: pass a system chromium with `--chromium`)
and Pillow.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
WORKFLOWS = REPO / "example_workflows"
IMAGES = REPO / "docs" / "images" / "workflows"
DEFAULT_CKPT = "v1-5-pruned-emaonly.safetensors"
RANDOM_CKPT = Path(os.environ.get("NPO_COMFY_CACHE", "/tmp/npo_suite_comfy_cache")) / "npo_random_sd15_v1.safetensors"

TITLE_H = 30  # LiteGraph.NODE_TITLE_HEIGHT: the title bar sits above node.pos
GAP_X, GAP_Y, MARGIN = 70, 36, 24
NOTE_TYPES = {"Note", "MarkdownNote"}
# Thumbnail subject: the first node of these types found in the workflow (else the first NPOSuite_ node).
HERO = ("NPOSuite_CollectPreferencePairs", "NPOSuite_TrainPreferenceLoRA", "NPOSuite_NPOGuider", "NPOSuite_ApplyNPO", "NPOSuite_DualModelNPOGuider",
        "NPOSuite_SNPOGuider", "NPOSuite_ExtractOffset")

# Notes added to API-format sources (a UI workflow keeps the note it has).
NOTES = {
    "npo_apply_ksampler": "## NPO with the stock KSampler\n**Apply NPO** patches the MODEL so that, inside KSampler's "
    "one batched CFG forward, the negative (unconditional) rows run θ + β·δ.\n\nPut your NPO offset (a LoRA trained "
    "with `--method npo`) in `models/npo` and pick it in **Load Weight Offset**.",
    "npo_guider": "## NPO guider with a positive and a negative offset\nConditional rows run θ + η, unconditional "
    "rows θ + α·η + β·δ (one batched forward).\n\nη: a regular preference LoRA (e.g. Diffusion-DPO) from "
    "`models/loras`; δ: its NPO counterpart from `models/npo`.",
    "self_npo_guider": "## Self-NPO\nNPO whose δ was trained by truncated diffusion fine-tuning on the model's own "
    "weakened samples (`python -m npo_suite train --method tdft`).\n\nUse α = 0, β = 1 and usually an empty "
    "negative prompt.",
    "npo_dual_model": "## NPO with two models (merged path)\n**NPO Negative Model** materialises θ + β·δ with "
    "ComfyUI weight patches; the **Dual-Model NPO Guider** takes the positive prediction from one model and the "
    "negative from the other. Use it when the negative model is another checkpoint; for an offset of the same "
    "model the branch path (NPO Guider) is cheaper.",
    "snpo_guider": "## Diff-SNPO sampling\nLoad an SNPO LoRA with LoraLoaderModelOnly; the **SNPO Guider** runs CFG "
    "whose unconditional input is the empty prompt ∅, optionally mixed with a negative prompt "
    "((1 − w)·∅ + w·negative).",
    "extract_offset": "## Extract an offset\n`tuned − base` as a rank-r LoRA (truncated SVD per module), saved to "
    "`models/npo/<save_as>.safetensors` in kohya format, ready for **Load Weight Offset**.",
    "npo_negative_clip": "## NPO with the text-encoder part of δ\nAn offset trained with the text encoder also "
    "changes how the negative prompt is encoded. **NPO Negative CLIP** applies the offset's text-encoder part "
    "(β·δ, + α·η) to a copy of the CLIP: encode the NEGATIVE prompt with it and the positive prompt with the plain "
    "CLIP; the NPO Guider applies the UNet part on the negative rows. An offset without a text-encoder part leaves "
    "the CLIP unchanged (see the report).",
    "train_self_npo": "## Self-NPO: train a negative LoRA without data\n**Prompt List** gives the prompts; **Train "
    "Preference LoRA** with method `tdft` (truncated diffusion fine-tuning, `tdft_k` steps) learns δ from the "
    "model's own outputs, writes `models/loras/<output_name>.safetensors` and shows the loss curve and a "
    "validation grid every `validate_every` steps. Use the LoRA as δ in the NPO Guider (α = 0, β = 1).",
    "train_npo_lora": "## Train an NPO LoRA, then sample with it\n**Preference Dataset** reads preference "
    "pairs (JSONL, chosen/ + rejected/ folders, or Pick-a-Pic parquet) from ComfyUI's `datasets` folder, or takes "
    "two IMAGE batches and a prompt; **Train Preference LoRA** writes `models/loras/<output_name>.safetensors` "
    "(kohya, loads with the stock LoraLoader) and returns the offset, which the NPO Guider uses at once. See docs/comfyui_training.md.",
    "npo_strength_grid": "## Choosing the strength β\nOne seed, four samples side by side (Save Image shows the batch "
    "as a grid): plain CFG, then NPO with the same negative offset at β = 0.25, 0.5 and 1. A negative LoRA that "
    "helps at β = 0.5 can break samples at β = 1 on another model: take the strongest β that still looks right. "
    "With scores instead of eyes: `python -m npo_suite evaluate sweep` (docs/pairs.md).",
    "collect_pairs_by_hand": "## Pick pairs by hand, train, guide\nQueue once: **Collect Preference Pairs** shows the "
    "batch of 4. Click the preferred image (green), then the rejected one (red), queue again: the pair is appended "
    "to `datasets/my_pairs` (re-queueing adds nothing). KSampler's seed stays *fixed*: the second queue must "
    "render the same batch. Repeat with other prompts and seeds. Later, **Preference "
    "Dataset** `my_pairs` → **Train Preference LoRA** (npo) → **NPO Guider**. By score instead: put **Score Images** "
    "(weights in `models/npo_rewards`) before it and set `choose` to *by score*. See docs/pairs.md.",
    "npo_sd35": "## NPO on SD3.5 (a flow-matching DiT)\nThe same chain as for SD: **Apply NPO** puts θ + β·δ on the "
    "negative (unconditional) rows of KSampler's one batched CFG forward; the combine is CFG on velocities. δ: an "
    "SD3/SD3.5 LoRA in `models/npo` (ours: `python -m npo_suite train --method npo` on an SD3.5 diffusers folder; "
    "diffusers/PEFT, kohya and ComfyUI key names are mapped with ComfyUI's own key map, the report names what "
    "was covered). SD3.5 Medium: cfg 4–5, ~28 steps, 1024 px. Flux dev is guidance-distilled: use cfg > 1 "
    "(real CFG) with its FluxGuidance lowered, see docs/comfyui.md.",
}


def column_layout(sizes: dict, edges: list[tuple], origin=(0.0, 0.0)) -> dict:
    """Positions {id: [x, y]} for a left-to-right layout by dependency depth.

    sizes: {id: (w, h)} (body size, without the title bar); edges: [(from_id, to_id)].
    A node's column is its longest-path depth from the sources; a source that feeds only later
    columns moves right next to its first consumer. Within a column nodes are ordered by the mean
    row of their producers (sources: of their consumers) to keep links short.
    """
    preds = {n: [] for n in sizes}
    succs = {n: [] for n in sizes}
    for a, b in edges:
        if a in sizes and b in sizes and a != b:
            preds[b].append(a)
            succs[a].append(b)
    col, pending = {}, {n: len(set(preds[n])) for n in sizes}
    ready = sorted((n for n, k in pending.items() if k == 0), key=str)
    order = []
    while ready:
        n = ready.pop(0)
        order.append(n)
        col[n] = max((col[p] + 1 for p in preds[n]), default=0)
        for s in sorted(set(succs[n]), key=str):
            pending[s] -= 1
            if pending[s] == 0:
                ready.append(s)
    if len(order) != len(sizes):
        raise ValueError("workflow graph has a cycle; cannot lay it out")
    for n in reversed(order):
        if not preds[n] and succs[n]:
            col[n] = min(col[s] for s in succs[n]) - 1
    ncol = max(col.values(), default=-1) + 1
    columns = [[n for n in order if col[n] == c] for c in range(ncol)]
    rank = {n: i for c in columns for i, n in enumerate(c)}
    for _ in range(3):  # barycentre sweeps: producers first, then consumers for the sources
        for c in columns:
            def key(n):
                nb = preds[n] or succs[n]
                return sum(rank[m] for m in nb) / len(nb) if nb else rank[n]
            c.sort(key=key)
            for i, n in enumerate(c):
                rank[n] = i
    pos, x = {}, origin[0]
    for c in columns:
        y = origin[1]
        for n in c:
            pos[n] = [round(x), round(y + TITLE_H)]
            y += TITLE_H + sizes[n][1] + GAP_Y
        x += max(sizes[n][0] for n in c) + GAP_X
    return pos


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_comfy(comfyui: Path, python: str, base: Path, port: int, ckpt: Path) -> subprocess.Popen:
    """ComfyUI on CPU with `base` as its base directory (models, custom_nodes, user, output...)."""
    for sub in ("custom_nodes", "models/checkpoints", "models/loras", "models/npo", "user/default", "input"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    (base / "custom_nodes" / "npo_suite").symlink_to(REPO, target_is_directory=True)
    if ckpt.exists():
        (base / "models" / "checkpoints" / DEFAULT_CKPT).symlink_to(ckpt)
    settings = {"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False, "Comfy.Graph.CanvasInfo": False,
                "Comfy.NodeBadge.NodeSourceBadgeMode": "None", "Comfy.NodeBadge.NodeIdBadgeMode": "None"}
    (base / "user" / "default" / "comfy.settings.json").write_text(json.dumps(settings))
    log = open(base / "server.log", "w")
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.Popen([python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
                             "--disable-auto-launch", "--base-directory", str(base)],
                            cwd=comfyui, stdout=log, stderr=subprocess.STDOUT, env=env)
    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ComfyUI exited with {proc.returncode}; see {base / 'server.log'}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/workflow_templates", timeout=2) as r:
                templates = json.load(r)
            if "npo_suite" not in templates:
                raise RuntimeError(f"ComfyUI lists no npo_suite templates: {templates}")
            return proc
        except OSError:
            time.sleep(1)
    proc.kill()
    raise RuntimeError(f"ComfyUI did not answer on port {port} within 180 s; see {base / 'server.log'}")


JS_LOAD = """async ([data, name]) => {
  const app = window.app;
  if (Array.isArray(data.nodes)) await app.loadGraphData(data, true, false, name);
  else app.loadApiJson(data, name + '.json');
  return app.graph.nodes.length;
}"""

JS_NODES = """() => window.app.graph.nodes.map(n => ({
  id: n.id, type: n.type, w: n.size[0], h: n.size[1], x: n.pos[0], y: n.pos[1],
  from: (n.inputs || []).filter(i => i.link != null).map(i => window.app.graph.links[i.link]?.origin_id)
}))"""

JS_ADD_NOTE = """([text, width]) => {
  const n = LiteGraph.createNode('MarkdownNote');
  n.widgets[0].value = text;
  n.size = [width, 170];
  window.app.graph.add(n);
  return n.id;
}"""

JS_PLACE = """(pos) => {
  const g = window.app.graph;
  for (const [id, p] of Object.entries(pos)) g.getNodeById(isNaN(+id) ? id : +id).pos = p;
  g.setDirtyCanvas(true, true);
}"""

JS_VIEW = """([left, top, scale]) => {
  const c = window.app.canvas, g = window.app.graph;
  let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
  for (const n of g.nodes) {
    x0 = Math.min(x0, n.pos[0]); y0 = Math.min(y0, n.pos[1] - %d);
    x1 = Math.max(x1, n.pos[0] + n.size[0]); y1 = Math.max(y1, n.pos[1] + n.size[1]);
  }
  c.deselectAll?.();
  const r = c.canvas.getBoundingClientRect();  // ds maps graph -> canvas coordinates, not page ones
  c.ds.scale = scale;
  c.ds.offset = [(left - r.x) / scale - x0, (top - r.y) / scale - y0];
  c.setDirty(true, true);
  return [x0, y0, x1 - x0, y1 - y0];
}""" % TITLE_H

# JSON.stringify in the page drops `undefined` fields (returned as-is they would arrive as nulls)
JS_SERIALIZE = """() => JSON.stringify(window.app.graph.serialize())"""


def render(page, name: str, data: dict, keep_layout: bool, scale: float = 1.0) -> tuple[dict, bytes, list]:
    """Load, lay out and photograph one workflow; returns (UI workflow, PNG bytes, hero box in the PNG)."""
    page.set_viewport_size({"width": 1600, "height": 1000})
    n = page.evaluate(JS_LOAD, [data, name])
    if not n:
        raise RuntimeError(f"{name}: the frontend loaded no nodes")
    nodes = page.evaluate(JS_NODES)
    is_api = not isinstance(data.get("nodes"), list)
    if is_api and name in NOTES and not any(nd["type"] in NOTE_TYPES for nd in nodes):
        page.evaluate(JS_ADD_NOTE, [NOTES[name], 560])
        nodes = page.evaluate(JS_NODES)
    if not keep_layout:
        notes = [nd for nd in nodes if nd["type"] in NOTE_TYPES]
        graph = [nd for nd in nodes if nd["type"] not in NOTE_TYPES]
        top = 0.0
        pos = {}
        for nd in notes:  # notes stacked above the graph, at its left edge
            pos[nd["id"]] = [0, round(top + TITLE_H)]
            top += TITLE_H + nd["h"] + GAP_Y
        edges = [(a, nd["id"]) for nd in graph for a in nd["from"]]
        pos.update(column_layout({nd["id"]: (nd["w"], nd["h"]) for nd in graph}, edges, origin=(0.0, top)))
        page.evaluate(JS_PLACE, {str(k): v for k, v in pos.items()})
        nodes = page.evaluate(JS_NODES)
    left, top_px = 64 + MARGIN, 80 + MARGIN  # clear of the side bar and the top menu
    page.wait_for_timeout(200)
    x0, y0, w, h = page.evaluate(JS_VIEW, [left, top_px, scale])
    width, height = int(w * scale) + 2 * MARGIN, int(h * scale) + 2 * MARGIN
    page.set_viewport_size({"width": max(800, left + width + MARGIN), "height": max(600, top_px + height + 120)})
    page.wait_for_timeout(300)
    page.evaluate(JS_VIEW, [left, top_px, scale])
    page.wait_for_timeout(700)  # DOM widgets (prompt text areas, notes) follow the canvas on the next frames
    png = page.screenshot(clip={"x": left - MARGIN, "y": top_px - MARGIN, "width": width, "height": height})
    hero = next((nd for t in HERO for nd in nodes if nd["type"] == t), None) or \
        next((nd for nd in nodes if nd["type"].startswith("NPOSuite_")), nodes[0])
    box = [(hero["x"] - x0) * scale + MARGIN, (hero["y"] - TITLE_H - y0) * scale + MARGIN,
           hero["w"] * scale, (hero["h"] + TITLE_H) * scale]
    ui = json.loads(page.evaluate(JS_SERIALIZE))
    ui["id"] = str(uuid.uuid5(uuid.NAMESPACE_URL, f"npo_suite/example_workflows/{name}"))  # stable, distinct
    ui.get("extra", {}).pop("ds", None)  # no saved view: the frontend fits the graph on open
    return ui, png, box


def save_images(png: bytes, box: list, readme_path: Path, thumb_path: Path, max_width: int = 1800) -> None:
    """README image (whole graph, JPEG) and a 512x512 JPEG thumbnail centred on `box`."""
    from PIL import Image

    img = Image.open(io.BytesIO(png)).convert("RGB")
    full = img if img.width <= max_width else img.resize((max_width, round(img.height * max_width / img.width)),
                                                         Image.LANCZOS)
    _atomic_bytes(readme_path, _jpeg(full, 82))
    side = min(max(520, int(max(box[2], box[3]) + 2 * MARGIN)), img.width, img.height)
    cx, cy = box[0] + box[2] / 2, box[1] + box[3] / 2
    x0 = int(min(max(cx - side / 2, 0), img.width - side))
    y0 = int(min(max(cy - side / 2, 0), img.height - side))
    thumb = img.crop((x0, y0, x0 + side, y0 + side)).resize((512, 512), Image.LANCZOS)
    _atomic_bytes(thumb_path, _jpeg(thumb, 85))


def _jpeg(img, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality, optimize=True, progressive=True)
    return buf.getvalue()


def _atomic_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--comfyui", type=Path, default=Path(os.environ.get("COMFYUI_PATH", "/work/ComfyUI")))
    ap.add_argument("--python", default="/work/comfy_venv/bin/python", help="a Python with ComfyUI's requirements")
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    ap.add_argument("--ckpt", type=Path, default=RANDOM_CKPT,
                    help=f"checkpoint linked as {DEFAULT_CKPT} (only to fill the loader's list; nothing is run)")
    ap.add_argument("--only", nargs="*", default=None, help="workflow names (default: all)")
    ap.add_argument("--keep-layout", action="store_true", help="keep the saved node positions")
    ap.add_argument("--scale", type=float, default=1.0, help="canvas zoom of the README image")
    args = ap.parse_args(argv)
    from playwright.sync_api import sync_playwright

    files = sorted(WORKFLOWS.glob("*.json"))
    if args.only:
        files = [f for f in files if f.stem in set(args.only)]
    if not files:
        print("no workflows selected", file=sys.stderr)
        return 2
    base = Path(tempfile.mkdtemp(prefix="npo_render_"))
    port = _free_port()
    proc = start_comfy(args.comfyui, args.python, base, port, args.ckpt)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=args.chromium, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1600, "height": 1000}, device_scale_factor=1)
            page.goto(f"http://127.0.0.1:{port}")
            page.wait_for_function("() => window.app && window.app.graph && window.app.vueAppReady", timeout=120000)
            page.wait_for_timeout(1500)
            errors = []  # from here on: errors while loading / laying out our workflows
            page.on("pageerror", lambda e: errors.append(str(e)))
            for f in files:
                data = json.loads(f.read_text())
                ui, png, box = render(page, f.stem, data, args.keep_layout, args.scale)
                _atomic_bytes(f, (json.dumps(ui, indent=2, ensure_ascii=False) + "\n").encode())
                save_images(png, box, IMAGES / f"{f.stem}.jpg", f.with_suffix(".jpg"))
                print(f"{f.stem}: {len(ui['nodes'])} nodes, {len(ui['links'])} links -> {f.name}, "
                      f"{f.stem}.jpg, docs/images/workflows/{f.stem}.jpg")
            browser.close()
            if errors:
                print("page errors:\n  " + "\n  ".join(errors), file=sys.stderr)
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
