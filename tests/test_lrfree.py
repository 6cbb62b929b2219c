"""LR-free optimizers (qan_ray.lrfree) through the one training loop, as `qan evaluate` rows and
as Tune trial optimizers, and TPE search (qan_ray.protocol): which optimizer a run gets, that
Schedule-Free is evaluated at its averaged weights, that checkpoints resume exactly, the rows and
scheduler names a user sees."""

from __future__ import annotations

import os
from contextlib import contextmanager

import pytest
import torch

from qan_ray import lrfree, protocol
from qan_ray.config import from_dict
from qan_ray.population import PopulationTrainer
from qan_ray.trainer import TargetTrainer


def _cfg(**changes):
    base = dict(task="digits-mlp", device="cpu", epochs_per_episode=1.0, control_interval=10)
    return from_dict({**base, **changes})


@pytest.mark.parametrize("name, cls", [
    ("prodigy", "Prodigy"), ("schedulefree-sgd", "SGDScheduleFree"),
    ("schedulefree-adamw", "AdamWScheduleFree"), ("dadapt-sgd", "DAdaptSGD"),
    ("dadapt-adam", "DAdaptAdam"),
])
def test_each_optimizer_name_trains_with_its_package_optimizer(name, cls):
    tr = TargetTrainer(_cfg(optimizer=name, lr=0.3))
    opt = tr.population.optimizer
    assert type(opt.opt).__name__ == cls
    assert [g["lr"] for g in opt.opt.param_groups] == [0.3]
    tr.set_lr(0.7)  # the trainer's LR reaches the optimizer's param group
    assert [g["lr"] for g in opt.opt.param_groups] == [0.7]
    before = next(tr.model.parameters()).detach().clone()
    tr.train(3)
    after = next(tr.model.parameters()).detach()
    assert not torch.equal(before, after)  # the step moved the trainer's own weights


def test_methods_map_to_the_optimizer_of_the_task_family():
    assert lrfree.optimizer_for("schedulefree", "sgd") == "schedulefree-sgd"
    assert lrfree.optimizer_for("schedulefree", "adam") == "schedulefree-adamw"
    assert lrfree.optimizer_for("dadapt", "adamw") == "dadapt-adam"
    assert lrfree.optimizer_for("prodigy", "sgd") == "prodigy"
    with pytest.raises(ValueError, match="must be one of"):
        lrfree.optimizer_for("adam", "sgd")


def test_schedulefree_warms_up_over_five_percent_and_keeps_the_task_momentum():
    tr = TargetTrainer(_cfg(optimizer="schedulefree-sgd", lr=1.0, momentum=0.8,
                            epochs_per_episode=4.0))
    group = tr.population.optimizer.opt.param_groups[0]
    assert group["warmup_steps"] == round(0.05 * tr.total_batches)
    assert group["momentum"] == 0.8


def test_a_population_of_more_than_one_refuses_an_lr_free_optimizer():
    with pytest.raises(ValueError, match="population size 1"):
        PopulationTrainer(_cfg(optimizer="prodigy", lr=1.0), k=2)


def test_schedulefree_is_evaluated_at_its_averaged_weights(monkeypatch):
    """eval() before and train() after every validation/test pass; the pass sees x, training
    goes on from y."""
    tr = TargetTrainer(_cfg(optimizer="schedulefree-sgd", lr=0.5))
    opt = tr.population.optimizer.opt
    calls = []
    for mode in ("eval", "train"):
        real = getattr(opt, mode)
        monkeypatch.setattr(opt, mode, lambda real=real, mode=mode: (calls.append(mode),
                                                                      real())[1])
    tr.train(5)
    y = next(tr.model.parameters()).detach().clone()
    seen = []
    real_loss_acc = tr.population._loss_acc

    def spy(*a, **kw):
        seen.append((opt.param_groups[0]["train_mode"],
                     next(tr.model.parameters()).detach().clone()))
        return real_loss_acc(*a, **kw)

    monkeypatch.setattr(tr.population, "_loss_acc", spy)
    calls.clear()
    tr.evaluate("val")
    tr.evaluate("test")
    assert calls == ["eval", "train", "eval", "train"]
    assert [mode for mode, _ in seen] == [False, False]  # evaluated in eval mode (x)
    assert not torch.equal(seen[0][1], y)  # x differs from the trained y ...
    assert torch.allclose(next(tr.model.parameters()).detach(), y, atol=1e-6)  # ... y is back
    assert opt.param_groups[0]["train_mode"]
    tr.train(2)  # the package raises if a step comes in eval mode


