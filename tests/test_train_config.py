"""trainer/config.py: typed loading from YAML/TOML/presets/--set, checks, and the generated CLI."""
from __future__ import annotations

import argparse

import pytest
import yaml

from npo_suite.trainer.config import CONFIG_DIR, TrainConfig, from_dict, load_config


def test_presets_load_and_match_their_purpose():
    names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    assert {"sd15_8gb", "sdxl_12gb", "datacenter_sd15"} <= set(names)
    for n in names:
        assert isinstance(load_config(preset=n), TrainConfig)
    dc = load_config(preset="datacenter_sd15")
    assert dc.effective_batch == 2048 and dc.beta == 2000.0
    assert load_config(preset="sd15_8gb").gradient_checkpointing
    # the authors' recipes: Self-NPO SD1.5 w = -1 and SDXL w = -5 (train_xl.py), DDSPO SDXL linear weighting
    sd15, sdxl = load_config(preset="tdft_sd15"), load_config(preset="tdft_sdxl")
    assert (sd15.method, sd15.tdft_guidance, sd15.tdft_loss, sd15.tdft_huber_c, sd15.effective_batch) == \
        ("tdft", -1.0, "pseudo_huber", 1e-3, 20)
    assert (sdxl.tdft_guidance, sdxl.tdft_timesteps, sdxl.effective_batch) == (-5.0, "solver_grid", 10)
    dd = load_config(preset="ddspo_sdxl")
    assert (dd.method, dd.ddspo_beta, dd.ddspo_loss_weighting, dd.ddspo_loser) == ("ddspo", 16000.0, "linear", "generated")


def test_yaml_toml_and_set_precedence(tmp_path):
    y = tmp_path / "run.yaml"
    y.write_text("lr: 1e-4\nsteps: 10\nmethod: snpo\nvalidation_seeds: [3, 4]\n")  # YAML 1.1 reads 1e-4 as a string
    cfg = load_config(config=str(y), overrides={"steps": "20"}, sets=["lora_rank=4", "validation_prompts=a, b|c"])
    assert cfg.lr == 1e-4 and isinstance(cfg.lr, float) and cfg.steps == 20 and cfg.method == "snpo"
    assert cfg.lora_rank == 4 and cfg.validation_prompts == ["a, b", "c"] and cfg.validation_seeds == [3, 4]
    t = tmp_path / "run.toml"
    t.write_text('method = "npo"\nbatch_size = 2\ndata_path = ["a.jsonl", "b.jsonl"]\ngradient_checkpointing = true\n')
    cfg = load_config(config=str(t), sets=["gradient_checkpointing=false"])
    assert cfg.method == "npo" and cfg.batch_size == 2 and cfg.data_path == ["a.jsonl", "b.jsonl"]
    assert cfg.gradient_checkpointing is False
    assert from_dict(cfg.to_dict()) == cfg  # the YAML stored in checkpoints round-trips
    import yaml

    assert from_dict(yaml.safe_load(cfg.to_yaml())) == cfg


@pytest.mark.parametrize("bad, match", [
    ({"lrr": 1}, "did you mean 'lr'"),
    ({"lr": "abc"}, "lr: expected float"),
    ({"lr": 0}, "lr must be > 0"),
    ({"optimizer": "sgd"}, "optimizer='sgd'"),
    ({"batch_size": 0}, "batch_size must be >= 1"),
    ({"method": "nope"}, "is not one of"),
    ({"lr_warmup_steps": 5, "steps": 2}, "exceeds steps"),
    ({"resolution": 100}, "multiple of 8"),
    ({"gradient_checkpointing": "maybe"}, "expected true/false"),
])
def test_bad_values_are_clear_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        from_dict(bad)


def test_missing_files():
    with pytest.raises(FileNotFoundError, match="unknown preset 'nope'"):
        load_config(preset="nope")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_config(config="/nonexistent/run.yaml")


def test_cli_is_generated_from_the_dataclass(tmp_path, capsys):
    import dataclasses

    from npo_suite.cli import train as cli

    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    flags = {a.dest for a in parser._actions}
    assert {f.name for f in dataclasses.fields(TrainConfig)} <= flags
    args = parser.parse_args(["--preset", "sd15_8gb", "--lora-rank", "32", "--no-gradient-checkpointing",
                              "--data-path", "x.jsonl", "y.jsonl", "--set", "beta=2500", "--print-config"])
    assert cli.main(args) == 0
    import yaml

    out = yaml.safe_load(capsys.readouterr().out)
    assert out["lora_rank"] == 32 and out["gradient_checkpointing"] is False and out["beta"] == 2500.0
    assert out["data_path"] == ["x.jsonl", "y.jsonl"] and out["optimizer"] == "adamw8bit"


def test_method_names_come_from_the_one_registry(monkeypatch):
    """Issue 13: a method added to METHODS appears in the train CLI's help, the node's method widget
    and the config's check, with no other list to edit."""
    from npo_suite.cli import train as cli
    from npo_suite.trainer.methods import METHODS
    from npo_suite.nodes.comfy.session import config_widget

    monkeypatch.setitem(METHODS, "my_method", METHODS["dpo"])
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    assert "my_method" in " ".join(parser.format_help().split())
    assert config_widget("method").options == tuple(METHODS)
    assert TrainConfig(method="my_method").method == "my_method"
    with pytest.raises(ValueError, match=r"method 'nope' is not one of \['dpo', .*'my_method'\]"):
        TrainConfig(method="nope")


