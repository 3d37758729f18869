"""Rewards of the digits world, independent of the generator (fitted on a split it never saw).

Two scores on images x in [0, 1]^64 (8x8 grey, flattened):

- reward(x, c)  = p(c | x) of a multinomial logistic regression fitted on the `reward_train`
                  split (the generator trained on the disjoint `gen` split). correct(x, c) =
                  argmax p(. | x) == c. This plays the role PickScore/HPS play on Pick-a-Pic.
- realism(x)    = -(mean Euclidean distance from x to its k=5 nearest real digits of the
                  `reward_train` split) / d_real, where d_real is the median of the same
                  statistic over the real `reward_test` digits: real digits score about -1,
                  noise or blobs far below. It measures distance to the data manifold
                  (a kNN density proxy), class-blind. It is not trivially hackable: a blank,
                  saturated or high-contrast image is far from every real digit; the only way
                  to score well is to look like some real handwritten digit, and the reference
                  digits are not the ones the generator trained on.

The classifier alone IS hackable (a linear model rewards any pattern along its weight
vectors), hence realism and accuracy are always reported beside it. Weights are stored as
safetensors (no pickle): W [10, 64], b [10], reference [N, 64], scale [].
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

KNN_K = 5


@dataclass
class DigitsReward:
    """The world's reward models (see module docstring)."""

    weight: np.ndarray  # [10, 64]
    bias: np.ndarray  # [10]
    reference: np.ndarray  # [N, 64] real digits in [0, 1] (reward_train split)
    realism_scale: float  # median k-NN distance of real held-out digits
    k: int = KNN_K

    # -- classifier
    def probs(self, px: np.ndarray) -> np.ndarray:
        """Class probabilities [N, 10] of images px [N, 64] in [0, 1]."""
        logits = _as2d(px) @ self.weight.T + self.bias
        logits = logits - logits.max(1, keepdims=True)
        e = np.exp(logits)
        return e / e.sum(1, keepdims=True)

    def reward(self, px: np.ndarray, labels) -> np.ndarray:
        """p(prompted class | image) [N]."""
        p = self.probs(px)
        return p[np.arange(len(p)), np.asarray(labels, dtype=np.int64)]

    def correct(self, px: np.ndarray, labels) -> np.ndarray:
        """argmax == prompted class [N] (bool)."""
        return self.probs(px).argmax(1) == np.asarray(labels, dtype=np.int64)

    def accuracy(self, px: np.ndarray, labels) -> float:
        return float(self.correct(px, labels).mean())

    # -- realism
    def knn_distance(self, px: np.ndarray) -> np.ndarray:
        """Mean distance [N] to the k nearest reference digits."""
        x = torch.from_numpy(_as2d(px).astype(np.float32))
        d = torch.cdist(x, torch.from_numpy(self.reference.astype(np.float32)))  # [N, R]
        return d.topk(self.k, dim=1, largest=False).values.mean(1).numpy()

    def realism(self, px: np.ndarray) -> np.ndarray:
        """-(k-NN distance / realism_scale) [N]: about -1 for real digits, lower is less digit-like."""
        return -self.knn_distance(px) / self.realism_scale

    # -- io
    def save(self, directory: str | Path) -> Path:
        from safetensors.torch import save_file

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        arrays = {"weight": self.weight, "bias": self.bias, "reference": self.reference}
        save_file({k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)) for k, v in arrays.items()},
                  str(d / "reward.safetensors"),
                  metadata={"realism_scale": repr(float(self.realism_scale)), "k": str(self.k)})
        (d / "reward.json").write_text(json.dumps({"classifier": "sklearn LogisticRegression(C=1.0) on reward_train",
                                                   "realism": f"k-NN (k={self.k}) distance to reward_train, / median over reward_test",
                                                   "realism_scale": float(self.realism_scale)}, indent=2) + "\n", encoding="utf-8")
        return d

    @classmethod
    def load(cls, directory: str | Path) -> "DigitsReward":
        from safetensors import safe_open

        f = Path(directory) / "reward.safetensors"
        if not f.is_file():
            raise FileNotFoundError(f"{f}: reward model missing (is {Path(directory).parent} a digits world folder?)")
        with safe_open(str(f), framework="pt") as h:
            meta = h.metadata() or {}
            t = {k: h.get_tensor(k).numpy() for k in h.keys()}
        if "realism_scale" not in meta:
            raise ValueError(f"{f}: metadata 'realism_scale' missing")
        return cls(t["weight"], t["bias"], t["reference"], float(meta["realism_scale"]), int(meta.get("k", KNN_K)))

    @classmethod
    def for_world(cls, world_dir: str | Path) -> "DigitsReward":
        return cls.load(Path(world_dir) / "reward")


def _as2d(px) -> np.ndarray:
    a = np.asarray(px, dtype=np.float64)
    a = a.reshape(len(a), -1)
    if a.shape[1] != 64:
        raise ValueError(f"digits reward expects 8x8 images (64 values), got {a.shape[1]} values per image")
    return a


def fit_reward(train_split, *, seed: int = 0, C: float = 1.0, test_split=None) -> DigitsReward:
    """Fit the classifier and the realism reference on `train_split` (a build.DigitsSplit).

    The realism scale is the median k-NN distance of `test_split` (default: leave-one-out on
    the train split itself, i.e. the k nearest *other* digits).
    """
    from sklearn.linear_model import LogisticRegression

    x, y = train_split.pixels01(), train_split.labels
    clf = LogisticRegression(C=C, max_iter=5000, random_state=seed).fit(x, y)
    rm = DigitsReward(clf.coef_.astype(np.float32), clf.intercept_.astype(np.float32), x.astype(np.float32), 1.0)
    if test_split is not None:
        rm.realism_scale = float(np.median(rm.knn_distance(test_split.pixels01())))
    else:
        d = torch.cdist(torch.from_numpy(x), torch.from_numpy(x))
        d.fill_diagonal_(float("inf"))
        rm.realism_scale = float(d.topk(KNN_K, dim=1, largest=False).values.mean(1).median())
    return rm


def images_to_pixels01(images) -> np.ndarray:
    """PIL images / uint8 arrays / float tensors in [0,1] -> [N, 64] float in [0, 1].

    PIL and uint8 inputs are converted to grey and must be 8x8 (resize for viewing only).
    """
    out = []
    for im in images:
        if hasattr(im, "convert"):
            if im.size != (8, 8):
                raise ValueError(f"digits reward expects 8x8 images, got {im.size[0]}x{im.size[1]}")
            out.append(np.asarray(im.convert("L"), dtype=np.float64) / 255.0)
        else:
            a = np.asarray(im.detach().cpu() if hasattr(im, "detach") else im)
            out.append(a.astype(np.float64) / (255.0 if a.dtype == np.uint8 else 1.0))
    return np.stack([o.reshape(-1) for o in out]) if out else np.zeros((0, 64))