@pytest.mark.parametrize("name", ["prodigy", "schedulefree-sgd", "dadapt-sgd"])
def test_state_dict_resumes_the_run_exactly(name, tmp_path):
    """A checkpoint (what the Tune trainable saves) holds the optimizer's state: a restored run
    continues with the same losses and the same evaluation."""
    cfg = _cfg(optimizer=name, lr=1.0)
    a = TargetTrainer(cfg)
    a.train(4)
    torch.save(a.state_dict(), tmp_path / "state.pt")
    expected = [a.train(3), a.evaluate("val"), a.train(3)]
    b = TargetTrainer(cfg.replace(seed=cfg.seed + 1))  # another init: all state comes from disk
    b.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    assert [b.train(3), b.evaluate("val"), b.train(3)] == expected


def test_run_lr_free_gives_the_rows_a_user_reads():
    """prodigy@1 and dadapt@1 follow a cosine from 1; schedulefree keeps the best LR of its
    grid, constant; each row has one run per seed through the env."""
    from qan_ray.evaluate import run_lr_free

    logged = []
    runs = run_lr_free(_cfg(), seeds=1, log=logged.append)
    grid = lrfree.schedulefree_grid("sgd")
    names = list(runs.by_method)
    assert names[0] == "prodigy@1" and names[2] == "dadapt@1"
    assert names[1] in {f"schedulefree@{lr:g}" for lr in grid}
    assert sum("schedulefree@" in m for m in logged) == len(grid)  # every grid LR is logged
    assert sum("(best of its LR grid)" in m for m in logged) == 1
    grid_acc = {m.split(":")[0]: float(m.split("final val acc ")[1].split()[0])
                for m in logged if m.startswith("schedulefree@")}
    assert names[1] == max(grid_acc, key=grid_acc.get)  # the kept row is the grid's best
    lrs = [r["lr"] for r in runs.by_method["prodigy@1"][0]["recs"][1:]]
    assert lrs[0] == 1.0 and lrs == sorted(lrs, reverse=True) and lrs[-1] < 0.1
    sf = [r["lr"] for r in runs.by_method[names[1]][0]["recs"][1:]]
    assert len(set(sf)) == 1
    with pytest.raises(ValueError, match="LR-free method"):
        run_lr_free(_cfg(), seeds=1, methods=("adam",))


def test_lr_free_scheduler_names_set_the_trial_optimizer_and_recipe():
    proto = protocol.Protocol(task_config={"task": "digits-cnn"}, samples=4, epochs=3)
    space = protocol.param_space(proto, "prodigy+asha")
    assert (space["optimizer"], space["lr"], space["trial_schedule"]) == ("prodigy", 1.0,
                                                                          "cosine")
    assert type(protocol.make_scheduler("prodigy+asha", proto)).__name__ == \
        "AsyncHyperBandScheduler"
    sf = protocol.param_space(proto, "schedulefree")
    assert sf["optimizer"] == "schedulefree-sgd" and "trial_schedule" not in sf
    assert type(sf["lr"]).__name__ == "Float"  # searched like every trial's LR
    assert type(protocol.make_scheduler("schedulefree", proto)).__name__ == "FIFOScheduler"
    adam = protocol.Protocol(task_config={"task": "digits-cnn", "optimizer": "adam"})
    assert protocol.param_space(adam, "schedulefree")["optimizer"] == "schedulefree-adamw"
    assert "optimizer" not in protocol.param_space(proto, "asha")
    for bad in ("prodigy+pbt", "tpe+cosine", "qan+prodigy"):
        with pytest.raises(ValueError, match="unknown"):
            protocol.make_scheduler(bad, proto)


def test_tpe_search_is_optuna_tpe_seeded_by_the_experiment_seed():
    from ray.tune.search.basic_variant import BasicVariantGenerator

    proto = protocol.Protocol(task_config={"task": "digits-mlp"}, samples=8, max_concurrent=3)
    assert isinstance(protocol.searcher("asha", proto, 0), BasicVariantGenerator)
    assert type(protocol.make_scheduler("tpe+asha", proto)).__name__ == "AsyncHyperBandScheduler"

    def first_lrs(seed: int) -> list[float]:
        limiter = protocol.searcher("tpe+asha", proto, seed)
        assert limiter.max_concurrent == 3
        tpe = limiter.searcher
        assert type(tpe).__name__ == "OptunaSearch"
        assert type(tpe._sampler).__name__ == "TPESampler"
        assert tpe._sampler._n_startup_trials == 2  # a quarter of 8 trials random, then TPE
        tpe.set_search_properties(protocol.METRIC, protocol.MODE, protocol.param_space(proto))
        return [tpe.suggest(f"t{i}")["lr"] for i in range(3)]

    assert first_lrs(0) == first_lrs(0) != first_lrs(1)


