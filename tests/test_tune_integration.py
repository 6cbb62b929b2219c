"""Real Ray Tune runs with QANScheduler on a tiny PyTorch trainable (one Ray session for all).

The controller always answers "x0.5" (tests/controllers.py), so every LR a trial trains with is
known exactly: lr0 * 0.5 ** (number of QAN actions before that iteration).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

import pytest
from controllers import fixed_action_controller
from ray import cloudpickle

pytestmark = pytest.mark.ray
cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests/

OBS_SIZE = 2 * 192 + 8  # two Linear layers + the training signals
LOGGED = ("trained_lr", "local_iter", "qan_version", "score", "loss")


def tiny(config):
    """A user's own function trainable: a 2-layer MLP on a fixed random batch. It reads its LR
    from the control channel (QANReporter), unless config["poll"] is False (restart fallback: LR
    from the config). Reports the LR it trained with and `local_iter`, the iteration count of
    this invocation: it equals training_iteration only if the trial never restarted."""
    import tempfile

    import torch
    from ray import tune
    from torch.nn import functional as F

    from qan_ray.tune import QANReporter, qan_metrics

    torch.set_num_threads(1)
    torch.manual_seed(config.get("seed", 0))
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    opt = torch.optim.SGD(model.parameters(), lr=config["lr"],
                          momentum=config.get("momentum", 0.0))
    reporter = QANReporter(config)
    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(1))
    y = (x[:, 0] > 0).long()
    start = 0
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state = torch.load(os.path.join(folder, "s.pt"), weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        reporter.load_state_dict(state["reporter"])
        start = int(state["iteration"])
    for local, iteration in enumerate(range(start + 1, 100), start=1):
        if config.get("fail_marker") and iteration == 3 and not os.path.exists(
                config["fail_marker"]):
            Path(config["fail_marker"]).write_text("interrupted once")
            raise RuntimeError("simulated crash at iteration 3")
        if config.get("poll", True):
            reporter.apply(opt)
        else:  # a trainable that does not read the channel: its LR comes from the config
            for group in opt.param_groups:
                group["lr"] = config["lr"]
        lr = opt.param_groups[0]["lr"]
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        time.sleep(config.get("delay", 0.0))
        loss = float(loss)
        acc = float((model(x).argmax(1) == y).float().mean())
        metrics = {"loss": loss + 10.0 * config.get("bad", 0), "score": config.get("quality", 1.0),
                   "trained_lr": lr, "local_iter": local}
        if config.get("poll", True):
            metrics.update(reporter.metrics(model, train_loss=loss, val_loss=loss,
                                            val_accuracy=acc, progress=iteration / 10, lr=lr))
        else:
            metrics.update(qan_metrics(model, lr=lr, initial_lr=lr, train_loss=loss,
                                       initial_loss=loss, val_loss=loss, val_accuracy=acc,
                                       progress=iteration / 10))
        with open(config["log"], "a") as log:  # the test's own record, in training order
            log.write(json.dumps({"trial": tune.get_context().get_trial_id(), "t": time.time(),
                                  "iteration": iteration,
                                  **{k: metrics.get(k) for k in LOGGED}}) + "\n")
        with tempfile.TemporaryDirectory() as folder:
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(),
                        "reporter": reporter.state_dict(), "iteration": iteration},
                       os.path.join(folder, "s.pt"))
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))


def _tuner(tmp_path, scheduler, space, metric="score", mode="max", iterations=4, samples=1,
           concurrent=2, name="exp"):
    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    return tune.Tuner(
        tune.with_resources(tiny, {"cpu": 1}), param_space={**space, "log": _log(tmp_path)},
        tune_config=tune.TuneConfig(metric=metric, mode=mode, scheduler=scheduler,
                                    num_samples=samples, reuse_actors=True,
                                    search_alg=BasicVariantGenerator(random_state=0,
                                                                     max_concurrent=concurrent)),
        run_config=tune.RunConfig(name=name, storage_path=str(tmp_path), verbose=0,
                                  stop={"training_iteration": iterations},
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=None),
                                  failure_config=tune.FailureConfig(max_failures=0)))


def _halving():
    return fixed_action_controller(OBS_SIZE, action=0)


def _log(tmp_path) -> str:
    return str(tmp_path / "iterations.jsonl")


def _rows(tmp_path, trial_id: str | None = None) -> list[dict]:
    """What the trainable trained, iteration by iteration, in order (re-done iterations last)."""
    rows = [json.loads(line) for line in Path(_log(tmp_path)).read_text().splitlines()]
    return [r for r in rows if trial_id is None or r["trial"] == trial_id]


def test_qan_halves_the_lr_each_iteration_without_restarting_the_trial(ray_session, tmp_path):
    from qan_ray.scheduler import QANScheduler

    sched = QANScheduler(policy=_halving())  # metric/mode come from TuneConfig
    results = _tuner(tmp_path, sched, {"lr": 0.1}).fit()
    assert sched.metric == "score" and sched._mode == "max"
    rows = _rows(tmp_path, results[0].metrics["trial_id"])
    assert [r["iteration"] for r in rows] == [1, 2, 3, 4]
    assert [r["trained_lr"] for r in rows] == pytest.approx([0.1, 0.05, 0.025, 0.0125])
    assert [r["local_iter"] for r in rows] == [1, 2, 3, 4]  # one invocation: no restart
    assert [r["qan_version"] for r in rows] == [0, 1, 2, 3]
    state = sched.trial_state(results[0].metrics["trial_id"])
    assert state.via_channel and [h[:2] for h in state.history] == [[1, 0], [2, 0], [3, 0]]
    assert state.lr == pytest.approx(0.0125) and state.initial_lr == 0.1


def test_qan_without_channel_falls_back_to_set_config_and_restart(ray_session, tmp_path):
    from qan_ray.scheduler import QANScheduler

    sched = QANScheduler(policy=_halving())
    _tuner(tmp_path, sched, {"lr": 0.1, "poll": False}, iterations=2).fit()
    rows = _rows(tmp_path)
    assert [r["iteration"] for r in rows] == [1, 2]
    assert [r["trained_lr"] for r in rows] == pytest.approx([0.1, 0.05])
    assert [r["local_iter"] for r in rows] == [1, 1]  # restarted from its checkpoint
    assert rows[0]["qan_version"] is None  # the trainable never read the channel


def test_qan_with_asha_stops_the_trial_asha_stops_and_controls_the_other(ray_session, tmp_path):
    """Also: a signals-only controller (trained with weight_features=False, 8 inputs) -- the
    channel tells the reporter to send the 8-value observation, or QAN would raise."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from qan_ray.scheduler import QANScheduler

    asha = ASHAScheduler(time_attr="training_iteration", max_t=4, grace_period=1,
                         reduction_factor=2)
    signals_only = fixed_action_controller(8, action=0)
    signals_only.spec["qan"]["weight_features"] = False
    sched = QANScheduler(policy=signals_only, stopper=asha)
    # one trial at a time (grid order): the good one sets the rung, the bad one is cut at rung 1
    space = {"lr": 0.1, "bad": tune.grid_search([0, 1])}
    results = _tuner(tmp_path, sched, space, metric="loss", mode="min", concurrent=1).fit()
    by_bad = {r.config["bad"]: _rows(tmp_path, r.metrics["trial_id"]) for r in results}
    assert len(by_bad[0]) == 4 and len(by_bad[1]) == 1
    assert [r["trained_lr"] for r in by_bad[0]] == pytest.approx([0.1, 0.05, 0.025, 0.0125])
    assert asha._num_stopped == 1 and asha.metric == "loss"  # the stopper got metric and mode
    assert "AsyncHyperBand" in sched.debug_string()


