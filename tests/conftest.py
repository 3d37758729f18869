"""Session fixtures: tiny SD1.x- and SDXL-shaped pipelines with random weights, built once.

They are saved as diffusers folders under pytest's session tmp dir; tests that need a fresh,
mutable model load their own copy from the folder (`load_sd15()`), tests that only read can
share the session object.
"""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def sd15_dir(tmp_path_factory):
    from npo_suite.testing.tiny_models import build_sd15

    d = tmp_path_factory.mktemp("tiny_sd15")
    build_sd15(d, seed=0)
    return d


@pytest.fixture(scope="session")
def sdxl_dir(tmp_path_factory):
    from npo_suite.testing.tiny_models import build_sdxl

    d = tmp_path_factory.mktemp("tiny_sdxl")
    build_sdxl(d, seed=0)
    return d


@pytest.fixture(scope="session")
def sd15(sd15_dir):
    """Shared read-only tiny SD1.x pipeline. Do not mutate (load your own with load_sd15)."""
    return load_sd15(sd15_dir)


@pytest.fixture(scope="session")
def sdxl(sdxl_dir):
    """Shared read-only tiny SDXL pipeline. Do not mutate."""
    return load_sdxl(sdxl_dir)


def load_sd15(path):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(path, safety_checker=None, requires_safety_checker=False)


def load_sdxl(path):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_pretrained(path)
