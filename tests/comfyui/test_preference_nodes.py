"""Score Images and Collect Preference Pairs through ComfyUI's own execution: schemas validate, a
tiny local CLIP-style scorer (built here, in the npo_rewards folder) scores a KSampler batch of 4,
auto-collect writes a dataset, Preference Dataset lists and opens it and Train Preference LoRA
trains on it; a hand pick ("2>0") appends exactly that pair and a re-queue adds nothing."""
from __future__ import annotations

import json
import os

import pytest

if not os.environ.get("COMFYUI_PATH"):
    pytest.skip("COMFYUI_PATH is not set (real-ComfyUI tests are opt-in, see docs/comfyui_training.md)",
                allow_module_level=True)

from informative import assert_informative  # noqa: E402

CKPT = "npo_random_sd15_v1.safetensors"


@pytest.fixture(scope="module")
def folders(comfy):
    """Temp `datasets/` and `models/npo_rewards/` (with a tiny random CLIP folder) for the nodes."""
    from npo_suite.testing.tiny_models import build_tiny_clip

    rewards, datasets = comfy.root / "npo_rewards", comfy.root / "datasets"
    rewards.mkdir(exist_ok=True)
    datasets.mkdir(exist_ok=True)
    comfy.folder_paths.folder_names_and_paths["npo_rewards"] = ([str(rewards)], set())
    comfy.folder_paths.folder_names_and_paths["npo_datasets"] = ([str(datasets)], set())
    build_tiny_clip(rewards / "tiny_clip", comfy.root / "tok")
    return {"rewards": rewards, "datasets": datasets}


def _batch_graph(prompt="a photo of a cat"):
    g = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}},
         "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": prompt}},
         "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "blurry"}},
         "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 4}},
         "5": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0],
                                                    "latent_image": ["4", 0], "seed": 11, "steps": 1, "cfg": 6.0,
                                                    "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
         "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}}}
    return g


def _core_batch():
    """Four 64x64 images of two colours from core nodes only (EmptyImage x2 -> ImageBatch): no checkpoint."""
    return {"1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 2, "color": 0x202020}},
            "2": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 2, "color": 0xC08040}},
            "6": {"class_type": "ImageBatch", "inputs": {"image1": ["1", 0], "image2": ["2", 0]}}}


def _collect(choose, dataset, **kw):
    return {"class_type": "NPOSuite_CollectPreferencePairs", "inputs": {
        "images": ["6", 0], "dataset": dataset, "prompt": "a photo of a cat", "negative_prompt": "blurry",
        "choose": choose, "seed": 11, "rule": "best_worst", "margin": 0.0, "picks": "", "model": ["1", 0], **kw}}


def _rows(path):
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def test_schemas_validate_and_nodes_are_registered(comfy):
    from npo_suite.nodes.preferences import NODES

    for cls in NODES:
        node_id = cls.GET_SCHEMA().node_id
        registered = comfy.nodes.NODE_CLASS_MAPPINGS[node_id]  # the class ComfyUI loaded from custom_nodes/
        assert registered.__name__ == cls.__name__
        info = registered.GET_NODE_INFO_V1()
        assert info["category"] == "training/npo" and info["name"] == node_id
    import nodes

    assert "npo_suite" in nodes.EXTENSION_WEB_DIRS or any(d.endswith("web") for d in nodes.EXTENSION_WEB_DIRS.values())


def test_score_and_collect_on_a_core_image_batch(comfy, folders):
    """Light (no checkpoint): Score Images with the tiny local CLIP, auto-collect by score, then a hand pick."""
    from npo_suite.evaluation.collect import make_local_scorer, score_tensor_batch

    g = _core_batch()
    g["7"] = {"class_type": "NPOSuite_ScoreImages", "inputs": {"images": ["6", 0], "prompt": "a photo of a cat",
                                                               "scorer": "pickscore", "weights": "tiny_clip",
                                                               "extra": "none"}}
    c = _collect("by score", "core_ds", scores=["7", 0])
    del c["inputs"]["model"]
    g["8"] = c
    out = comfy.run(g, ["6", "7", "8"])
    images, scores = out["6"][0][0], out["7"][0][0]
    direct = score_tensor_batch(make_local_scorer("pickscore", str(folders["rewards"] / "tiny_clip"), None), images,
                                "a photo of a cat")
    assert images.shape[0] == 4 and scores["scores"] == pytest.approx(direct)
    assert len(set(round(x, 6) for x in direct)) == 2  # two colours, two scores (pickscore: no clamp at 0)
    rows = _rows(folders["datasets"] / "core_ds" / "pairs.jsonl")
    order = sorted(range(4), key=lambda i: (-direct[i], i))  # best_worst: equal scores ordered by index
    best, worst = order[0], order[-1]
    assert [(r["batch_index_chosen"], r["batch_index_rejected"], r["chosen_by"]) for r in rows] == \
        [(best, worst, "scorer:pickscore")]
    assert rows[0]["model_hash"] is None  # no MODEL connected
    comfy.run(g, ["8"])  # re-queued
    assert len(_rows(folders["datasets"] / "core_ds" / "pairs.jsonl")) == 1
    h = _core_batch()
    c = _collect("by hand", "core_hand", picks="3>0")
    del c["inputs"]["model"]
    h["7"] = c
    comfy.run(h, ["7"])
    rows = _rows(folders["datasets"] / "core_hand" / "pairs.jsonl")
    assert [(r["batch_index_chosen"], r["batch_index_rejected"], r["chosen_by"]) for r in rows] == [(3, 0, "user")]
    from npo_suite.nodes.training import PreferenceDataset

    assert {"core_ds", "core_hand"} <= set(PreferenceDataset.GET_SCHEMA().inputs[0].options)


