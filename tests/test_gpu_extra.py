"""Every optimizer a preset names is provided by the base install or an extra of pyproject.toml
(adamw8bit needs bitsandbytes: the `gpu` extra), and the README says how to install that extra."""
from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml

from npo_suite.trainer.config import OPTIMIZERS

ROOT = Path(__file__).resolve().parent.parent
# the package each optimizer comes from (trainer/loop.py `build_optimizer`); torch is the user's own install
PROVIDER = {"adamw": "torch", "adafactor": "transformers", "adamw8bit": "bitsandbytes"}


def _names(reqs):
    return {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].lower() for r in reqs}


def test_every_preset_optimizer_is_installable():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    base = _names(project["dependencies"]) | {"torch"}
    extras = {k: _names(v) for k, v in project["optional-dependencies"].items()}
    assert set(PROVIDER) == set(OPTIMIZERS)  # a new optimizer needs its provider named here
    assert "torch" not in set().union(*extras.values()), "no extra may install torch"
    presets = sorted((ROOT / "configs").glob("*.yaml"))
    assert len(presets) >= 6
    named = {}
    for p in presets:
        cfg = yaml.safe_load(p.read_text(encoding="utf-8"))
        named.setdefault(cfg.get("optimizer", "adamw"), []).append(p.stem)
    assert "adamw8bit" in named  # the consumer presets name it
    for opt, users in named.items():
        pkg = PROVIDER[opt]
        assert pkg in base or pkg in extras.get("gpu", set()), f"{opt} ({users}): {pkg} is in no install"
    assert "bitsandbytes" in extras["gpu"]
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "npo-suite[gpu]" in readme or "npo_suite[gpu]" in readme or ".[gpu]" in readme
