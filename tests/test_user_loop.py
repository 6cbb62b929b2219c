"""QAN in a Tune user's own training loop (issue 22): the user's LR schedule and param groups
survive the reporter, a decision is recorded only once it was trained with, and every result of a
QAN-driven trial says the LR it trained with (`qan_lr`).

The LR an optimizer step really used is measured from the step itself (plain SGD in float64:
lr = (w_before - w_after) / grad), not read back from the reporter or the param groups."""

from __future__ import annotations

import json
import math
import sys
from types import SimpleNamespace

import pytest
import torch
from controllers import fixed_action_controller
from ray import cloudpickle
from test_scheduler import StandInController, StandInTrial

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests/

LR0, HEAD = 0.1, 10.0  # the backbone's start LR; the head trains at HEAD x the backbone's
EPOCHS = 3


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(),
                               torch.nn.Linear(6, 3)).double()


def _optimizer(model, lr=LR0):
    """Two param groups: the backbone at lr, the head at HEAD x lr (a common fine-tuning setup)."""
    return torch.optim.SGD([{"params": model[0].parameters()},
                            {"params": model[2].parameters(), "lr": HEAD * lr}], lr=lr)


def _batch():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(32, 4, generator=g, dtype=torch.float64)
    return x, (x[:, 0] > 0).long()


def _step(model, opt, x, y) -> tuple[float, list[float]]:
    """One SGD step; (loss, the LR each param group's step used, measured from the weights)."""
    from torch.nn import functional as F

    loss = F.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    weights = [model[0].weight, model[2].weight]
    before = [(w.detach().clone(), w.grad.detach().clone()) for w in weights]
    opt.step()
    used = []
    for w, (w0, g) in zip(weights, before):
        big = g.abs() > 1e-3
        used.append(float(((w0 - w.detach())[big] / g[big]).mean()))
    return float(loss.detach()), used


def _user_schedule(steps=EPOCHS) -> list[list[float]]:
    """The group LRs of the user's own loop without any reporter, before each of `steps`
    epochs: CosineAnnealingLR over EPOCHS epochs, stepped once per epoch."""
    opt = _optimizer(_net())
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=EPOCHS)
    lrs = []
    for _ in range(steps):
        lrs.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    return lrs


# --- the trainable side, with a real control channel (no Tune) ----------------------------------
@pytest.mark.parametrize("own_schedule", [True, False])
def test_reporter_keeps_group_ratios_and_with_own_schedule_scales_the_users_schedule(
        ray_session, own_schedule):
    """QAN has halved the trial's LR (0.1 -> 0.05, factor 0.5). own_schedule=True: every step
    trains at 0.5 x the LR the user's CosineAnnealingLR set, in both groups, and the user's
    scheduler keeps stepping its own, unscaled values (exactly those of a run without QAN).
    Default: QAN's LR is the backbone's, and the head stays at 10 x."""
    import ray

    from qan_ray.tune import QANReporter, open_channel

    channel = open_channel("test-user-loop-groups", create=True)
    try:
        ray.get(channel.publish.remote("t", {"lr": LR0 / 2}, 1, {"lr": LR0}))
        model = _net()
        opt = _optimizer(model)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=EPOCHS)
        reporter = QANReporter({"lr": LR0}, channel=channel, trial_id="t", features=False,
                               own_schedule=own_schedule)
        x, y = _batch()
        users = _user_schedule()
        for epoch in range(EPOCHS):
            applied = reporter.apply(opt)
            assert [g["lr"] for g in opt.param_groups] == (
                users[epoch] if own_schedule else [LR0 / 2, HEAD * LR0 / 2])
            loss, used = _step(model, opt, x, y)
            want = users[epoch][0] / 2 if own_schedule else LR0 / 2
            assert used == pytest.approx([want, HEAD * want], rel=1e-9)
            assert applied == pytest.approx(want, rel=1e-15)
            out = reporter.metrics(model, train_loss=loss, val_loss=loss, val_accuracy=0.5,
                                   progress=(epoch + 1) / EPOCHS)
            assert out["qan_lr"] == pytest.approx(used[0], rel=1e-9)
            assert out["qan_version"] == 1
            assert out.get("qan_own_schedule", False) is own_schedule
            sched.step()  # own_schedule: the next apply() finds the user's exact next values
    finally:
        ray.kill(channel)


def test_without_qan_the_reporter_changes_no_lr():
    """No QANScheduler (no channel): `apply` leaves the user's groups and schedule alone."""
    from qan_ray.tune import QANReporter

    model = _net()
    opt = _optimizer(model)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=EPOCHS)
    for own in (False, True):
        assert not QANReporter({"lr": 0.7}, own_schedule=own).active
    reporter = QANReporter({"lr": 0.7})  # a config LR that differs from the optimizer's
    x, y = _batch()
    for epoch, users in enumerate(_user_schedule()):
        assert reporter.apply(opt) == users[0]
        assert [g["lr"] for g in opt.param_groups] == users
        assert _step(model, opt, x, y)[1] == pytest.approx([users[0], users[1]], rel=1e-9)
        assert reporter.metrics(model, train_loss=1.0, val_loss=1.0, val_accuracy=0.5,
                                progress=(epoch + 1) / EPOCHS) == {}
        sched.step()


