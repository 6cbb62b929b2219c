"""Meta-training on a task distribution: the exploration schedule is sized by its episodes."""

from __future__ import annotations

from qan_ray.config import from_dict
from qan_ray.distribution import mean_episode_steps


def test_exploration_horizon_uses_the_mean_episode_length_of_the_mix():
    from qan_ray.meta import MetaConfig, epsilon_schedule, steps_per_episode

    cfg = from_dict(tasks=("generalist",), holdout=("cnn2d", "mnist1d-mlp"))
    mean = mean_episode_steps(cfg)
    assert 8 < mean < 16  # digits 4-12 epochs, MNIST-1D 8-24, one decision per epoch
    # not the probe's first task (digits-mlp's 28 steps): the mix's mean
    assert steps_per_episode(cfg, probe_steps=28) == round(mean)
    assert steps_per_episode(from_dict(task="digits-mlp"), probe_steps=28) == 28
    meta = MetaConfig(episodes=10)
    assert epsilon_schedule(meta, steps_per_episode(cfg, 28)) == [
        (0, 1.0), (int(0.5 * 10 * round(mean)), 0.05)]
