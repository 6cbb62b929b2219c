from __future__ import annotations

import pytest

from qan_ray.config import TASK_PRESETS, from_dict


def test_from_dict_preset_fills_fields_and_explicit_values_win():
    cfg = from_dict({"task": "digits-mlp", "lr": 0.1})
    assert (cfg.dataset, cfg.model, cfg.lr) == ("digits", "mlp", 0.1)
    assert cfg.num_actions == 5
    assert from_dict(task="digits-mlp", action_mode="minibatch").num_actions == 10
    assert from_dict(restart_lr=0.05).num_actions == 6


@pytest.mark.parametrize("values, fragment", [
    ({"task": "digitz"}, "`task` is 'digitz'"),
    ({"model": "resnet"}, "`model` is 'resnet'"),
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