# --- no lost decision: the scheduler records what was trained, never what was only sent ----------
def test_decisions_published_while_an_iteration_trains_are_acknowledged_not_assumed(
        ray_session, tmp_path):
    """The race of issue 22: the trainable has applied version 0 (LR 0.1) for iteration 2 when
    QAN publishes two decisions for it (its x0.5 on iteration 1, late; then a stopper's LR that
    QAN adopts). Iteration 2 trains at 0.1 and says so (version 0, qan_lr 0.1), even though the
    trainable read the channel again meanwhile; QAN does not act on that stale result, records
    0.1 for iteration 2 in schedule_rows, the state JSON and the qan-schedules Parquet, and the
    latest decision is trained with from iteration 3 on."""
    import pyarrow.parquet as pq
    import ray
    from ray.tune.schedulers import FIFOScheduler

    from qan_ray.scheduler import SCHEDULE_DIR, STATE_FILE, QANScheduler
    from qan_ray.tune import QANReporter, open_channel

    name = "test-user-loop-race"
    sched = QANScheduler(policy=fixed_action_controller(), stopper=FIFOScheduler(), metric="m",
                         mode="max")  # always x0.5; the stopper stands in for PBT
    racer, other = StandInTrial("racer", LR0), StandInTrial("other", LR0)
    for trial in (racer, other):
        trial.storage = SimpleNamespace(experiment_dir_name=name,
                                        experiment_driver_staging_path=str(tmp_path))
    tc = StandInController([racer, other])
    sched.on_trial_add(tc, racer)
    sched.on_trial_add(tc, other)
    channel = open_channel(name)
    try:
        for _ in range(100):  # the first publications do not wait for the channel's start
            if set(ray.get(channel.snapshot.remote())) == {"racer", "other"}:
                break
        model = torch.nn.Linear(4, 3).double()
        opt = torch.optim.SGD(model.parameters(), lr=LR0)
        reporter = QANReporter({"lr": LR0}, channel=channel, trial_id="racer")
        x, y = _batch()

        def train(iteration, poll_midway=False):
            from torch.nn import functional as F

            if poll_midway:  # user code reading the hyperparameters during the iteration
                reporter.poll()
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            w, g = model.weight.detach().clone(), model.weight.grad.clone()
            opt.step()
            used = float(((w - model.weight.detach()) / g)[g.abs() > 1e-3].mean())
            loss = float(loss.detach())
            out = reporter.metrics(model, train_loss=loss, val_loss=loss, val_accuracy=0.5,
                                   progress=iteration / 10)
            return {"training_iteration": iteration, "m": 0.5, **out}, used

        assert reporter.apply(opt) == LR0
        r1, used1 = train(1)
        assert (r1["qan_version"], r1["qan_lr"]) == (0, LR0) and used1 == pytest.approx(LR0)
        assert reporter.apply(opt) == LR0  # iteration 2 starts before QAN handled iteration 1
        sched.on_trial_result(tc, racer, r1)  # published late: x0.5 -> 0.05, version 1
        racer.set_config({**racer.config, "lr": 0.3})  # a stopper (a PBT exploit) sets the LR
        other_result = {"training_iteration": 1, "m": 0.5,
                        "qan_obs": [0.0] * sched.controller.obs_size}
        sched.on_trial_result(tc, other, other_result)  # QAN adopts 0.3: version 2
        assert ray.get(channel.get.remote("racer"))["version"] == 2
        r2, used2 = train(2, poll_midway=True)
        # the trainable's side: it acknowledges what it trained with, not what is on the channel
        assert used2 == pytest.approx(LR0, rel=1e-9)
        assert (r2["qan_version"], r2["qan_lr"]) == (0, LR0)
        state = sched.trial_state("racer")
        versions = state.version
        sched.on_trial_result(tc, racer, r2)  # stale: QAN does not act on it
        assert state.version == versions and state.trained[2] == LR0
        # not lost: the next iteration trains with the latest decision, and QAN acts again
        assert reporter.apply(opt) == 0.3
        r3, used3 = train(3)
        assert used3 == pytest.approx(0.3, rel=1e-9)
        assert (r3["qan_version"], r3["qan_lr"]) == (2, 0.3)
        sched.on_trial_result(tc, racer, r3)
        assert [h[1:] for h in state.history] == [[0, 0.05], [-1, 0.3], [0, 0.15]]
        sched.on_trial_complete(tc, racer, r3)  # writes the state JSON and the Parquet
        # the scheduler's side: every record holds what was trained
        assert [r["lr"] for r in sched.schedule_rows("racer")] == [LR0, LR0, 0.3]
        saved = json.loads((tmp_path / STATE_FILE).read_text())["trials"]["racer"]
        assert saved["trained"] == {"1": LR0, "2": LR0, "3": 0.3}
        table = pq.read_table(tmp_path / SCHEDULE_DIR / "racer.parquet")
        assert table.column("lr").to_pylist() == [LR0, LR0, 0.3]
        assert table.column("iteration").to_pylist() == [1, 2, 3]
    finally:
        ray.kill(channel)