def test_node_widgets_are_generated_from_the_fields():
    """The ComfyUI training node's widgets (nodes/comfy/session.py) carry the fields' defaults and help."""
    import dataclasses

    from npo_suite.trainer.config import OPTIMIZERS
    from npo_suite.nodes.comfy.session import NODE_ONLY, NODE_WIDGETS, config_widgets

    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    widgets = config_widgets()
    assert set(widgets) == set(NODE_WIDGETS) - set(NODE_ONLY) and set(widgets) <= set(fields)
    for name, w in widgets.items():
        assert (w.default, w.tooltip) == (fields[name].default, fields[name].metadata["help"]), name
    assert (widgets["steps"].default, widgets["checkpoint_every"].default) == (1000, 500)
    assert widgets["optimizer"].kind == "combo" and widgets["optimizer"].options == OPTIMIZERS
    assert widgets["lora_targets"].kind == "combo" and "attn" in widgets["lora_targets"].options
    assert (widgets["lora_rank"].kind, widgets["lora_rank"].min, widgets["lora_rank"].max) == ("int", 1, 256)
    assert widgets["gradient_checkpointing"].kind == "bool" and widgets["output_name"].kind == "str"


def test_cli_takes_a_negative_teacher_guidance_and_the_ddspo_choices(capsys):
    """The SDXL Self-NPO recipe (w = -5) and the DDSPO loser/weighting choices from the command line."""
    from npo_suite.cli import train as cli

    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args(["--method", "tdft", "--tdft-guidance", "-5", "--ddspo-loser", "other",
                              "--ddspo-loss-weighting", "linear", "--print-config"])
    assert cli.main(args) == 0
    import yaml

    out = yaml.safe_load(capsys.readouterr().out)
    assert (out["tdft_guidance"], out["ddspo_loser"], out["ddspo_loss_weighting"]) == (-5.0, "other", "linear")
    assert cli.main(parser.parse_args(["--ddspo-loser", "mirror", "--print-config"])) != 0
    assert "ddspo_loser 'mirror' is not one of ['generated', 'other', 'same']" in capsys.readouterr().err


def test_a_presets_warmup_is_capped_at_a_short_runs_steps(capsys):
    """`--preset sd15_8gb --steps 2` was refused: lr_warmup_steps (100) exceeds steps (2). A warm-up that
    comes from the preset is capped at the run's steps with a notice; one the user set stays an error."""
    cfg = load_config(preset="sd15_8gb", overrides={"steps": 2})
    assert cfg.lr_warmup_steps == 2 and cfg.steps == 2
    err = capsys.readouterr().err
    assert "lr_warmup_steps 100 of preset sd15_8gb capped at steps 2" in err
    assert load_config(preset="sd15_8gb").lr_warmup_steps == 100  # a full run keeps the preset's warm-up
    assert capsys.readouterr().err == ""
    for user in ({"overrides": {"steps": 2, "lr_warmup_steps": 100}}, {"overrides": {"steps": 2}, "sets": ["lr_warmup_steps=50"]}):
        with pytest.raises(ValueError, match=r"lr_warmup_steps \(\d+\) exceeds steps \(2\)"):
            load_config(preset="sd15_8gb", **user)


def test_default_output_folder_is_named_by_preset_and_method():
    """`--preset sd15_8gb --method npo` wrote into runs/sd15_dpo/ (the preset's DPO folder)."""
    assert load_config(preset="sd15_8gb", overrides={"method": "npo"}).output_dir == "runs/sd15_8gb_npo"
    assert load_config(preset="sd15_8gb").output_dir == "runs/sd15_8gb_dpo"
    assert load_config(overrides={"method": "tdft"}).output_dir == "runs/tdft"
    assert load_config(preset="sd15_8gb", overrides={"output_dir": "mine"}).output_dir == "mine"
    for p in sorted(CONFIG_DIR.glob("*.yaml")):  # no preset pins a folder that another method would reuse
        assert "output_dir" not in (yaml.safe_load(p.read_text()) or {}), p


def test_beta_flag_with_ddspo_is_refused_naming_ddspo_beta(tmp_path):
    """`--method ddspo --beta 16000` was silently ignored (DDSPO reads ddspo_beta). A β flag given
    for a method whose β lives in another field is refused naming that field and the β·lr rule;
    a config file written by to_yaml (every key, beta included) still loads."""
    for kw in ({"overrides": {"method": "ddspo", "beta": 16000.0}}, {"overrides": {"method": "ddspo"}, "sets": ["beta=8000"]}):
        with pytest.raises(ValueError, match=r"ddspo reads its beta from ddspo_beta .*--ddspo-beta.*lr"):
            load_config(**kw)
    assert load_config(overrides={"method": "ddspo", "ddspo_beta": 8000.0}).ddspo_beta == 8000.0
    run = tmp_path / "run.yaml"
    run.write_text(TrainConfig(method="ddspo").to_yaml())
    assert load_config(config=str(run)).beta == 5000.0
    with pytest.raises(ValueError, match="tdft has no beta"):
        load_config(overrides={"method": "tdft", "beta": 100.0})
