from __future__ import annotations

import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from qan_ray.env import TargetTrainingEnv
from qan_ray.rewards import log_improvement, step_reward


def test_env_passes_gymnasium_check_env():
    env = TargetTrainingEnv({"task": "digits-mlp", "action_mode": "lr"})
    check_env(env, skip_render_check=True)
    assert env.action_space.n == 5 and env.observation_space.shape == (576 + 13,)


def test_episode_runs_to_budget_and_return_telescopes():
    env = TargetTrainingEnv({"task": "digits-mlp", "epochs_per_episode": 2})
    obs, info = env.reset(seed=3)
    first_loss, total, steps = info["train_loss"], 0.0, 0
    terminated = False
    while not terminated:
        obs, r, terminated, truncated, info = env.step(2)
        total += r
        steps += 1
        assert not truncated
    assert steps == env.total_steps
    assert info["batches"] == env.trainer.total_batches
    # log_loss rewards sum to log L_0 - log L_T
    assert total == pytest.approx(np.log(first_loss) - np.log(info["train_loss"]), rel=1e-6)


def test_divergence_ends_episode_with_penalty_and_finite_obs():
    env = TargetTrainingEnv({"lr": 0.5, "lr_max": 1000.0, "divergence_penalty": 7.0})
    env.reset(seed=0)
    for _ in range(env.total_steps):
        obs, r, terminated, _, info = env.step(4)  # x2 every step
        if terminated:
            break
    assert info["diverged"] and r == -7.0
    assert np.isfinite(obs).all()


def test_minibatch_mode_env_and_time_to_target_reward():
    env = TargetTrainingEnv({"action_mode": "minibatch", "reward": "time_to_target",
                             "target_accuracy": 0.5})
    env.reset(seed=0)
    assert env.action_space.n == 10
    steps, terminated = 0, False
    while not terminated:
        _, r, terminated, _, info = env.step(steps % 10)
        steps += 1
        assert r == pytest.approx(-1 / env.total_steps)
    assert info["val_accuracy"] >= 0.5 and steps < env.total_steps


def test_reset_seed_gives_same_initial_observation():
    env = TargetTrainingEnv({})
    a, _ = env.reset(seed=5)
    b, _ = env.reset(seed=5)
    c, _ = env.reset(seed=6)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_reward_functions():
    assert log_improvement(2.0, 1.0) == pytest.approx(np.log(2))
    assert log_improvement(float("nan"), 1.0) == 0.0
    r, reached = step_reward("val_loss", prev_train=1, train=1, prev_val=1.0, val=0.5,
                             val_accuracy=0.9, target_accuracy=0.95, total_steps=10)
    assert r == pytest.approx(np.log(2)) and not reached
    with pytest.raises(ValueError, match="`reward` is 'x'"):
        step_reward("x", prev_train=1, train=1, prev_val=1, val=1, val_accuracy=0,
                    target_accuracy=1, total_steps=1)


def test_signals_only_observation_ablation():
    env = TargetTrainingEnv({"weight_features": False})
    obs, _ = env.reset(seed=0)
    assert env.observation_space.shape == (13,) and obs.shape == (13,)
    assert obs[0] == pytest.approx(np.log10(0.05))  # log10 LR comes first
