from __future__ import annotations

import pytest

from qan_ray.config import TASK_PRESETS, from_dict


def test_from_dict_preset_fills_fields_and_explicit_values_win():
    cfg = from_dict({"task": "digits-mlp", "lr": 0.1})
    assert (cfg.dataset, cfg.model, cfg.lr) == ("digits", "mlp", 0.1)
    assert cfg.num_actions == 5
    assert from_dict(task="digits-mlp", action_mode="minibatch").num_actions == 5
    assert from_dict(restart_lr=0.05).num_actions == 6


@pytest.mark.parametrize("values, fragment", [
    ({"task": "digitz"}, "`task` is 'digitz'"),
    ({"model": "vgg"}, "`model` is 'vgg'"),
    ({"action_mode": "momentum"}, "`action_mode` is 'momentum'"),
    ({"reward": "acc"}, "`reward` is 'acc'"),
    ({"control_interval": 0}, "`control_interval` is 0; it must be an integer >= 1"),
    ({"batch_size": -3}, "`batch_size` is -3"),
    ({"epochs_per_episode": 0}, "`epochs_per_episode` is 0"),
    ({"lr_min": 1.0, "lr_max": 0.001, "lr": 0.01}, "the bounds are reversed"),
    ({"dataset": "mnist"}, "Pass --data-root DIR"),
    ({"mm_coef": 1.5}, "`mm_coef` is 1.5"),
    ({"contrl_interval": 5}, "unknown config key(s) ['contrl_interval']"),
])
def test_from_dict_bad_input_names_value_and_fix(values, fragment):
    with pytest.raises(ValueError) as err:
        from_dict(values)
    assert fragment in str(err.value)


def test_reversed_bounds_message_suggests_the_swap():
    with pytest.raises(ValueError, match=r"Swap them: --lr-min 0.001 --lr-max 1.0"):
        from_dict(lr_min=1.0, lr_max=0.001, lr=0.01)


def test_every_preset_validates_with_a_data_root():
    for name in TASK_PRESETS:
        cfg = from_dict(task=name, data_root="/tmp")
        assert cfg.task == name and cfg.num_actions >= 2


def test_task_flag_takes_a_preset_or_module_function_and_its_help_lists_both(monkeypatch):
    import argparse

    from qan_ray.config import add_config_arguments
    from qan_ray.distribution import config_from_args

    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    args = parser.parse_args(["--task", "user_task_example:make_task", "--lr", "0.2"])
    cfg = config_from_args(args)
    assert (cfg.task, cfg.dataset, cfg.model, cfg.lr) == (
        "user_task_example:make_task", "user", "user", 0.2)
    assert config_from_args(parser.parse_args(["--task", "mnist-lenet", "--data-root", "/d"])
                            ).model == "lenet"
    monkeypatch.setenv("COLUMNS", "2000")  # no wrapping inside the hyphenated preset names
    help_text = parser.format_help()
    for name in TASK_PRESETS:
        assert name in help_text
    assert "module:function" in help_text and "PRESET|MODULE:FUNCTION" in help_text
    with pytest.raises(ValueError, match="`task` is 'digitz'; it must be one of"):
        config_from_args(parser.parse_args(["--task", "digitz"]))


def test_validate_checks_the_task_against_dataset_and_model():
    from qan_ray.config import QANConfig

    with pytest.raises(ValueError, match="`task` is 'nope'"):
        QANConfig(task="nope").validate()
    with pytest.raises(ValueError, match="`dataset` is 'digits'; task 'm:f' supplies its own"):
        QANConfig(task="m:f").validate()  # no import: validate only reads the fields
    assert QANConfig(task="m:f", dataset="user", model="user").validate().data_root is None
    with pytest.raises(ValueError, match="`dataset` is 'user'; 'user' is the dataset of a "
                                         "module:function task"):
        QANConfig(dataset="user").validate()


def test_mnist1d_presets_are_embedded_and_need_no_data_root():
    for task, model in (("mnist1d-mlp", "mlp"), ("mnist1d-cnn", "cnn1d")):
        cfg = from_dict(task=task)
        assert (cfg.dataset, cfg.model, cfg.data_root, cfg.lr) == ("mnist1d", model, None, 0.1)
        assert cfg.control_interval == 32 and cfg.epochs_per_episode == 40.0


def test_tasks_and_holdout_flags_are_comma_separated_names():
    import argparse

    from qan_ray.config import add_config_arguments
    from qan_ray.distribution import config_from_args

    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    args = parser.parse_args(["--tasks", "generalist,user_task_example:make_task",
                              "--holdout", "cnn,mnist1d-mlp"])
    cfg = config_from_args(args)
    assert cfg.tasks == ("generalist", "user_task_example:make_task")
    assert cfg.holdout == ("cnn", "mnist1d-mlp")
    assert "--tasks" in parser.format_help() and "--holdout" in parser.format_help()
    assert from_dict(tasks="generalist", holdout="adam").tasks == ("generalist",)  # not letters
    assert from_dict(tasks=["generalist"], holdout=["adam"]).holdout == ("adam",)  # from JSON
    assert from_dict().tasks == () and from_dict().holdout == ()


def test_digits_cnn_preset_and_cnn2d_needs_images():
    cfg = from_dict(task="digits-cnn")
    assert (cfg.dataset, cfg.model, cfg.data_root) == ("digits", "cnn2d", None)
    with pytest.raises(ValueError, match="`model` is 'cnn2d'; the 2-D CNN needs \\(C, H, W\\) "
                                         "images and mnist1d gives 1-D signals"):
        from_dict(task="mnist1d-mlp", model="cnn2d")


def test_every_flag_help_is_the_field_help_text():
    import argparse
    import dataclasses

    from qan_ray.config import QANConfig, add_config_arguments

    fields = dataclasses.fields(QANConfig)
    assert all(f.metadata["help"] and "  " not in f.metadata["help"] for f in fields)
    lr = next(f for f in fields if f.name == "lr")
    assert lr.metadata["help"] == "Initial learning rate of every episode."
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    helps = {a.dest: a.help for a in parser._actions}
    assert helps["lr"] == lr.metadata["help"] and helps["lr_schedule"].startswith("constant: each")
    assert QANConfig.hidden == (64,) and QANConfig().lr == 0.05  # plain defaults


def test_config_imports_nothing_of_the_project():
    # the lowest layer: validation of values only; tasks are loaded by qan_ray.distribution
    import subprocess
    import sys

    code = ("import sys, qan_ray.config as c; c.from_dict(tasks=('generalist',), holdout=("
            "'cnn',)); print(*sorted(m for m in sys.modules if m.startswith('qan_ray')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["qan_ray", "qan_ray.config"]
