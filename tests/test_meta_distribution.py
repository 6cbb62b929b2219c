"""Meta-training on a task distribution: the exploration schedule is sized by its episodes."""

from __future__ import annotations

from qan_ray.config import from_dict
from qan_ray.distribution import mean_episode_steps


def test_exploration_horizon_uses_the_mean_episode_length_of_the_mix(ray_session, tmp_path):
    from qan_ray.meta import MetaConfig, MetaTrainer, epsilon_schedule

    cfg = from_dict(tasks=("generalist",), holdout=("cnn2d", "mnist1d-mlp"))
    mean = mean_episode_steps(cfg)
    assert 8 < mean < 16  # digits 4-12 epochs, MNIST-1D 8-24, one decision per epoch
    meta = MetaConfig(episodes=10, num_actors=1, cpus_per_actor=0.5)
    run = MetaTrainer(cfg, meta, tmp_path / "run", log=lambda *_: None)
    try:
        # not the probe's first task (digits-mlp's 28 steps): the mix's mean
        assert run.steps_per_episode == round(mean)
        assert epsilon_schedule(meta, run.steps_per_episode) == [
            (0, 1.0), (int(0.5 * 10 * round(mean)), 0.05)]
    finally:
        run.stop()
