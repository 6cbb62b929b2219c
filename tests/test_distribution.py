"""The task distribution of meta-training (qan_ray.distribution): per-episode sampling, hold-outs,
user tasks in the mix, and the environment switching task across resets."""

from __future__ import annotations

import math

import pytest
import torch

from qan_ray.config import from_dict
from qan_ray.data import load_data
from qan_ray.distribution import (
    BATCH_SIZES,
    EPOCHS,
    LR_RANGES,
    MLP_WIDTHS,
    OPTIMIZER_FAMILIES,
    batches_per_epoch,
    describe,
    episode_steps,
    families,
    load_config,
    mean_episode_steps,
    optimizer_family,
    sample_task,
)
from qan_ray.env import TargetTrainingEnv
from qan_ray.models import build_model

GENERALIST = from_dict(tasks=("generalist",))
SEEDS = range(300)
USER = "user_task_example:make_task"


@pytest.fixture(scope="module")
def generalist_tasks():
    return [sample_task(GENERALIST, s) for s in SEEDS]


def test_sampling_is_a_pure_function_of_the_episode_seed():
    a = [sample_task(GENERALIST, s) for s in range(20)]
    assert a == [sample_task(from_dict(tasks=("generalist",)), s) for s in range(20)]
    assert len({describe(t) for t in a}) >= 18  # different seeds, different tasks
    assert all(t.tasks == () and t.holdout == () and t.lr_init_range is None for t in a)
    assert sample_task(from_dict(), 7) == from_dict()  # no tasks: the config's own task


def test_generalist_covers_every_family_over_many_seeds(generalist_tasks):
    seen = set().union(*(families(t) for t in generalist_tasks))
    assert {"digits", "mnist1d", "mlp", "cnn", "cnn1d", "cnn2d", "digits-mlp", "digits-cnn",
            "mnist1d-mlp", "mnist1d-cnn", *OPTIMIZER_FAMILIES} <= seen
    assert {t.batch_size for t in generalist_tasks} == set(BATCH_SIZES)
    mlps = [t for t in generalist_tasks if t.model == "mlp"]
    assert {len(t.hidden) for t in mlps} == {1, 2, 3, 4}
    assert {w for t in mlps for w in t.hidden} == set(MLP_WIDTHS)
    for family, (low, high) in LR_RANGES.items():
        lrs = [t.lr for t in generalist_tasks if optimizer_family(t) == family]
        assert all(low <= lr <= high for lr in lrs)
        assert math.log10(max(lrs) / min(lrs)) > 2.4  # ~3 decades, log-uniform
        assert math.log10(high / low) >= 3
    for t in generalist_tasks:
        low, high = EPOCHS[t.dataset]
        assert low <= t.epochs_per_episode <= high and t.epochs_per_episode.is_integer()
        assert t.control_interval == batches_per_epoch(t)  # one decision per epoch
        assert (t.dataset, t.model) in {("digits", "mlp"), ("digits", "cnn2d"),
                                        ("mnist1d", "mlp"), ("mnist1d", "cnn1d")}


def test_every_sampled_config_validates_and_builds_a_model_for_its_data(generalist_tasks):
    built = set()
    for t in generalist_tasks:
        assert from_dict(t.to_dict()) == t  # valid, and what actors rebuild from a dict
        key = (t.dataset, t.model, t.hidden)
        if key in built or len(built) > 40:
            continue
        built.add(key)
        data = load_data(t, torch.device("cpu"))
        x = data.x_train[:5]
        assert build_model(t, data.input_shape)(x).shape == (5, 10), describe(t)
    assert {(d, m) for d, m, _ in built} == {("digits", "mlp"), ("digits", "cnn2d"),
                                             ("mnist1d", "mlp"), ("mnist1d", "cnn1d")}


@pytest.mark.parametrize("held", ["cnn", "mnist1d-mlp", "adam", "digits", "cnn2d"])
def test_holdout_excludes_its_family_and_keeps_the_rest(held):
    cfg = from_dict(tasks=("generalist",), holdout=(held,))
    seen = set().union(*(families(sample_task(cfg, s)) for s in range(200)))
    assert held not in seen
    allowed = [families(sample_task(GENERALIST, s)) for s in SEEDS]
    assert seen == set().union(*(f for f in allowed if held not in f))  # the rest stays
    if held == "mnist1d-mlp":  # a pair: both its dataset and its model stay
        assert {"mnist1d", "mlp", "mnist1d-cnn", "digits-mlp"} <= seen


