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

    from qan_ray.tune import QANReporter

    torch.set_num_threads(1)
    torch.manual_seed(config.get("seed", 0))
    widths = [4, *config.get("hidden", [8]), 3]
    layers = []
    for a, b in zip(widths, widths[1:]):
        layers += [torch.nn.Linear(a, b), torch.nn.ReLU()]
    model = torch.nn.Sequential(*layers[:-1])
    opt = torch.optim.SGD(model.parameters(), lr=config["lr"],
                          momentum=config.get("momentum", 0.0))
    # a trainable that does not read the channel reports its observation inline
    reporter = QANReporter(config, **({} if config.get("poll", True)
                                      else {"channel": None, "features": True}))
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
        metrics.update(reporter.metrics(model, train_loss=loss, val_loss=loss,
                                        val_accuracy=acc, progress=iteration / 10, lr=lr))
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
    return fixed_action_controller(action=0)


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
    """Also: a signals-only controller (trained with weight_features=False) -- the channel
    tells the reporter to send the signals-only observation, or QAN would not fit the trial."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from qan_ray.scheduler import QANScheduler

    asha = ASHAScheduler(time_attr="training_iteration", max_t=4, grace_period=1,
                         reduction_factor=2)
    signals_only = fixed_action_controller(action=0, with_weights=False)
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


def lenet_digits(config):
    """A user's own model: a LeNet-style CNN on the embedded 8x8 digits, with QANReporter."""
    import torch
    from ray import tune
    from sklearn.datasets import load_digits
    from torch.nn import functional as F

    from qan_ray.tune import QANReporter

    torch.set_num_threads(1)
    torch.manual_seed(config.get("seed", 0))
    digits = load_digits()
    x = torch.tensor(digits.images[:600] / 16.0, dtype=torch.float32)[:, None]
    y = torch.tensor(digits.target[:600])
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.Tanh(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.Tanh(), torch.nn.MaxPool2d(2),
        torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.Tanh(), torch.nn.Linear(32, 10))
    opt = torch.optim.SGD(model.parameters(), lr=config["lr"], momentum=0.9)
    reporter = QANReporter(config)
    epochs = config["epochs"]
    for epoch in range(epochs):
        reporter.apply(opt)
        lr = opt.param_groups[0]["lr"]
        for i in range(0, 500, 50):
            loss = F.cross_entropy(model(x[i:i + 50]), y[i:i + 50])
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            out = model(x[500:])
            val_loss = float(F.cross_entropy(out, y[500:]))
            val_acc = float((out.argmax(1) == y[500:]).float().mean())
        tune.report({"val_accuracy": val_acc, "trained_lr": lr,
                     **reporter.metrics(model, train_loss=float(loss), val_loss=val_loss,
                                        val_accuracy=val_acc, progress=(epoch + 1) / epochs)})


def _lenet_tuner(tmp_path, scheduler, name, samples=2):
    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    return tune.Tuner(
        tune.with_resources(lenet_digits, {"cpu": 1}),
        param_space={"lr": tune.grid_search([0.05, 0.2]), "epochs": 3},
        tune_config=tune.TuneConfig(metric="val_accuracy", mode="max", scheduler=scheduler,
                                    reuse_actors=True,
                                    search_alg=BasicVariantGenerator(random_state=0,
                                                                     max_concurrent=2)),
        run_config=tune.RunConfig(name=name, storage_path=str(tmp_path), verbose=0,
                                  failure_config=tune.FailureConfig(max_failures=0)))


def test_builtin_controller_drives_a_lenet_trial(ray_session, tmp_path):
    """The shipped controller (trained on the digits MLP) drives a user's CNN: the observation
    fits whatever the architecture, QAN acts, and Tune's results and the schedule file agree on
    the LR each iteration trained with. Where each LR is, as docs/scheduler.md ("The LR in
    results") says: `qan_lr` in every result is the LR the iteration trained with;
    Result.config["lr"] is the config the trainable was started with (the start LR: no restart);
    get_dataframe()["config/lr"] is QAN's current LR, the last trained one here."""
    import pyarrow.parquet as pq

    from qan_ray.scheduler import SCHEDULE_DIR, QANScheduler

    sched = QANScheduler()  # policy="builtin"
    grid = _lenet_tuner(tmp_path, sched, "lenet").fit()
    assert not grid.errors and len(grid) == 2
    for result in grid:
        tid = result.metrics["trial_id"]
        state = sched.trial_state(tid)
        assert state.skipped is None and len(state.history) == 2  # acted after epochs 1, 2
        df = result.metrics_dataframe
        schedule = pq.read_table(tmp_path / "lenet" / SCHEDULE_DIR / f"{tid}.parquet")
        assert df["qan_lr"].tolist() == df["trained_lr"].tolist()  # every result, exactly
        assert schedule.column("lr").to_pylist() == df["qan_lr"].tolist()
        assert result.config["lr"] == df["trained_lr"].iloc[0] in (0.05, 0.2)  # the start LR
        assert "qan_obs" not in result.metrics  # the observation never enters Tune's results
    # QAN moved the LR, so the start LR and the last trained one differ (the check means something)
    assert any(r.config["lr"] != r.metrics["qan_lr"] for r in grid)
    last = grid.get_dataframe()  # one row per trial: its last result and config
    assert last["config/lr"].tolist() == pytest.approx(last["qan_lr"].tolist())
    assert last["qan_lr"].tolist() == last["trained_lr"].tolist()
    assert "Last decisions" in sched.debug_string()