def test_compare_search_tpe_adds_the_tpe_asha_row(monkeypatch, tmp_path):
    from qan_ray import compare

    seen = {}
    monkeypatch.setattr(compare, "compare", lambda names, *a, **kw: seen.setdefault(
        "names", names) and {"markdown": ""})
    import argparse

    p = argparse.ArgumentParser()
    compare.configure_compare(p)
    args = p.parse_args(["--task", "digits-mlp", "--schedulers", "asha,prodigy", "--search",
                         "tpe", "--out", str(tmp_path / "c")])
    compare.run_compare(args)
    assert seen["names"] == ["asha", "prodigy", "tpe+asha"]


@contextmanager
def _fake_tune(monkeypatch, checkpoint=None):
    """ray.tune's report/get_checkpoint for running the trainable in-process: every report's
    metrics and what its checkpoint holds."""
    from ray import tune

    reports = []

    def report(metrics, checkpoint=None):
        state = None
        if checkpoint is not None:
            state = torch.load(os.path.join(checkpoint.path, "trainer.pt"), weights_only=True)
        reports.append((metrics, state))

    monkeypatch.setattr(tune, "report", report)
    monkeypatch.setattr(tune, "get_checkpoint", lambda: checkpoint)
    yield reports


def test_the_trainable_trains_schedulefree_evaluating_at_x_and_resumes(monkeypatch, tmp_path):
    """The Tune trainable with optimizer schedulefree-sgd: eval()/train() around each epoch's
    validation and the final test pass; a restore from epoch 1's checkpoint reports epoch 2 as
    the uninterrupted trial did."""
    import schedulefree
    from ray import tune

    from trainables.targets import target_trainable

    calls = []
    for mode in ("eval", "train"):
        real = getattr(schedulefree.SGDScheduleFree, mode)
        monkeypatch.setattr(schedulefree.SGDScheduleFree, mode,
                            lambda self, real=real, mode=mode: (calls.append(mode),
                                                                real(self))[1])
    config = {"task": "digits-mlp", "optimizer": "schedulefree-sgd", "lr": 0.5, "epochs": 2,
              "device": "cpu"}
    with _fake_tune(monkeypatch) as reports:
        target_trainable(config)
    # train() at the start, then eval/train around val (epoch 1), val (epoch 2) and test
    first = calls.index("eval")
    assert set(calls[:first]) == {"train"} and calls[first:] == ["eval", "train"] * 3
    full = [m for m, _ in reports]
    folder = tmp_path / "ckpt"
    folder.mkdir()
    torch.save(reports[0][1], folder / "trainer.pt")  # epoch 1's checkpoint
    with _fake_tune(monkeypatch, tune.Checkpoint.from_directory(str(folder))) as resumed:
        target_trainable(config)
    assert len(resumed) == 1
    keys = ("val_accuracy", "val_loss", "train_loss", "test_accuracy", "lr")
    assert {k: resumed[0][0][k] for k in keys} == {k: full[1][k] for k in keys}


def test_tune_runs_prodigy_and_tpe_asha_on_one_budget(ray_session, tmp_path, monkeypatch):
    """One real comparison (the conftest Ray session): prodigy's trials run at LR 1 then the
    cosine of their epoch budget; tpe+asha's trials come from OptunaSearch; both fit the
    protocol's epoch budget and land in the table."""
    from qan_ray.compare import compare

    searchers = {}
    real = protocol.searcher

    def spy(name, proto, seed):
        searchers[name] = out = real(name, proto, seed)
        return out

    monkeypatch.setattr(protocol, "searcher", spy)
    proto = protocol.Protocol(task_config={"task": "digits-mlp", "torch_threads": 1},
                              samples=2, epochs=2, max_concurrent=1)
    result = compare(["prodigy", "tpe+asha"], proto, [0], tmp_path / "out", log=lambda *_: None)
    assert [r["scheduler"] for r in result["rows"]] == ["prodigy", "tpe+asha"]
    assert type(searchers["prodigy"]).__name__ == "BasicVariantGenerator"
    assert type(searchers["tpe+asha"].searcher).__name__ == "OptunaSearch"
    runs = {r["summary"]["scheduler"]: r for r in result["runs"]}
    assert all(r["summary"]["total_epochs"] <= proto.budget for r in runs.values())
    lrs = {}
    for row in runs["prodigy"]["rows"]:
        lrs.setdefault(row["trial"], []).append(row["lr"])
    assert list(lrs.values()) == [[1.0, pytest.approx(0.5)]] * 2