def test_a_preset_in_the_mix_keeps_its_fields_and_gets_a_drawn_lr_and_epoch_cadence():
    cfg = from_dict(tasks=("mnist1d-cnn",))
    tasks = [sample_task(cfg, s) for s in range(30)]
    for t in tasks:
        assert (t.task, t.dataset, t.model, t.batch_size, t.epochs_per_episode) == (
            "mnist1d-cnn", "mnist1d", "cnn1d", 100, 40.0)
        assert t.control_interval == 32  # 3,200 training signals / 100 per batch
        assert 1e-4 <= t.lr <= 1.0  # the momentum family's range (preset momentum 0.9)
    assert min(t.lr for t in tasks) < 3e-4 and max(t.lr for t in tasks) > 0.3  # all of it
    assert len({t.lr for t in tasks}) == 30
    narrow = from_dict(tasks=("mnist1d-cnn",), lr_init_range=(0.01, 0.02))
    assert all(0.01 <= sample_task(narrow, s).lr <= 0.02 for s in range(10))


def test_a_user_task_joins_the_mix_and_can_be_held_out():
    cfg = from_dict(tasks=("generalist", USER))
    tasks = [sample_task(cfg, s) for s in range(40)]
    mine = [t for t in tasks if t.task == USER]
    assert 8 <= len(mine) <= 32  # one member of two
    assert all(t.model == "user" and t.control_interval == batches_per_epoch(t) for t in mine)
    assert {USER, "user"} <= families(mine[0])
    held = from_dict(tasks=("generalist", USER), holdout=(USER,))
    assert all(sample_task(held, s).task != USER for s in range(40))


def test_families_and_describe_of_one_task():
    t = from_dict(task="mnist1d-cnn", optimizer="adam")
    assert families(t) == {"mnist1d-cnn", "mnist1d", "cnn1d", "cnn", "mnist1d-cnn1d", "adam"}
    assert describe(from_dict(task="digits-mlp")) == "digits/mlp-64 momentum bs32 lr0.05 8ep"
    assert describe(from_dict(), lr=0.2) == "digits/mlp-64 momentum bs32 lr0.2 8ep"
    env = TargetTrainingEnv(from_dict(lr_init_range=(0.001, 1), max_train_samples=64))
    _, info = env.reset(seed=4)  # a single task: its drawn start LR, not cfg.lr
    assert info["task"] == describe(env.cfg, env.initial_lr) != describe(env.cfg)


def test_env_switches_task_across_resets_with_the_same_observation_length():
    env = TargetTrainingEnv(from_dict(tasks=("generalist",), max_train_samples=64,
                                      val_max_samples=64, device="cpu"))
    size = env.observation_space.shape
    described, trainers = [], {}
    for seed in range(6):
        obs, info = env.reset(seed=seed)
        task = sample_task(env.base_cfg, seed)
        assert env.cfg == task and info["task"] == describe(task)
        assert obs.shape == size and env.action_space.n == 5
        assert env.trainer.lr == pytest.approx(task.lr)
        assert env.total_steps == task.epochs_per_episode == episode_steps(task)  # 1 per epoch
        assert env.trainer.cfg.control_interval == env.trainer.batches_per_epoch
        described.append(info["task"])
        trainers[seed] = env.trainer
        if seed < 2:  # a whole episode: as many steps as epochs, each one observation long
            steps, done = 0, False
            while not done:
                obs, _, terminated, truncated, info = env.step(2)
                steps, done = steps + 1, terminated or truncated
                assert obs.shape == size and info["task"] == describe(task)
            assert steps == task.epochs_per_episode or info["diverged"]
    assert len(set(described)) >= 5
    env.reset(seed=3)
    assert env.trainer is trainers[3]  # the same task again reuses its trainer


