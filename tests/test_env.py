from __future__ import annotations

import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from qan_ray.env import TargetTrainingEnv
from qan_ray.rewards import chance_penalty, log_improvement, step_reward, terminal_reward


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
    assert env.action_space.n == 5
    steps, terminated = 0, False
    while not terminated:
        _, r, terminated, _, info = env.step(steps % 5)
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


def test_terminal_rewards_and_chance_penalty_on_hand_built_values():
    # per step the final_* rewards pay nothing
    for kind in ("final_val", "final_acc"):
        assert step_reward(kind, prev_train=2, train=1, prev_val=2, val=1, val_accuracy=0.5,
                           target_accuracy=0.9, total_steps=4) == (0.0, False)
    end = dict(initial_val=2.0, val=0.5, initial_accuracy=0.1, val_accuracy=0.82)
    assert terminal_reward("final_val", **end) == pytest.approx(np.log(4))
    assert terminal_reward("final_acc", **end) == pytest.approx(0.8)  # 0.72 / 0.9
    assert terminal_reward("final_acc", **end, scale=2.0) == pytest.approx(1.6)
    assert terminal_reward("log_loss", **end) == 0.0
    assert terminal_reward("final_val", **{**end, "val": float("nan")}) == 0.0
    assert chance_penalty(0.115, 2.5) == -2.5 and chance_penalty(0.05, 2.5) == -2.5
    assert chance_penalty(0.125, 2.5) == 0.0 and chance_penalty(float("nan"), 1.0) == -1.0
    with pytest.raises(ValueError, match="`reward` is 'x'; it must be one of"):
        terminal_reward("x", **end)


def _episode(cfg: dict, seed: int):
    env = TargetTrainingEnv(cfg)
    _, info0 = env.reset(seed=seed)
    rewards, terminated = [], False
    while not terminated:
        _, r, terminated, _, info = env.step(2)
        rewards.append(r)
    return env, info0, info, rewards


@pytest.mark.parametrize("kind", ["final_val", "final_acc"])
def test_final_rewards_pay_only_at_the_end_of_an_episode(kind):
    _, info0, info, rewards = _episode({"reward": kind, "epochs_per_episode": 2}, 3)
    assert len(rewards) > 2 and rewards[:-1] == [0.0] * (len(rewards) - 1)
    if kind == "final_val":
        expected = np.log(info0["val_loss"]) - np.log(info["val_loss"])
    else:
        expected = (info["val_accuracy"] - info0["val_accuracy"]) / 0.9
    assert info["val_accuracy"] > 0.5 and rewards[-1] == pytest.approx(expected, rel=1e-9)


def test_a_run_still_at_chance_pays_the_chance_penalty_on_its_last_step():
    # LR 1e-5 for half an epoch: the MLP does not move from its ~10% initial accuracy
    cfg = {"lr": 1e-5, "lr_min": 1e-6, "epochs_per_episode": 0.5, "reward": "final_acc",
           "divergence_penalty": 6.0, "chance_step_penalty": 0.0}
    _, info0, info, rewards = _episode(cfg, 2)
    assert abs(info["val_accuracy"] - 0.1) <= 0.02
    gain = (info["val_accuracy"] - info0["val_accuracy"]) / 0.9
    assert rewards[-1] == pytest.approx(gain - 3.0)  # default: divergence_penalty / 2
    assert rewards[:-1] == [0.0] * (len(rewards) - 1)
    *_, rewards = _episode({**cfg, "chance_penalty": 1.25, "reward": "log_loss"}, 2)
    log_loss_only = _episode({**cfg, "chance_penalty": 0.0, "reward": "log_loss"}, 2)[3]
    assert rewards[-1] == pytest.approx(log_loss_only[-1] - 1.25)
    assert rewards[:-1] == log_loss_only[:-1]


def test_chance_penalty_must_be_a_finite_number_at_least_zero():
    from qan_ray.config import from_dict

    with pytest.raises(ValueError, match="`chance_penalty` is -1.0; it must be a finite number"
                                         " >= 0"):
        from_dict(chance_penalty=-1.0)
    assert from_dict(divergence_penalty=8.0).chance_penalty_value == 4.0
    assert from_dict(chance_penalty=0.0).chance_penalty_value == 0.0
