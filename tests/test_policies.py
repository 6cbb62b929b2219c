from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from controllers import fixed_action_controller

from policies.qnet import BUILTIN, WEIGHTS_FILE, Controller, load_controller, plain_qnet
from qan_ray.contract import ObservationSpec, Observer
from qan_ray.env import TargetTrainingEnv
from qan_ray.models import MLP, LeNet


def _reference_q(folder, obs: np.ndarray) -> np.ndarray:
    """Q-values of the network saved in `folder`, by a float64 numpy forward of the raw state
    dict (Linear, ReLU, ..., Linear): independent of Controller and plain_qnet."""
    state = torch.load(folder / WEIGHTS_FILE, weights_only=True)
    layers = sorted({int(k.split(".")[0]) for k in state})
    h = np.asarray(obs, np.float64)
    for i in layers:
        h = h @ state[f"{i}.weight"].double().numpy().T + state[f"{i}.bias"].double().numpy()
        if i != layers[-1]:
            h = np.maximum(h, 0.0)
    return h


def _clear_argmax(q: np.ndarray) -> int:
    """The argmax of `q`, checked to lead the runner-up by far more than float32 rounding."""
    top, second = np.sort(q)[-2:][::-1]
    assert top - second > 1e-3, q
    return int(np.argmax(q))


def test_builtin_controller_loads_and_acts_on_its_task():
    ctrl = load_controller("builtin", expect=ObservationSpec())
    env = TargetTrainingEnv({"task": ctrl.spec.task["task"]})
    assert ctrl.obs_size == env.observation_space.shape[0] == ObservationSpec().size
    assert ctrl.spec.action.labels == ["x0.1", "x0.5", "x0.9", "keep", "x1.1", "x2"]
    obs, _ = env.reset(seed=0)
    q = ctrl.q_values(obs)
    assert q.shape == (6,) and np.isfinite(q).all()
    # the shipped weights, not a fresh network: the Q-values of the file's own network
    ref = _reference_q(BUILTIN, obs)
    assert q == pytest.approx(ref, rel=1e-5, abs=1e-5)
    assert ctrl.act(obs) == _clear_argmax(ref)


def test_builtin_q_values_are_the_shipped_networks_on_fixed_observations():
    ctrl = load_controller("builtin")
    for obs in (np.zeros(ctrl.obs_size, np.float32), np.full(ctrl.obs_size, 0.5, np.float32),
                np.random.default_rng(0).standard_normal(ctrl.obs_size).astype(np.float32)):
        ref = _reference_q(BUILTIN, obs)
        assert ctrl.q_values(obs) == pytest.approx(ref, rel=1e-5, abs=1e-5)
        assert ctrl.act(obs) == _clear_argmax(ref)
    # the Q-values depend on the observation (a constant or zeroed network would not)
    assert np.ptp(ctrl.q_values(np.zeros(ctrl.obs_size, np.float32))
                  - ctrl.q_values(np.full(ctrl.obs_size, 0.5, np.float32))) > 0.1


def test_save_then_load_gives_the_exact_q_values_of_the_saved_network(tmp_path):
    spec = dataclasses.replace(fixed_action_controller().spec, hidden=(16, 8))
    torch.manual_seed(3)
    net = plain_qnet(spec.obs_size, spec.hidden, spec.num_actions)
    saved = Controller(net, spec)
    folder = saved.save(tmp_path / "ctrl")
    loaded = load_controller(folder)
    assert loaded.spec.hidden == (16, 8) and loaded.net is not net
    obs = np.random.default_rng(1).standard_normal((8, spec.obs_size)).astype(np.float32)
    assert np.array_equal(loaded.q_values(obs), saved.q_values(obs))  # bit for bit
    assert loaded.q_values(obs) == pytest.approx(_reference_q(folder, obs), rel=1e-5, abs=1e-5)
    assert [loaded.act(o) for o in obs] == [saved.act(o) for o in obs]
    assert len({loaded.act(o) for o in obs}) > 1  # the observations do pick different actions


@pytest.mark.parametrize("model", [MLP(64, (64, 64, 64, 64, 64)), LeNet()],
                         ids=["mlp-6", "lenet"])
def test_builtin_controller_accepts_other_architectures(model):
    ctrl = load_controller("builtin")
    obs = Observer(ctrl.spec.observation, 0.05).observe(
        model, lr=0.05, train_loss=2.0, val_loss=2.0, val_accuracy=0.2, progress=0.2)
    assert 0 <= ctrl.act(obs) < ctrl.num_actions and np.isfinite(ctrl.q_values(obs)).all()
    assert ctrl.q_values(obs) == pytest.approx(_reference_q(BUILTIN, obs), rel=1e-5, abs=1e-5)


def test_act_is_the_nan_safe_argmax_of_the_q_values():
    ctrl = fixed_action_controller()
    with torch.no_grad():
        ctrl.net[-1].bias.copy_(torch.tensor([0.0, 3.0, 1.0, float("nan"), 2.0]))
    assert ctrl.act(np.zeros(ctrl.obs_size, np.float32)) == 1


def test_controller_rejects_an_observation_of_the_wrong_size():
    with pytest.raises(ValueError, match=f"observation has 10 features but this controller "
                                         f"expects {ObservationSpec().size}"):
        load_controller("builtin").q_values(np.zeros(10, np.float32))