@pytest.mark.parametrize("values, fragment", [
    ({"tasks": ("generalst",)}, "`tasks` names 'generalst'; every entry must be a distribution "
                                "(generalist, generalist-wide), a preset"),
    ({"tasks": ("generalist",), "holdout": ("cnnn",)},
     "`holdout` names ['cnnn'], which are no family of the tasks ['generalist']; each must be "
     "one of ['adam', 'cnn', 'cnn1d'"),
    ({"tasks": ("generalist",), "holdout": ("digits", "mnist1d")},
     "it leaves no task of ['generalist'] to sample. Hold out fewer families"),
    ({"holdout": ("cnn",)}, "`holdout` is ('cnn',), but `tasks` is empty"),
    ({"tasks": ("generalist",), "mm_coef": 0.005}, "Pass --mm-coef 0, or drop --tasks"),
    ({"tasks": ("generalist",), "lr_min": 0.5, "lr": 0.5},
     "with `tasks` the initial LR of a adam task is drawn from (1e-05, 0.3)"),
    ({"tasks": ("mnist-lenet",)}, "`tasks` entry 'mnist-lenet' does not make a valid task with "
                                  "this config: `data_root` is None"),
])
def test_bad_tasks_or_holdout_is_a_clear_error(values, fragment):
    with pytest.raises(ValueError) as err:
        load_config(values)
    assert fragment in str(err.value)


def test_config_checks_the_values_and_load_config_the_members():
    assert from_dict(tasks=("generalst",)).tasks == ("generalst",)  # a name, not yet a member
    with pytest.raises(ValueError, match="`tasks` names 'generalst'"):
        load_config(tasks=("generalst",))
    with pytest.raises(ValueError, match="`holdout` is \\('cnn',\\), but `tasks` is empty"):
        from_dict(holdout=("cnn",))  # a rule on the values alone


def test_mean_episode_steps_is_the_mean_epochs_of_the_mix():
    assert mean_episode_steps(from_dict()) == 28  # digits-mlp: 280 batches, 10 per decision
    cfg = from_dict(tasks=("generalist",))
    mean = mean_episode_steps(cfg, samples=40)
    assert mean == sum(sample_task(cfg, s).epochs_per_episode for s in range(40)) / 40
    assert 4 <= mean <= 24


def test_generalist_wide_adds_residual_cnns_adamw_label_noise_and_smaller_splits():
    import numpy as np

    from qan_ray.distribution import WIDE_DECAY, WIDE_NOISE

    wide = load_config({"tasks": ("generalist-wide",), "holdout": ("cnn2d", "mnist1d-mlp")})
    tasks = [sample_task(wide, s) for s in range(300)]
    pairs = {(t.dataset, t.model) for t in tasks}
    assert pairs == {("digits", "mlp"), ("digits", "resnet"), ("mnist1d", "cnn1d"),
                     ("mnist1d", "resnet1d")}  # the held-out cnn2d and MNIST-1D MLP stay out
    assert {t.task for t in tasks if t.model.startswith("resnet")} == {"digits-resnet",
                                                                       "mnist1d-resnet"}
    assert {optimizer_family(t) for t in tasks} == {*OPTIMIZER_FAMILIES, "adamw"}
    decays = [t.weight_decay for t in tasks if t.optimizer == "adamw"]
    assert all(WIDE_DECAY[0] <= d <= WIDE_DECAY[1] for d in decays)
    assert all(t.weight_decay == 0.0 for t in tasks if t.optimizer != "adamw")
    assert {t.label_noise for t in tasks} == set(WIDE_NOISE)
    for dataset in ("digits", "mnist1d"):
        full = batches_per_epoch(from_dict(task=f"{dataset}-mlp", batch_size=1))
        kept = {t.max_train_samples for t in tasks if t.dataset == dataset}
        assert kept == {None, int(full * 0.5), int(full * 0.25)}
    small = next(t for t in tasks if t.max_train_samples is not None)
    assert small.control_interval == batches_per_epoch(small)
    assert batches_per_epoch(small) == small.max_train_samples // small.batch_size
    # the plain generalist draws none of these (its draws are unchanged)
    assert all(t.label_noise == 0 and t.max_train_samples is None
               for t in (sample_task(GENERALIST, s) for s in range(50)))
    assert np.mean([t.model.startswith("resnet") for t in tasks]) > 0.3
