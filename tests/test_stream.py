"""trainer.stream: one batch stream for the CLI trainer and the ComfyUI session (no guessed latent shapes)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from npo_suite.core.cond import Cond
from npo_suite.core.prompts import PromptRecord
from npo_suite.nodes.comfy.datasets import PreferenceData
from npo_suite.nodes.comfy.session import build_stream
from npo_suite.trainer.stream import latent_shape


class PixelSpaceBackend:
    """A backend whose latents are the grey pixels (the digits world): [B, 1, H, W], not SD's [B, 4, H/8, W/8]."""

    family, device = "world", torch.device("cpu")

    def encode_images(self, pixels):
        return pixels.mean(1, keepdim=True)

    def encode_prompts(self, prompts):
        return Cond(torch.stack([torch.full((3, 4), float(len(p))) for p in prompts]))  # [B, 3, 4]


class NoVAEBackend(PixelSpaceBackend):
    def encode_images(self, pixels):
        raise ValueError("no VAE given; connect a VAE to train on images")


CFG = SimpleNamespace(method="tdft", resolution=16, crop="center", random_flip=False, seed=0, batch_size=2)


def _prompts():
    return PreferenceData("prompts", [PromptRecord(f"p{i}", f"prompt {i}") for i in range(3)], "test prompts")


def test_session_stream_takes_the_latent_shape_from_the_backend():
    """Before: a backend without ComfyUI's private `_encode_pixels` got a guessed (4, res/8, res/8)."""
    batch = next(build_stream(_prompts(), CFG, PixelSpaceBackend(), None))
    assert batch.latents is None and batch.latent_shape == (1, 16, 16) == latent_shape(PixelSpaceBackend(), 16)
    assert batch.cond.hidden.shape == (2, 3, 4)


def test_a_backend_that_cannot_encode_is_refused_not_guessed():
    with pytest.raises(ValueError, match="no VAE"):
        build_stream(_prompts(), CFG, NoVAEBackend(), None)
