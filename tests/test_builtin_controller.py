"""The shipped controller (policies/builtin): a generalist meta-trained on a task distribution,
the default of `QANScheduler()`, driving the embedded tasks in real Tune runs."""

from __future__ import annotations

import pytest

from policies.qnet import load_controller


def test_builtin_is_the_generalist_and_fits_every_embedded_task():
    from qan_ray.config import from_dict
    from qan_ray.contract import observation_spec

    ctrl = load_controller("builtin")
    task = ctrl.spec.task
    assert tuple(task["tasks"]) == ("generalist",)  # meta-trained on the task distribution
    assert set(task["holdout"]) == {"cnn2d", "mnist1d-mlp"}  # what transfer.md judges it on
    assert ctrl.spec.action.schedule == "cosine"  # actions correct a cosine schedule
    for name in ("digits-mlp", "digits-cnn", "mnist1d-mlp", "mnist1d-cnn"):
        ctrl.spec.check_fits(observation_spec(from_dict(task=name)), name)  # raises on a misfit


def test_default_scheduler_drives_an_embedded_task_it_never_trained_on(ray_session, tmp_path):
    """MNIST-1D with an MLP is a held-out pair of the shipped generalist (digits and the LeNet-
    style user CNN are driven in tests/test_tune_integration.py)."""
    task = "mnist1d-mlp"
    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from qan_ray.scheduler import QANScheduler
    from trainables.targets import trainable_for

    sched = QANScheduler()  # no arguments: the shipped generalist
    grid = tune.Tuner(
        tune.with_resources(trainable_for(task), {"cpu": 1}),
        param_space={"task": task, "lr": tune.grid_search([0.01, 0.1]), "epochs": 3,
                     "torch_threads": 1},
        tune_config=tune.TuneConfig(metric="val_accuracy", mode="max", scheduler=sched,
                                    reuse_actors=True,
                                    search_alg=BasicVariantGenerator(random_state=0,
                                                                     max_concurrent=2)),
        run_config=tune.RunConfig(name=task, storage_path=str(tmp_path), verbose=0,
                                  failure_config=tune.FailureConfig(max_failures=0))).fit()
    assert not grid.errors and len(grid) == 2
    rule = load_controller("builtin").spec.action
    for result in grid:
        state = sched.trial_state(result.metrics["trial_id"])
        assert state.skipped is None and len(state.history) == 2  # acted after epochs 1 and 2
        trained = result.metrics_dataframe["lr"].tolist()
        assert trained[0] == pytest.approx(result.config["lr"]) or trained[0] == pytest.approx(
            state.initial_lr)
        # each later epoch trained with the LR QAN published: the cosine decay from the start
        # LR (at progress 1/3, then 2/3) times the correction chosen so far
        for _, action, lr_after in state.history:
            assert 0 <= action < rule.num_actions and rule.lr_min <= lr_after <= rule.lr_max
        assert trained[1:] == pytest.approx([lr for *_, lr in state.history])
        assert trained[-1] == pytest.approx(rule.scheduled_lr(state.initial_lr, state.correction,
                                                              2 / 3))


def test_evaluating_the_generalist_on_one_task_takes_that_tasks_own_fields():
    from qan_ray.distribution import batches_per_epoch
    from qan_ray.evaluate import evaluation_config

    trained = load_controller("builtin").spec.task  # digits-mlp base fields + the task mix
    cnn = evaluation_config(trained, {"task": "digits-cnn"})
    assert (cnn.model, cnn.dataset, cnn.lr, cnn.epochs_per_episode) == ("cnn2d", "digits", 0.05,
                                                                         8.0)
    assert not cnn.tasks and cnn.lr_schedule == "cosine"  # the controller's control problem
    assert cnn.control_interval == batches_per_epoch(cnn)  # one decision per epoch, as trained
    mlp = evaluation_config(trained, {"task": "mnist1d-mlp", "control_interval": 5})
    assert (mlp.dataset, mlp.hidden, mlp.control_interval) == ("mnist1d", (100, 100), 5)
    same = evaluation_config(trained, {})  # no task given: the mix it was trained on
    assert same.tasks == ("generalist",)
