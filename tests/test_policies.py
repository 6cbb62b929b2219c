from __future__ import annotations

import numpy as np
import pytest

from policies.qnet import load_controller
from qan_ray.env import TargetTrainingEnv


def test_builtin_controller_loads_and_acts_on_its_task():
    ctrl = load_controller("builtin")
    env = TargetTrainingEnv({"task": ctrl.spec["qan"]["task"]})
    assert ctrl.obs_size == env.observation_space.shape[0] == 392
    assert ctrl.spec["action_labels"] == ["x0.5", "x0.9", "keep", "x1.1", "x2"]
    obs, _ = env.reset(seed=0)
    q = ctrl.q_values(obs)
    assert q.shape == (5,) and np.isfinite(q).all()
    assert ctrl.act(obs) == int(np.argmax(q))


def test_controller_rejects_an_observation_of_the_wrong_size():
    with pytest.raises(ValueError, match="observation has 10 features but this controller "
                                         "expects 392"):
        load_controller("builtin").q_values(np.zeros(10, np.float32))
