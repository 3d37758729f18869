"""Preference-data nodes (V3): Score Images and Collect Preference Pairs.

Thin shells over `evaluation/collect.py` and `evaluation/scorers.py` (no ComfyUI there). Scorer
weights live in ComfyUI's `models/npo_rewards` folder (registered here; nothing is downloaded);
datasets are written into the `npo_datasets` folder that `Preference Dataset` lists. The hand-
picking widget (web/npo_pairs.js) shows the batch's thumbnails after a run and writes the
clicked pair into the `picks` widget as "chosen>rejected"; queueing again appends that pair.
"""
from __future__ import annotations

import os

import folder_paths
from comfy_api.latest import io, ui

from ..core import paths
from ..evaluation import collect
from ..evaluation.pairing import PAIR_RULES
from ..evaluation.scorers import available_scorers
from .training import dataset_roots

CATEGORY = "training/npo"
REWARDS_FOLDER = "npo_rewards"
NONE = "none"
BY_SCORE, BY_HAND = "by score", "by hand"
Scores = io.Custom("NPO_SCORES")
_CACHE: dict = {}


def register_folder() -> None:
    """Register `npo_rewards` (idempotent): <ComfyUI>/models/npo_rewards unless extra_model_paths.yaml says otherwise."""
    if REWARDS_FOLDER not in folder_paths.folder_names_and_paths:
        folder_paths.folder_names_and_paths[REWARDS_FOLDER] = (
            [os.path.join(folder_paths.models_dir, REWARDS_FOLDER)], set())


def reward_roots() -> list[str]:
    register_folder()
    return folder_paths.get_folder_paths(REWARDS_FOLDER)


def reward_choices() -> list[str]:
    """Top-level entries (model folders and weight files) of the npo_rewards folder(s)."""
    out = set()
    for r in reward_roots():
        if os.path.isdir(r):
            out.update(e.name for e in os.scandir(r) if not e.name.startswith("."))
    return [NONE, *sorted(out)]


def _reward_path(name: str) -> str | None:
    if name == NONE:
        return None
    for r in reward_roots():
        p = paths.inside(r, name, "scorer weights")
        if p.exists():
            return str(p)
    raise FileNotFoundError(f"scorer weights {name!r}: not in the {REWARDS_FOLDER} folder(s) {reward_roots()}")


def _scorer(name: str, weights: str, extra: str):
    key = (name, weights, extra)
    if key not in _CACHE:
        _CACHE.clear()  # one scorer in memory at a time
        w, x = _reward_path(weights), _reward_path(extra)
        _CACHE[key] = collect.make_local_scorer(name, w, x)
    return _CACHE[key]


def _model_hash(model) -> str:
    """core.offsets.model_hash of a ComfyUI MODEL's diffusion network (the same fingerprint the CLI records)."""
    from ..core.offsets import model_hash

    return model_hash(model.model.diffusion_model)


class ScoreImages(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="NPOSuite_ScoreImages", display_name="Score Images", category=CATEGORY,
            description=f"Scores an IMAGE batch for a prompt with a local scorer (weights in models/{REWARDS_FOLDER}; "
                        "nothing is downloaded); outputs the scores and the batch sorted best first.",
            inputs=[io.Image.Input("images"), io.String.Input("prompt", multiline=True, default=""),
                    io.Combo.Input("scorer", options=list(available_scorers()), default="clip_score",
                                   tooltip="; ".join(f"{k}: {v[1]}" for k, v in available_scorers().items())),
                    io.Combo.Input("weights", options=reward_choices(),
                                   tooltip="the scorer's weights: model folder / checkpoint (a plug-in scorer reads its own folder here)"),
                    io.Combo.Input("extra", options=reward_choices(),
                                   tooltip="laion_aesthetic: the head weights; image_reward: med_config.json")],
            outputs=[Scores.Output(display_name="scores"), io.Image.Output(display_name="sorted"),
                     io.String.Output(display_name="report")],
        )

    @classmethod
    def execute(cls, images, prompt, scorer, weights, extra) -> io.NodeOutput:
        scores = collect.score_tensor_batch(_scorer(scorer, weights, extra), images, prompt)
        order = sorted(range(len(scores)), key=lambda i: -scores[i])
        text = collect.scores_report(scorer, scores, order)
        return io.NodeOutput({"scorer": scorer, "scores": scores, "prompt": prompt}, images[order], text,
                             ui={"text": (text,)})


class CollectPreferencePairs(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="NPOSuite_CollectPreferencePairs", display_name="Collect Preference Pairs", category=CATEGORY,
            description="Appends pairs of an IMAGE batch to a named dataset in the datasets folder (Preference Dataset "
                        f"lists it): {BY_SCORE} (from Score Images) or {BY_HAND} (click the preferred, then the "
                        "rejected thumbnail in this node, and queue again).",
            inputs=[io.Image.Input("images"), io.String.Input("dataset", default="my_pairs"),
                    io.String.Input("prompt", multiline=True, default=""),
                    io.String.Input("negative_prompt", multiline=True, default=""),
                    io.Combo.Input("choose", options=[BY_SCORE, BY_HAND], default=BY_HAND),
                    io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF,
                                 tooltip="the sampler's seed (recorded with each pair with the batch index)"),
                    io.Combo.Input("rule", options=list(PAIR_RULES), default="best_worst"),
                    io.Float.Input("margin", default=0.0, min=0.0, max=1e6, step=0.01,
                                   tooltip=f"{BY_SCORE}: pairs whose scores differ by <= this are dropped (counted)"),
                    io.String.Input("picks", default="", tooltip=f"{BY_HAND}: chosen>rejected batch indices (the "
                                    "thumbnail widget writes it), e.g. 2>0"),
                    Scores.Input("scores", optional=True), io.Model.Input("model", optional=True,
                                                                          tooltip="recorded as the model hash")],
            outputs=[io.String.Output(display_name="report")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, images, dataset, prompt, negative_prompt, choose, seed, rule, margin, picks, scores=None,
                model=None) -> io.NodeOutput:
        folder = collect.dataset_dir(dataset_roots()[0], dataset)
        model_hash = _model_hash(model) if model is not None else None
        res = collect.collect_batch(folder, images, prompt=prompt, negative_prompt=negative_prompt, seed=seed,
                                    model_hash=model_hash, by_hand=choose == BY_HAND, picks=picks, scores=scores,
                                    rule=rule, margin=margin)
        return io.NodeOutput(res.report(), ui={"text": (res.report(),),
                                               **ui.PreviewImage(images, cls=cls).as_dict()})


NODES = [ScoreImages, CollectPreferencePairs]
