from __future__ import annotations

import numpy as np
import pytest
import torch
from controllers import fixed_action_controller

from policies.qnet import load_controller
from qan_ray.contract import ObservationSpec, Observer
from qan_ray.env import TargetTrainingEnv
from qan_ray.models import MLP, LeNet


def test_builtin_controller_loads_and_acts_on_its_task():
    ctrl = load_controller("builtin", expect=ObservationSpec())
    env = TargetTrainingEnv({"task": ctrl.spec.task["task"]})
    assert ctrl.obs_size == env.observation_space.shape[0] == ObservationSpec().size
    assert ctrl.spec.action.labels == ["x0.5", "x0.9", "keep", "x1.1", "x2"]
    obs, _ = env.reset(seed=0)
    q = ctrl.q_values(obs)
    assert q.shape == (5,) and np.isfinite(q).all()


@pytest.mark.parametrize("model", [MLP(64, (64, 64, 64, 64, 64)), LeNet()],
                         ids=["mlp-6", "lenet"])
def test_builtin_controller_accepts_other_architectures(model):
    ctrl = load_controller("builtin")
    obs = Observer(ctrl.spec.observation, 0.05).observe(
        model, lr=0.05, train_loss=2.0, val_loss=2.0, val_accuracy=0.2, progress=0.2)
    assert 0 <= ctrl.act(obs) < ctrl.num_actions and np.isfinite(ctrl.q_values(obs)).all()


def test_act_is_the_nan_safe_argmax_of_the_q_values():
    ctrl = fixed_action_controller()
    with torch.no_grad():
        ctrl.net[-1].bias.copy_(torch.tensor([0.0, 3.0, 1.0, float("nan"), 2.0]))
    assert ctrl.act(np.zeros(ctrl.obs_size, np.float32)) == 1


def test_controller_rejects_an_observation_of_the_wrong_size():
    with pytest.raises(ValueError, match=f"observation has 10 features but this controller "
                                         f"expects {ObservationSpec().size}"):
        load_controller("builtin").q_values(np.zeros(10, np.float32))
