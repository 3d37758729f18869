"""Collecting pairs from a host's IMAGE batch into a named dataset (evaluation/collect.py, what the
ComfyUI nodes Score Images / Collect Preference Pairs call): names, duplicates, picks, provenance."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from npo_suite.evaluation import collect


def batch(n=4, size=8):
    # image i: constant grey (i + 1) / (n + 1)
    return torch.stack([torch.full((size, size, 3), (i + 1) / (n + 1)) for i in range(n)])


@pytest.mark.parametrize("bad", ["../x", "/abs", "a/b", ".hidden", "", "x;rm", "C:\\x"])
def test_dataset_names_are_validated(tmp_path, bad):
    with pytest.raises(ValueError):
        collect.dataset_dir(tmp_path, bad)


def test_dataset_name_inside_root(tmp_path):
    assert collect.dataset_dir(tmp_path, "my pairs_1") == (tmp_path / "my pairs_1").resolve()


def test_by_hand_appends_exactly_the_picked_pair_and_requeue_does_not_duplicate(tmp_path):
    d = tmp_path / "ds"
    kw = dict(prompt="a cat", negative_prompt="blurry", seed=42, model_hash="abc", by_hand=True)
    res = collect.collect_batch(d, batch(), picks="2>0", **kw)
    assert res.added == 1 and res.duplicates == 0
    again = collect.collect_batch(d, batch(), picks="2>0", **kw)
    assert again.added == 0 and again.duplicates == 1
    rows = [json.loads(x) for x in (d / "pairs.jsonl").read_text().splitlines()]
    assert len(rows) == 1
    r = rows[0]
    assert (r["prompt"], r["negative_prompt"], r["seed_chosen"], r["model_hash"], r["chosen_by"]) == \
        ("a cat", "blurry", 42, "abc", "user")
    assert (r["batch_index_chosen"], r["batch_index_rejected"]) == (2, 0)
    from PIL import Image

    grey = [np.asarray(Image.open(d / r[k])).mean() / 255 for k in ("chosen", "rejected")]
    assert grey == pytest.approx([3 / 5, 1 / 5], abs=1 / 255)


def test_by_hand_without_picks_writes_nothing_and_says_so(tmp_path):
    res = collect.collect_batch(tmp_path / "ds", batch(), prompt="p", negative_prompt="", seed=0, model_hash=None,
                                by_hand=True, picks="")
    assert res.added == 0 and "no pair picked" in res.report()
    assert not (tmp_path / "ds" / "pairs.jsonl").exists()


@pytest.mark.parametrize("picks,msg", [("1>1", "two different"), ("4>0", "two different"), ("a>b", "chosen>rejected"),
                                       ("3", "chosen>rejected"), (" , ", "no picks")])
def test_bad_picks_refused(picks, msg):
    with pytest.raises(ValueError, match=msg):
        collect.parse_picks(picks, 4)


def test_parse_several_picks():
    assert collect.parse_picks("2>0, 3>1\n0>1", 4) == [(2, 0), (3, 1), (0, 1)]


def test_by_score_uses_the_pairing_rule_and_records_the_scorer(tmp_path):
    scores = {"scorer": "clip_score", "scores": [0.1, 0.9, 0.5, 0.52], "prompt": "p"}
    res = collect.collect_batch(tmp_path / "ds", batch(), prompt="p", negative_prompt="", seed=7, model_hash=None,
                                by_hand=False, scores=scores, rule="all", margin=0.05)
    assert res.added == 5 and res.near_ties == 1  # |0.5 - 0.52| <= 0.05
    rows = [json.loads(x) for x in (tmp_path / "ds" / "pairs.jsonl").read_text().splitlines()]
    assert all(r["chosen_by"] == "scorer:clip_score" and r["score_chosen"] > r["score_rejected"] for r in rows)
    with pytest.raises(ValueError, match="connect the scores"):
        collect.collect_batch(tmp_path / "ds", batch(), prompt="p", negative_prompt="", seed=7, model_hash=None,
                              by_hand=False)
    with pytest.raises(ValueError, match="3 scores for 4 images"):
        collect.collect_batch(tmp_path / "ds", batch(), prompt="p", negative_prompt="", seed=7, model_hash=None,
                              by_hand=False, scores={**scores, "scores": [1, 2, 3]})


def test_collected_folder_is_a_dataset_the_trainer_opens(tmp_path):
    from npo_suite.nodes.comfy.datasets import dataset_from_path, list_datasets

    collect.collect_batch(tmp_path / "ds", batch(), prompt="p", negative_prompt="", seed=0, model_hash=None,
                          by_hand=True, picks="3>0,1>2")
    assert "ds" in list_datasets([str(tmp_path)])
    data = dataset_from_path(tmp_path / "ds", "pairs", "ds")
    assert len(data.records) == 2 and data.records[0].prompt == "p"


def test_empty_prompt_refused(tmp_path):
    with pytest.raises(ValueError, match="prompt is empty"):
        collect.collect_batch(tmp_path / "ds", batch(), prompt=" ", negative_prompt="", seed=0, model_hash=None,
                              by_hand=True, picks="1>0")


def test_local_scorer_needs_local_weights(tmp_path):
    with pytest.raises(ValueError, match="nothing is downloaded"):
        collect.make_local_scorer("clip_score", None, None)
    with pytest.raises(FileNotFoundError, match="not found"):
        collect.make_local_scorer("pickscore", str(tmp_path / "missing"), None)
    # a plug-in's scorer reads its own weights folder; the digits world's, none given: the shipped world
    assert collect.make_local_scorer("world_reward", None, None).reward is not None
    with pytest.raises((FileNotFoundError, ValueError)):
        collect.make_local_scorer("world_reward", str(tmp_path / "missing"), None)


def test_score_tensor_batch_scores_what_the_png_stores():
    from npo_suite.world.build import default_world_dir

    s = collect.make_local_scorer("world_reward", str(default_world_dir()), None)
    scores = collect.score_tensor_batch(s, batch(2), "a handwritten seven")
    assert len(scores) == 2 and all(0 <= x <= 1 for x in scores)
    with pytest.raises(ValueError, match="prompt is empty"):
        collect.score_tensor_batch(s, batch(2), "")
