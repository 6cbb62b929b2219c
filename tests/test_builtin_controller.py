"""The shipped controller (policies/builtin): a generalist meta-trained on a task distribution,
the default of `QANScheduler()`, driving the embedded tasks in real Tune runs."""

from __future__ import annotations

import math

import numpy as np
import pytest

from policies.qnet import Controller, load_controller


class RecordingController(Controller):
    """The same controller, keeping every observation it was asked about and its Q-values."""

    def __init__(self, ctrl: Controller):
        super().__init__(ctrl.net, ctrl.spec)
        self.calls: list[tuple[np.ndarray, np.ndarray]] = []

    def q_values(self, obs):
        q = super().q_values(obs)
        self.calls.append((np.array(obs, np.float32), np.array(q)))
        return q


def _builtin_q(obs: np.ndarray) -> np.ndarray:
    """The shipped Q-net on `obs`, by a float64 numpy forward of qnet.pt (independent of
    Controller)."""
    import torch

    from policies.qnet import BUILTIN, WEIGHTS_FILE

    state = torch.load(BUILTIN / WEIGHTS_FILE, weights_only=True)
    h = np.asarray(obs, np.float64)
    for i in (0, 2, 4):
        h = h @ state[f"{i}.weight"].double().numpy().T + state[f"{i}.bias"].double().numpy()
        h = np.maximum(h, 0.0) if i < 4 else h
    return h


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
    sched.controller = RecordingController(sched.controller)  # the decisions it is asked for
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
    assert rule.lr_factors == (0.1, 0.5, 0.9, 1.0, 1.1, 2.0)
    assert (rule.lr_min, rule.lr_max) == (1e-5, 1)
    # every decision is the shipped network's greedy action on the observation the trial sent:
    # the Q-values are the file's network's, and the best action leads by far more than float
    # rounding, so the expected action is exact
    calls = sched.controller.calls
    assert len(calls) == 4  # 2 trials x (after epoch 1, after epoch 2); never on the last result
    expected_actions = []
    for obs, q in calls:
        ref = _builtin_q(obs)
        assert q == pytest.approx(ref, rel=1e-5, abs=1e-5)
        top, second = np.sort(ref)[-2:][::-1]
        assert top - second > 1e-3, ref  # not a knife edge
        expected_actions.append(int(np.argmax(ref)))
    histories = [sched.trial_state(r.metrics["trial_id"]).history for r in grid]
    assert sorted(a for h in histories for _, a, _ in h) == sorted(expected_actions)
    for result in grid:
        state = sched.trial_state(result.metrics["trial_id"])
        assert state.skipped is None and len(state.history) == 2  # acted after epochs 1 and 2
        lr0 = result.config["lr"]
        assert state.initial_lr == lr0
        trained = result.metrics_dataframe["lr"].tolist()
        # epoch 1 trains at the config's LR (the schedule's start); each later epoch with the
        # LR QAN published: the cosine decay from lr0 at progress 1/3, then 2/3, times the
        # product of the factors chosen so far (clamped to the rule's range)
        correction, expected = 1.0, [lr0]
        for k, (iteration, action, lr_after) in enumerate(state.history, start=1):
            assert iteration == k
            correction *= rule.lr_factors[action]
            cosine = 0.5 * (1 + math.cos(math.pi * k / 3))
            expected.append(min(max(lr0 * correction * cosine, 1e-5), 1.0))
            assert lr_after == pytest.approx(expected[-1], rel=1e-9)
        assert state.correction == pytest.approx(correction, rel=1e-12)
        assert trained == pytest.approx(expected, rel=1e-6)


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