# --- in Tune: FIFO leaves the user's loop alone; QAN keeps its schedule shape and ratios ---------
def own_loop(config):
    """A user's own trainable: two param groups (head at 10 x), their own CosineAnnealingLR,
    QANReporter with own_schedule from the config. Reports the LR each group's step used,
    measured from the weights."""
    from ray import tune

    from qan_ray.tune import QANReporter

    torch.set_num_threads(1)
    model = _net()
    opt = _optimizer(model, config["lr"])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=config["epochs"])
    reporter = QANReporter(config, own_schedule=config["own"], model=model, optimizer=opt)
    x, y = _batch()
    for epoch in range(config["epochs"]):
        reporter.apply(opt)
        loss, used = _step(model, opt, x, y)
        sched.step()
        tune.report({"loss": loss, "used_backbone": used[0], "used_head": used[1],
                     "user_lr_after": opt.param_groups[0]["lr"],
                     **reporter.metrics(model, train_loss=loss, val_loss=loss, val_accuracy=0.5,
                                        progress=(epoch + 1) / config["epochs"])})


def _own_loop_tuner(tmp_path, scheduler, name, space):
    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    return tune.Tuner(
        tune.with_resources(own_loop, {"cpu": 1}),
        param_space={"lr": LR0, "epochs": EPOCHS, **space},
        tune_config=tune.TuneConfig(metric="loss", mode="min", scheduler=scheduler,
                                    reuse_actors=True,
                                    search_alg=BasicVariantGenerator(max_concurrent=2)),
        run_config=tune.RunConfig(name=name, storage_path=str(tmp_path), verbose=0,
                                  failure_config=tune.FailureConfig(max_failures=0)))


def test_own_schedule_kept_exactly_under_fifo_and_its_ratio_and_shape_under_qan(ray_session,
                                                                                tmp_path):
    """FIFO: the trainable trains exactly its own cosine in both groups. QAN (always x0.5):
    with own_schedule, each iteration trains at the user's cosine x 0.5 ** (QAN's actions so
    far); without, at QAN's LR; the head at 10 x the backbone either way. Every QAN result's
    `qan_lr` is the backbone's measured LR; the docs' other LRs: Result.config["lr"] is the
    config's start LR, config/lr of get_dataframe() is QAN's current LR (start LR x its
    factor)."""
    from ray import tune
    from ray.tune.schedulers import FIFOScheduler

    from qan_ray.scheduler import QANScheduler

    users = _user_schedule()
    fifo = _own_loop_tuner(tmp_path, FIFOScheduler(), "fifo", {"own": True}).fit()
    assert not fifo.errors and len(fifo) == 1  # the default's apply() is the same no-op
    for result in fifo:
        df = result.metrics_dataframe
        assert "qan_lr" not in df and "qan_version" not in df  # the reporter added nothing
        assert df["used_backbone"].tolist() == pytest.approx([u[0] for u in users], rel=1e-9)
        assert df["used_head"].tolist() == pytest.approx([u[1] for u in users], rel=1e-9)
        assert df["user_lr_after"].tolist() == [u[0] for u in _user_schedule(EPOCHS + 1)[1:]]

    sched = QANScheduler(policy=fixed_action_controller(action=0))
    grid = _own_loop_tuner(tmp_path, sched, "qan", {"own": tune.grid_search([True, False])}).fit()
    assert not grid.errors and len(grid) == 2
    last = grid.get_dataframe().set_index("trial_id")
    for result in grid:
        df, own = result.metrics_dataframe, result.config["own"]
        halvings = [0.5 ** k for k in range(EPOCHS)]  # QAN acts after epochs 1 and 2
        want = [(u[0] if own else LR0) * h for u, h in zip(users, halvings)]
        assert df["used_backbone"].tolist() == pytest.approx(want, rel=1e-9)
        assert (df["used_head"] / df["used_backbone"]).tolist() == pytest.approx(
            [HEAD] * EPOCHS, rel=1e-9)
        assert df["qan_lr"].tolist() == pytest.approx(df["used_backbone"].tolist(), rel=1e-9)
        if own:  # the user's scheduler stepped its own values throughout
            assert df["user_lr_after"].tolist() == [u[0] for u in _user_schedule(EPOCHS + 1)[1:]]
        tid = result.metrics["trial_id"]
        assert [r["lr"] for r in sched.schedule_rows(tid)] == pytest.approx(want, rel=1e-9)
        assert result.config["lr"] == LR0  # the config the trainable was started with
        assert last.loc[tid, "config/lr"] == pytest.approx(LR0 * 0.25)  # QAN's current LR
        assert math.isclose(last.loc[tid, "qan_lr"], want[-1], rel_tol=1e-9)
