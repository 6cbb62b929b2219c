"""The built-in Tune trainables' pieces and the trainable-side helper, outside Tune."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from qan_ray.config import from_dict
from qan_ray.contract import SIGNAL_NAMES, ObservationSpec
from qan_ray.features import WEIGHT_FEATURES, weight_features
from qan_ray.trainer import TargetTrainer
from qan_ray.tune import QANReporter
from trainables.targets import apply_hyperparams, split_config, trainable_for, val_score


def test_split_config_rejects_typos_with_the_valid_keys():
    qan, extra = split_config({"task": "digits-mlp", "lr": 0.1, "epochs": 3})
    assert qan == {"task": "digits-mlp", "lr": 0.1} and extra == {"epochs": 3}
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['learning_rate'\]"):
        split_config({"learning_rate": 0.1})


def test_val_score_ranks_by_accuracy_and_breaks_ties_by_loss():
    assert val_score(0.9, 0.2) > val_score(0.9, 0.3)
    assert val_score(0.9 + 1 / 288, 3.0) > val_score(0.9, 0.0)  # one sample beats any loss
    assert math.isnan(val_score(0.9, float("nan")))


def test_apply_hyperparams_overrides_loaded_optimizer_state():
    cfg = from_dict(task="digits-mlp", device="cpu")
    trainer = TargetTrainer(cfg)
    state = trainer.state_dict()  # carries lr 0.05, momentum 0.9
    trainer.load_state_dict(state)
    opt = trainer.population.optimizer
    assert (float(opt.lr[0]), opt.momentum, opt.weight_decay) == (pytest.approx(0.05), 0.9,
                                                                  cfg.weight_decay)
    apply_hyperparams(trainer, {"lr": 0.2, "momentum": 0.5, "weight_decay": 1e-4})
    assert (float(opt.lr[0]), opt.momentum, opt.weight_decay) == (pytest.approx(0.2), 0.5, 1e-4)
    apply_hyperparams(trainer, {"lr": 5.0})
    assert trainer.lr == cfg.lr_max  # clamped


def test_trainable_for_gives_each_builtin_task_its_own_preset():
    """Each built-in trainable trains its own task whatever the config says; unknown tasks get
    the generic trainable, which reads config["task"]."""
    import inspect

    from trainables.targets import TASK_TRAINABLES, target_trainable

    for task, fn in TASK_TRAINABLES.items():
        assert trainable_for(task) is fn
        assert inspect.getclosurevars(fn).nonlocals["task"] == task
        assert fn.__name__ == task.replace("-", "_")
    assert trainable_for("paper-mnist-lr") is target_trainable


def test_reporter_outside_tune_uses_the_config_and_skips_features():
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    reporter = QANReporter({"lr": 0.1})
    # without QANScheduler apply() changes nothing: the optimizer keeps the user's LR
    assert not reporter.active and reporter.apply(opt) == 1.0
    assert opt.param_groups[0]["lr"] == 1.0
    out = reporter.metrics(model, train_loss=1.0, val_loss=1.0, val_accuracy=0.5, progress=0.1)
    assert out == {}  # no channel, no QANScheduler: no feature cost, nothing added
    forced = QANReporter({"lr": 0.1}, features=True).metrics(
        model, train_loss=1.0, val_loss=1.0, val_accuracy=0.5, progress=0.1)
    assert len(forced["qan_obs"]) == ObservationSpec().size and forced["qan_progress"] == 0.1
    # the environment's observation: the model's weight statistics, then the signals (LR 0.1 =
    # the config's, so no change; losses 1.0 against the chance loss ln 10; accuracy 0.5
    # rescaled from chance 0.1; progress 0.1; no non-finite entry)
    obs = np.asarray(forced["qan_obs"], np.float32)
    assert np.array_equal(obs[:WEIGHT_FEATURES], weight_features(model).numpy())
    log_loss = math.log(1.0 / math.log(10))
    assert obs[WEIGHT_FEATURES:] == pytest.approx(
        [-1.0, 0.0, 0.0, 0.1, log_loss, log_loss, 0.0, 0.0, 0.0, 0.4 / 0.9, 0.0, 0.1, 0.0],
        abs=1e-6)


def test_reporter_observation_is_finite_for_a_nan_loss():
    trainer = TargetTrainer(from_dict(task="digits-mlp", device="cpu"))
    out = QANReporter({"lr": 0.05}, features=True).metrics(
        trainer.model, train_loss=float("nan"), val_loss=1.0, val_accuracy=0.5, progress=0.5)
    assert len(out["qan_obs"]) == ObservationSpec().size
    assert all(math.isfinite(v) for v in out["qan_obs"])
    # the two signals a NaN train loss makes NaN (log train loss, train/val gap) are zeroed and
    # counted; the val-loss signal and the rest are as usual
    signals = dict(zip(SIGNAL_NAMES, out["qan_obs"][-len(SIGNAL_NAMES):]))
    assert signals["nonfinite"] == 2.0
    assert signals["log_train_loss"] == 0.0 and signals["train_val_gap"] == 0.0
    assert signals["log_val_loss"] == pytest.approx(math.log(1.0 / math.log(10)), abs=1e-6)
    assert signals["log10_lr"] == pytest.approx(math.log10(0.05), abs=1e-6)


@pytest.mark.parametrize("factor", [None, 3.0, 25.0])
def test_reporter_diverged_is_the_environment_rule(factor):
    """The reporter, the trainer and the env's episode step share one rule and one factor: the
    trial config's `divergence_factor` (QANConfig's default when absent)."""
    extra = {} if factor is None else {"divergence_factor": factor}
    expected = 10.0 if factor is None else factor
    reporter = QANReporter({"lr": 0.1, **extra})
    model = torch.nn.Linear(2, 2)
    reporter.metrics(model, train_loss=2.0, val_loss=2.0, val_accuracy=0.1, progress=0.1,
                     initial_loss=2.0)
    assert not reporter.diverged(2.0 * expected) and reporter.diverged(2.0 * expected + 0.01)
    assert reporter.diverged(float("nan")) and reporter.diverged(float("inf"))
    trainer = TargetTrainer(from_dict(task="digits-mlp", device="cpu", **extra))
    l0 = trainer.initial_loss
    assert not trainer.diverged(expected * l0) and trainer.diverged(expected * l0 * 1.001)
    assert not reporter.diverged(2.0 * expected, factor=expected * 2)  # an explicit factor


def test_env_lr_init_range_starts_each_episode_at_a_seeded_log_uniform_lr():
    """Meta-training for Tune: episodes start from sampled LRs like Tune trials do (config.py's
    lr_init_range, env.py), and the observation's LR reference is that start."""
    from qan_ray.env import TargetTrainingEnv

    env = TargetTrainingEnv(from_dict(task="digits-mlp", device="cpu", lr_init_range=(1e-3, 1.0),
                                      epochs_per_episode=1.0))
    starts = []
    for seed in (0, 1, 0):
        _, info = env.reset(seed=seed)
        starts.append(info["lr"])
        assert env.initial_lr == info["lr"] and 1e-3 <= info["lr"] <= 1.0
        # log-uniform from the episode seed's generator
        u = np.random.default_rng(seed).uniform(math.log(1e-3), math.log(1.0))
        assert info["lr"] == pytest.approx(math.exp(u), rel=1e-9)
    assert starts[0] == starts[2] != starts[1]  # seeded by the episode seed
    plain = TargetTrainingEnv(from_dict(task="digits-mlp", device="cpu", epochs_per_episode=1.0))
    assert plain.reset(seed=0)[1]["lr"] == 0.05  # unset: the config's lr, as before
    with pytest.raises(ValueError, match="`lr_init_range` is"):
        from_dict(lr_init_range=(0.5, 0.1))


