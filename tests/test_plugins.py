"""core/plugins.py: the digits world is a plug-in (declared in pyproject, registered by world/plugin.py);
loading is idempotent, and a failing plug-in is reported as a warning naming it, not skipped silently."""
from __future__ import annotations

import warnings

import pytest

from npo_suite.core import plugins


def test_the_world_is_declared_and_registers_its_names():
    assert plugins.declared_plugins()["digits_world"] == "npo_suite.world.plugin:register"
    assert "digits_world" in plugins.load_plugins()
    assert plugins.load_plugins() == plugins.load_plugins()  # idempotent
    from npo_suite.evaluation.scorers import available_scorers
    from npo_suite.trainer.ddspo import rewriter_names

    assert {"world_reward", "world_correct", "world_realism"} <= set(available_scorers())
    assert "world_digits" in rewriter_names()


def test_a_failing_plugin_is_a_warning_naming_it(monkeypatch):
    monkeypatch.setattr(plugins, "_loaded", None)
    monkeypatch.setattr(plugins, "declared_plugins", lambda: {
        "broken": "npo_suite.no_such_module:register", "digits_world": "npo_suite.world.plugin:register"})
    with pytest.warns(RuntimeWarning, match=r"plug-in 'broken' \(npo_suite.no_such_module:register\) failed to load"):
        assert plugins.load_plugins() == ("digits_world",)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert plugins.load_plugins() == ("digits_world",)  # once per process: no second try, no second warning
