"""The hand-picking widget of Collect Preference Pairs in the real ComfyUI frontend: a ComfyUI server
(CPU, random-weight SD1.5 checkpoint), headless Chromium driven by playwright (system chromium, no
browser download). Queue a KSampler batch of 4, click thumbnail 2 (preferred) then 0 (rejected),
queue again: the dataset on disk holds exactly that pair; a third queue adds nothing."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

if not os.environ.get("COMFYUI_PATH"):
    pytest.skip("COMFYUI_PATH is not set (real-ComfyUI tests are opt-in)", allow_module_level=True)
from host_setup import COMFYUI_TESTS_INSTALL  # noqa: E402

CHROMIUM = os.environ.get("NPO_CHROMIUM", "/usr/bin/chromium")
if not Path(CHROMIUM).is_file():
    pytest.skip(f"no chromium at {CHROMIUM} (set NPO_CHROMIUM, or install what the real-ComfyUI tests need: "
                f"{COMFYUI_TESTS_INSTALL})", allow_module_level=True)
try:
    import playwright.sync_api  # noqa: F401  (the `browser` extra: a package of the test harness, not our module)
except ImportError:
    pytest.skip(f"playwright is not installed; install what the real-ComfyUI tests need: {COMFYUI_TESTS_INSTALL}",
                allow_module_level=True)

from render_workflows import DEFAULT_CKPT, RANDOM_CKPT, _free_port, start_comfy  # noqa: E402

DATASET = "browser_pairs"
GRAPH = {
    "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": DEFAULT_CKPT}},
    "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a photo of a cat"}},
    "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "blurry"}},
    "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 4}},
    "5": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0],
                                               "latent_image": ["4", 0], "seed": 5, "steps": 1, "cfg": 6.0, "sampler_name": "euler",
                                               "scheduler": "normal", "denoise": 1.0}},
    "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
    "7": {"class_type": "NPOSuite_CollectPreferencePairs", "inputs": {
        "images": ["6", 0], "dataset": DATASET, "prompt": "a photo of a cat", "negative_prompt": "blurry",
        "choose": "by hand", "seed": 5, "rule": "best_worst", "margin": 0.0, "picks": "", "model": ["1", 0]}},
}

# the frontend adds a seed control ("randomize" by default): fix it, so a re-queue renders the same batch
JS_FIX_SEED = """() => { for (const n of window.app.graph.nodes) for (const w of n.widgets || [])
  if (w.name === 'control_after_generate') w.value = 'fixed'; }"""
JS_QUEUE = "async () => { await window.app.queuePrompt(0, 1); }"
JS_PICKS = "() => window.app.graph.nodes.find(n => n.type === 'NPOSuite_CollectPreferencePairs')" \
           ".widgets.find(w => w.name === 'picks').value"
# the widget's script is registered (served from WEB_DIRECTORY as /extensions/npo_suite/npo_pairs.js)
JS_EXTENSION = "() => (window.app.extensions || []).some(e => e.name === 'npo_suite.collect_pairs')"
# bring the node into view at 100 % zoom: the frontend hides DOM widgets of nodes off screen
JS_FOCUS = """() => { const c = window.app.canvas;
  const n = window.app.graph.nodes.find(n => n.type === 'NPOSuite_CollectPreferencePairs');
  c.ds.scale = 1; if (c.centerOnNode) c.centerOnNode(n); c.setDirty(true, true); }"""
# what the widget holds (for the failure message)
JS_STATE = """() => { const n = window.app.graph.nodes.find(n => n.type === 'NPOSuite_CollectPreferencePairs');
  return { picker: !!n.__npoPairs, images: n.__npoPairs ? n.__npoPairs.images.length : null,
           widgets: (n.widgets || []).map(w => w.name) }; }"""
JS_QUEUE_EMPTY = """async () => { const r = await fetch('/api/queue'); const q = await r.json();
  return q.queue_running.length === 0 && q.queue_pending.length === 0; }"""


def _wait_idle(page, timeout=600):
    deadline = time.time() + timeout
    page.wait_for_timeout(500)
    while time.time() < deadline:
        if page.evaluate(JS_QUEUE_EMPTY):
            return
        page.wait_for_timeout(500)
    raise AssertionError("the queued prompt did not finish")


@pytest.fixture(scope="module")
def server():
    if not RANDOM_CKPT.exists():
        pytest.skip(f"{RANDOM_CKPT} missing: run the other tests/comfyui tests first (conftest builds it)")
    base = Path(tempfile.mkdtemp(prefix="npo_picker_"))
    port = _free_port()
    proc = start_comfy(Path(os.environ["COMFYUI_PATH"]), sys.executable, base, port, RANDOM_CKPT)
    try:
        yield base, port
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(base, ignore_errors=True)


def test_click_two_thumbnails_then_queue_writes_exactly_that_pair(server):
    from playwright.sync_api import sync_playwright

    base, port = server
    pairs = base / "datasets" / DATASET / "pairs.jsonl"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(f"http://127.0.0.1:{port}")
        page.wait_for_function("() => window.app && window.app.graph && window.app.vueAppReady", timeout=120000)
        page.evaluate("(g) => window.app.loadApiJson(g, 'picker.json')", GRAPH)
        page.wait_for_timeout(1000)
        page.wait_for_function(JS_EXTENSION, timeout=30000)
        page.evaluate(JS_FIX_SEED)
        page.evaluate(JS_QUEUE)  # first run: shows the batch, no picks yet
        _wait_idle(page)
        page.evaluate(JS_FOCUS)
        thumbs = page.locator(".npo-pairs-thumb")
        try:
            thumbs.first.wait_for(state="visible", timeout=60000)
        except Exception as e:
            raise AssertionError(f"no thumbnails after the first run: {page.evaluate(JS_STATE)}; page errors {errors}") from e
        assert thumbs.count() == 4
        assert not pairs.exists()
        page.locator('.npo-pairs-thumb[data-index="2"]').click()
        page.locator('.npo-pairs-thumb[data-index="0"]').click()
        assert page.evaluate(JS_PICKS) == "2>0"
        assert page.locator('.npo-pairs-thumb[data-role="chosen"]').get_attribute("data-index") == "2"
        assert page.locator('.npo-pairs-thumb[data-role="rejected"]').get_attribute("data-index") == "0"
        page.evaluate(JS_QUEUE)
        _wait_idle(page)
        page.evaluate(JS_QUEUE)  # re-queued: no duplicate
        _wait_idle(page)
        browser.close()
    assert not [e for e in errors if "npo" in e.lower()], errors
    rows = [json.loads(x) for x in pairs.read_text().splitlines() if x.strip()]
    assert len(rows) == 1
    r = rows[0]
    assert (r["batch_index_chosen"], r["batch_index_rejected"], r["chosen_by"], r["seed_chosen"]) == (2, 0, "user", 5)
    assert (base / "datasets" / DATASET / r["chosen"]).is_file()