def test_reporter_guard_rolls_the_model_and_optimizer_back_and_reports_the_rescue(ray_session):
    """The Tune side of the guard with a real control channel actor: a good iteration is kept
    (model + optimizer state), a dying one is loaded back from it and reported as rescued."""
    from qan_ray.tune import open_channel

    channel = open_channel("test-reporter-guard", create=True)
    assert channel is not None
    try:
        import ray

        model = torch.nn.Linear(4, 3)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        ray.get(channel.publish.remote(None, {"lr": 0.1}, 1, {"lr": 0.1},
                                       {"guard": {"on": True, "max_rescues": 1}}))
        reporter = QANReporter({"lr": 0.1}, channel=channel, model=model, optimizer=opt,
                               features=False)
        reporter.poll()
        reporter.start(train_loss=2.3, val_loss=2.3, val_accuracy=0.1)
        model(torch.randn(8, 4)).sum().backward()
        opt.step()  # some training: a momentum buffer now exists
        out = reporter.metrics(model, train_loss=1.0, val_loss=1.1, val_accuracy=0.6,
                               progress=0.25)
        assert out["qan_rescues"] == 0 and "qan_rescued" not in out
        good_w = model.weight.detach().clone()
        good_buf = opt.state_dict()["state"][0]["momentum_buffer"].clone()
        with torch.no_grad():
            model.weight.fill_(float("nan"))
        opt.state[model.weight]["momentum_buffer"].fill_(7.0)
        out = reporter.metrics(model, train_loss=float("nan"), val_loss=float("nan"),
                               val_accuracy=0.1, progress=0.5)
        assert out["qan_rescued"] is True and out["qan_rescues"] == 1
        assert torch.equal(model.weight, good_w)
        assert torch.equal(opt.state[model.weight]["momentum_buffer"], good_buf)
        with torch.no_grad():
            model.weight.fill_(float("nan"))
        out = reporter.metrics(model, train_loss=float("nan"), val_loss=float("nan"),
                               val_accuracy=0.1, progress=0.75)  # max_rescues spent
        assert "qan_rescued" not in out and torch.isnan(model.weight).all()
        assert reporter.state_dict()["rescues"] == 1
    finally:
        ray.kill(channel)


def test_a_pbt_perturbed_lr_past_the_bounds_is_clamped_not_a_failed_trial():
    from trainables.targets import clamp_lr

    assert clamp_lr({"lr": 1.018}) == {"lr": 1.0}  # PBT's x1.2 past a 1e-3..1 space
    assert clamp_lr({"lr": 2.0, "lr_max": 5.0}) == {"lr": 2.0, "lr_max": 5.0}
    assert clamp_lr({"lr": 1e-7}) == {"lr": 1e-5}
    assert clamp_lr({"task": "digits-mlp"}) == {"task": "digits-mlp"}
