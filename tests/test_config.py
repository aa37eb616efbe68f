import argparse
import json

import pytest

from instdisc.config import add_train_arguments, load_preset
from instdisc.errors import ConfigError
from instdisc.methods import config_from_dict, method_config, resolve_config


def parse(argv, method="npid"):
    p = argparse.ArgumentParser()
    add_train_arguments(p, method, method_config(method))
    return {k: v for k, v in vars(p.parse_args(argv)).items() if "." in k}


def test_defaults_preset_flags_precedence(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("epochs: 7\nnce-k: 0\nlr: 0.5\naug_scale: [0.3, 0.9]\nmilestones: [3, 5]\n")
    cfg = resolve_config(load_preset(preset), parse(["--lr", "0.1", "--nce-t", "0.2"]), "npid")
    assert cfg.optim.epochs == 7  # preset over default
    assert cfg.optim.lr == 0.1  # flag over preset
    assert cfg.method.nce_k == 0 and cfg.method.nce_t == 0.2
    assert tuple(cfg.aug.scale) == (0.3, 0.9)
    assert cfg.optim.milestones == [3, 5]
    assert cfg.optim.batch_size == 128  # untouched default


def test_round_trip_through_json():
    cfg = resolve_config({"epochs": 3, "width": 16}, parse(["--no-channels-last", "--nce-m", "0.7"]), "npid")
    back = config_from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back.to_dict() == cfg.to_dict()
    assert back.run.channels_last is False and back.method.nce_m == 0.7


def test_unknown_key_suggests_the_closest():
    with pytest.raises(ConfigError, match="Did you mean 'nce_k'"):
        resolve_config({"nce_kk": 5}, {}, "npid")


@pytest.mark.parametrize(
    "preset",
    [{"epochs": "ten"}, {"epochs": 1.5}, {"channels_last": "yes"}, {"schedule": "linear"},
     {"epochs": 0}, {"lr": -1}, {"momentum": 1.0}, {"aug_scale": [0.0, 1.0]}, {"aug_flip_p": 2.0},
     {"milestones": 5}],
)
def test_bad_values_are_config_errors(preset):
    with pytest.raises(ConfigError):
        resolve_config(preset, {}, "npid")


def test_bad_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: [1, 2\n")
    with pytest.raises(ConfigError):
        load_preset(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError):
        load_preset(lst)
    with pytest.raises(ConfigError):
        load_preset(tmp_path / "nope.yaml")


def test_unknown_method():
    with pytest.raises(ConfigError):
        resolve_config({}, {}, "simclr2000")


def test_what_a_resume_may_change_is_read_from_the_fields_metadata(monkeypatch):
    from dataclasses import field, make_dataclass

    from instdisc import config
    from instdisc.errors import UserError
    from instdisc.rundir import resume_config

    stored = resolve_config({"epochs": 4, "milestones": [2], "lr": 0.03, "device": "cpu", "log_every": 5}, {}, "npid")
    flags = parse(["--epochs", "6", "--milestones", "2", "--device", "auto"])  # "change" and "launch" given
    merged = resume_config(resolve_config({}, flags, "npid"), stored, flags)
    assert (merged.optim.epochs, merged.run.device, merged.optim.lr, merged.run.log_every) == (6, "auto", 0.03, 5)
    flags = parse(["--lr", "0.1"])
    with pytest.raises(UserError, match="lr was 0.03"):
        resume_config(resolve_config({}, flags, "npid"), resolve_config({"lr": 0.03}, {}, "npid"), flags)
    # Marking the field is all it takes: the same flag is then taken, not refused.
    cfg, stored = resolve_config({}, flags, "npid"), resolve_config({"lr": 0.03}, {}, "npid")
    marked = make_dataclass("OptimConfig", [("lr", float, field(default=0.03, metadata={"resume": "change"}))])
    monkeypatch.setitem(config.SECTIONS, "optim", marked)
    assert config.resume_rules()["optim.lr"] == "change"
    assert resume_config(cfg, stored, flags).optim.lr == 0.1