def test_pbt_explores_momentum_while_qan_owns_the_lr(ray_session, tmp_path):
    """The recipe of docs/scheduler.md: PBT (synchronous here, so the exploit point is fixed)
    clones the good trial into the bad one; QAN adopts the cloned LR and keeps halving it."""
    from ray import tune
    from ray.tune.schedulers import PopulationBasedTraining

    from qan_ray.scheduler import QANScheduler

    pbt = PopulationBasedTraining(time_attr="training_iteration", perturbation_interval=2,
                                  quantile_fraction=0.5, synch=True,
                                  hyperparam_mutations={"momentum": tune.uniform(0.1, 0.9)})
    sched = QANScheduler(policy=_halving(), stopper=pbt)
    space = {"quality": tune.grid_search([1.0, 0.0]), "lr": tune.sample_from(
        lambda spec: 0.1 if spec.config.quality == 1.0 else 0.01), "momentum": 0.5}
    results = _tuner(tmp_path, sched, space, iterations=4).fit()
    good = next(r for r in results if r.metrics["trial_id"].endswith("00000"))
    bad = next(r for r in results if r.metrics["trial_id"].endswith("00001"))
    history = sched.trial_state(bad.metrics["trial_id"]).history
    adopted = [i for i, h in enumerate(history) if h[1] == -1]
    assert len(adopted) == 1  # exactly one exploit, at the sync point (iteration 2)
    lr = history[adopted[0]][2]
    assert math.log2(0.1 / lr) == pytest.approx(round(math.log2(0.1 / lr)))  # good's LR chain
    rows = _rows(tmp_path, bad.metrics["trial_id"])
    after = [r for r in rows if r["iteration"] == 3][-1]
    assert after["trained_lr"] == pytest.approx(lr)  # the restored clone trained with it
    assert after["score"] == 1.0  # ... from the good trial's config
    # and QAN keeps driving it: its next action halves the adopted LR
    assert history[adopted[0] + 1][1:] == [0, pytest.approx(lr / 2)]
    assert bad.config["quality"] == 1.0  # the good trial's config was cloned...
    assert bad.config["momentum"] != 0.5 and 0.1 <= bad.config["momentum"] <= 0.9  # explored
    assert good.config["momentum"] == 0.5


def test_tuner_restore_resumes_with_qan_state(ray_session, tmp_path):
    from ray import tune

    from qan_ray.scheduler import STATE_FILE, QANScheduler

    marker = tmp_path / "crashed-once"
    sched = QANScheduler(policy=_halving())
    first = _tuner(tmp_path, sched, {"lr": 0.1, "fail_marker": str(marker)}, iterations=6,
                   name="restore").fit()
    assert marker.exists() and first[0].error is not None
    assert len(_rows(tmp_path)) == 2  # crashed while training iteration 3
    path = tmp_path / "restore"
    assert json.loads((path / STATE_FILE).read_text())["trials"]  # QAN's state was saved
    restored = tune.Tuner.restore(str(path), trainable=tune.with_resources(tiny, {"cpu": 1}),
                                  resume_errored=True)
    result = restored.fit()[0]
    assert result.error is None
    rows = _rows(tmp_path)
    assert [r["iteration"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [r["trained_lr"] for r in rows] == pytest.approx([0.1 * 0.5 ** k for k in range(6)])
    # the channel was re-published from the saved state: versions continue, they do not restart
    assert [r["qan_version"] for r in rows] == [0, 1, 2, 3, 4, 5]
    saved = json.loads((path / STATE_FILE).read_text())["trials"][result.metrics["trial_id"]]
    assert [h[0] for h in saved["history"]] == [1, 2, 3, 4, 5]
    assert saved["initial_lr"] == 0.1  # not the config's current LR