def test_old_format_controller_warns_and_every_trial_finishes(ray_session, tmp_path, caplog):
    from test_contract import _legacy_spec

    from qan_ray.scheduler import QANScheduler

    sched = QANScheduler(policy=str(_legacy_spec(tmp_path)))
    grid = _lenet_tuner(tmp_path, sched, "legacy").fit()
    assert not grid.errors and len(grid) == 2
    assert sorted(r.metrics["training_iteration"] for r in grid) == [3, 3]
    for result in grid:  # each trial trained at its config's LR throughout
        assert set(result.metrics_dataframe["trained_lr"]) == {result.config["lr"]}
        assert sched.trial_state(result.metrics["trial_id"]).skipped is not None
    assert any("observation format 1 vs 2" in r.message for r in caplog.records)


def _longest_numeric_run(obj, seen: dict | None = None, depth: int = 0) -> int:
    """The length of the longest sequence of numbers anywhere in `obj`: JSON values, JSON
    documents inside strings, Tune's pickled values (CLOUDPICKLE_FALLBACK and other hex pickles,
    unpickled and walked, objects through their attributes), numpy arrays."""
    import collections

    import numpy as np

    seen = {} if seen is None else seen  # id -> object: kept alive, so no id is reused
    if depth > 40 or id(obj) in seen or isinstance(obj, (bool, int, float, bytes, type(None))):
        return 0
    seen[id(obj)] = obj
    if isinstance(obj, np.ndarray):
        return obj.size if obj.dtype.kind in "fiuc" else 0
    if isinstance(obj, str):
        text = obj.strip()
        if text[:1] in "{[":
            try:
                return _longest_numeric_run(json.loads(text), seen, depth + 1)
            except ValueError:
                return 0
        if len(text) >= 8 and len(text) % 2 == 0 and text.startswith("80") and all(
                c in "0123456789abcdef" for c in text):  # a pickle (protocol 2+), hex-encoded
            return _longest_numeric_run(cloudpickle.loads(bytes.fromhex(text)), seen, depth + 1)
        return 0
    if isinstance(obj, dict):
        return max((_longest_numeric_run(v, seen, depth + 1) for v in obj.values()), default=0)
    if isinstance(obj, (list, tuple, set, frozenset, collections.deque)):
        items = list(obj)
        numeric = items and all(isinstance(x, (int, float, np.number))
                                and not isinstance(x, bool) for x in items)
        run = len(items) if numeric else 0
        return max([run, *(_longest_numeric_run(x, seen, depth + 1) for x in items)])
    attrs = getattr(obj, "__dict__", None)
    return _longest_numeric_run(attrs, seen, depth + 1) if isinstance(attrs, dict) else 0


def test_experiment_state_does_not_grow_with_the_number_of_monitored_layers(ray_session,
                                                                             tmp_path):
    """The observation (589 floats, at any depth) travels through the control channel: neither
    Tune's experiment state (trial configs, last results, metric windows) nor QAN's own saved
    state holds it, under any key, as a list, an array or a pickle."""
    from qan_ray.contract import ObservationSpec
    from qan_ray.scheduler import STATE_FILE, QANScheduler

    assert ObservationSpec().size == 589
    sizes, qan_sizes = {}, {}
    for name, hidden in (("small", [8]), ("deep", [32, 32, 32, 32, 32])):
        _tuner(tmp_path / name, QANScheduler(policy=_halving()), {"lr": 0.1, "hidden": hidden},
               iterations=3, name=name).fit()
        (state,) = (tmp_path / name / name).glob("experiment_state-*.json")
        text = state.read_text()
        assert "qan_obs\"" not in text and "qan_obs_ref" in text
        # the longest runs of numbers are Tune's metric windows (the last 5 and 10 values of
        # each metric: 3 results here) and the config's hidden widths (1 or 5 entries)
        assert _longest_numeric_run(json.loads(text)) == max(3, len(hidden)), name
        qan_state = (tmp_path / name / name / STATE_FILE).read_text()
        assert _longest_numeric_run(json.loads(qan_state)) <= 3  # [iteration, action, lr]
        sizes[name], qan_sizes[name] = len(text), len(qan_state)
    assert abs(sizes["deep"] - sizes["small"]) < 300, sizes  # hidden sizes differ in the config
    assert qan_sizes["deep"] == qan_sizes["small"], qan_sizes  # the same LRs and decisions


def test_minibatch_controller_drives_the_builtin_trainable(ray_session, tmp_path):
    """Minibatch mode in Tune: the controller's class action reaches the trainer's sampler
    through the channel, once per decision (action_mode read from the controller's spec), and
    the trainable reports the per-class observation the controller was trained on."""
    from ray import tune

    from qan_ray.scheduler import QANScheduler
    from trainables import digits_mlp

    sched = QANScheduler(policy=fixed_action_controller(action=3, action_mode="minibatch"))
    assert sched.action_mode == "minibatch"
    tuner = tune.Tuner(
        tune.with_resources(digits_mlp, {"cpu": 1}),
        param_space={"lr": 0.05, "epochs": 3, "action_mode": "minibatch", "checkpoint_every": 0},
        tune_config=tune.TuneConfig(metric="val_accuracy", mode="max", scheduler=sched),
        run_config=tune.RunConfig(name="minibatch", storage_path=str(tmp_path), verbose=0))
    result = tuner.fit()[0]
    assert result.error is None
    frame = result.metrics_dataframe
    assert frame["class_action"].tolist()[1:] == [3, 3] and "qan_obs_error" not in frame
    assert (frame["balanced_accuracy"] > 0).all()
    assert [h[1] for h in sched.trial_state(result.metrics["trial_id"]).history] == [3, 3]
