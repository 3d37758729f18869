"""The digits world's scorers (registered in `evaluation.scorers.SCORERS` by world/plugin.py):

    world_reward     p(prompted class | image), digits world classifier (world/reward.py)
    world_correct    1.0 if the classifier's argmax is the prompted class, else 0.0
    world_realism    -(k-NN distance to real digits) / scale: about -1 for real digits
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..evaluation.scorers import check_lengths


@dataclass
class WorldScorer:
    """Scores of the digits world's reward models (world/reward.py)."""

    name: str
    reward: object  # world.reward.DigitsReward
    kind: str  # "reward" | "correct" | "realism"

    def score(self, images, prompts):
        from .build import parse_prompt
        from .reward import images_to_pixels01

        check_lengths(images, prompts, self.name)
        px = images_to_pixels01(images)
        if self.kind == "realism":
            return self.reward.realism(px).astype(np.float64)
        labels = []
        for p in prompts:
            label, _ = parse_prompt(p)
            if label is None:
                raise ValueError(f"scorer {self.name!r}: prompt {p!r} names no single digit class")
            labels.append(label)
        if self.kind == "correct":
            return self.reward.correct(px, labels).astype(np.float64)
        return self.reward.reward(px, labels).astype(np.float64)


def world_scorer_factory(kind: str) -> Callable[..., WorldScorer]:
    def make(world: str | None = None, model_path: str | None = None, **_) -> WorldScorer:
        """`world` (the CLI's --world) or `model_path` (a host's weights folder) names the world folder;
        neither: the shipped world."""
        from .build import default_world_dir
        from .reward import DigitsReward

        folder = world or model_path
        d = Path(folder) if folder else default_world_dir()
        return WorldScorer(f"world_{kind}", DigitsReward.for_world(d), kind)
    return make


# name -> (factory(**options), one-line help), as evaluation.scorers.SCORERS holds them
WORLD_SCORERS: dict[str, tuple[Callable[..., WorldScorer], str]] = {
    "world_reward": (world_scorer_factory("reward"), "digits world: p(prompted class | image)"),
    "world_correct": (world_scorer_factory("correct"), "digits world: classifier argmax == prompted class (0/1)"),
    "world_realism": (world_scorer_factory("realism"), "digits world: -(k-NN distance to real digits)/scale"),
}