def test_score_then_auto_collect_then_preference_dataset_trains(comfy, folders):
    import numpy as np

    from npo_suite.evaluation.collect import make_local_scorer, score_tensor_batch

    g = _batch_graph()
    g["7"] = {"class_type": "NPOSuite_ScoreImages", "inputs": {"images": ["6", 0], "prompt": "a photo of a cat",
                                                               "scorer": "pickscore", "weights": "tiny_clip",
                                                               "extra": "none"}}
    g["8"] = _collect("by score", "auto_ds", scores=["7", 0])
    out = comfy.run(g, ["6", "7", "8"])
    images, scores = out["6"][0][0], out["7"][0][0]
    assert images.shape[0] == 4 and len(scores["scores"]) == 4
    direct = score_tensor_batch(make_local_scorer("pickscore", str(folders["rewards"] / "tiny_clip"), None), images,
                                "a photo of a cat")
    assert scores["scores"] == pytest.approx(direct)
    order = np.argsort(-np.asarray(direct))
    sorted_batch = out["7"][1][0]
    assert_informative(sorted_batch, images, name="sorted / scored batch")
    assert (sorted_batch - images[order.tolist()]).abs().max() == 0
    rows = _rows(folders["datasets"] / "auto_ds" / "pairs.jsonl")
    assert len(rows) == 1
    r = rows[0]
    assert (r["batch_index_chosen"], r["batch_index_rejected"]) == (int(order[0]), int(order[-1]))
    assert r["chosen_by"] == "scorer:pickscore" and r["seed_chosen"] == 11 and r["negative_prompt"] == "blurry"
    assert r["model_hash"] and len(r["model_hash"]) == 64
    # re-queue: nothing new
    comfy.run(g, ["8"])
    assert len(_rows(folders["datasets"] / "auto_ds" / "pairs.jsonl")) == 1
    # Preference Dataset lists and opens it; Train Preference LoRA trains on it
    from npo_suite.nodes.training import PreferenceDataset

    assert "auto_ds" in PreferenceDataset.GET_SCHEMA().inputs[0].options
    t = {"1": g["1"], "2": {"class_type": "NPOSuite_PreferenceDataset",
                            "inputs": {"dataset": "auto_ds", "prompt": ""}},
         "3": {"class_type": "NPOSuite_TrainPreferenceLoRA", "inputs": {
             "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "dataset": ["2", 0], "method": "npo", "beta": 5000.0,
             "lam": 0.9, "snpo_p": 0.5, "steps": 1, "lr": 1e-3, "lora_rank": 4, "lora_targets": "attn", "batch_size": 1,
             "grad_accum": 1, "resolution": 64, "mixed_precision": "no", "optimizer": "adamw", "gradient_checkpointing": False,
             "seed": 0, "ref_update_every": 0, "ref_bound": 0.005, "ref_on_exceed": "freeze",
             "timestep_sampler": "uniform", "timestep_weight": "none", "output_name": "from_auto_ds", "resume": False,
             "checkpoint_every": 0, "init_lora": "none", "extra": ""}}}
    res = comfy.run(t, ["2", "3"])
    assert "1 pairs" in res["2"][1][0]
    assert "finished at step 1/1" in res["3"][4][0]
    assert (comfy.root / "loras" / "from_auto_ds.safetensors").is_file()


def test_hand_pick_appends_exactly_that_pair(comfy, folders):
    g = _batch_graph()
    g["7"] = _collect("by hand", "hand_ds")
    out = comfy.run(g, ["7"])
    assert "no pair picked yet" in out["7"][0][0]
    assert not (folders["datasets"] / "hand_ds" / "pairs.jsonl").exists()
    g["7"]["inputs"]["picks"] = "2>0"
    comfy.run(g, ["7"])
    comfy.run(g, ["7"])  # re-queued: no duplicate
    rows = _rows(folders["datasets"] / "hand_ds" / "pairs.jsonl")
    assert [(r["batch_index_chosen"], r["batch_index_rejected"], r["chosen_by"]) for r in rows] == [(2, 0, "user")]


def test_dataset_name_outside_the_folder_is_refused(comfy, folders):
    g = _batch_graph()
    g["7"] = _collect("by hand", "../escape", picks="1>0")
    with pytest.raises(AssertionError, match="dataset name"):
        comfy.run(g, ["7"])
    assert not (comfy.root / "escape").exists()
