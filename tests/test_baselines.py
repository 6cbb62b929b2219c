"""The baselines a Tune user runs (qan_ray.control): cosine with warm-up, torch's
ReduceLROnPlateau on the validation loss, hypergradient descent; their LR paths through the same
TargetTrainingEnv rollout as the controller, and their place in `run_baselines`."""

from __future__ import annotations

import math

import pytest
import torch

from qan_ray.config import from_dict
from qan_ray.control import (
    BASELINES,
    HypergradientBaseline,
    PlateauBaseline,
    hypergradient_step,
    make_baseline,
    warmup_cosine,
)
from qan_ray.env import TargetTrainingEnv
from qan_ray.evaluate import (
    baseline_config,
    eval_seeds,
    markdown_table,
    run_baselines,
    run_schedule,
    summarise,
)
from qan_ray.trainer import TargetTrainer

SEED = 1_000_000


def _env(**changes) -> TargetTrainingEnv:
    return TargetTrainingEnv(baseline_config(from_dict(device="cpu", **changes)))


def test_warmup_cosine_rises_linearly_then_falls_as_a_cosine():
    s = warmup_cosine(0.1, warmup=0.1)
    assert [s(p) for p in (0.0, 0.05, 0.1)] == pytest.approx([0.01, 0.055, 0.1])
    assert s(0.55) == pytest.approx(0.05) and s(1.0) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="`warmup` is 1.0; it must lie in"):
        warmup_cosine(0.1, warmup=1.0)


def test_warmup_cosine_lr_path_through_the_env_rises_then_falls():
    env = _env(epochs_per_episode=4)
    lrs = [r["lr"] for r in run_schedule(env, "warmup_cosine", 0.05, SEED)[1:]]
    peak = lrs.index(max(lrs))
    assert lrs[0] == pytest.approx(0.005)  # 0.1 x the task LR at progress 0
    assert 0 < peak <= 2 and max(lrs) <= 0.05 + 1e-12  # warm-up: 5% of 15 control points
    assert all(a < b for a, b in zip(lrs[:peak], lrs[1:peak + 1]))
    assert all(a > b for a, b in zip(lrs[peak:], lrs[peak + 1:]))


def test_plateau_is_torchs_scheduler_and_waits_for_patience():
    tr = TargetTrainer(from_dict(device="cpu"))
    base = PlateauBaseline(0.05, factor=0.5, patience=2)
    path = [base.next_lr(tr, {"val_loss": v}) for v in (1.0, 1.0, 1.0, 1.0, 0.5, 0.5)]
    assert isinstance(base.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
    first = base.scheduler.optimizer
    # 1 sets the best, two non-improving points are within patience, the third reduces
    assert path == pytest.approx([0.05, 0.05, 0.05, 0.025, 0.025, 0.025])
    tr.reset(1)  # a new episode: the rule restarts from its LR on the fresh optimizer
    assert base.next_lr(tr, {"val_loss": 9.0}) == pytest.approx(0.05)
    assert base.scheduler.optimizer is not first  # a fresh scheduler state for the episode


def test_plateau_lr_path_through_the_env_reduces_only_after_patience():
    env = _env(lr=0.5, epochs_per_episode=4)
    recs = run_schedule(env, "plateau", 0.5, SEED)
    lrs, vals = [r["lr"] for r in recs], [r["val_loss"] for r in recs]
    # oracle: ReduceLROnPlateau(mode=min, factor 0.5, patience 2, rel threshold 1e-4) fed the
    # val loss seen at each control point, the LR it sets used in the next interval
    best, bad, lr, expected = math.inf, 0, 0.5, []
    for v in vals[:-1]:
        if v < best * (1 - 1e-4):
            best, bad = v, 0
        else:
            bad += 1
        if bad > 2:
            lr, bad = lr * 0.5, 0
        expected.append(lr)
    assert lrs[1:] == pytest.approx(expected)
    assert min(lrs) < 0.5  # this run does plateau and gets reduced


def test_hypergradient_step_moves_the_lr_with_the_gradient_agreement():
    g = torch.tensor([1.0, 2.0])
    assert hypergradient_step(0.1, g, None, 0.01) == 0.1  # no previous gradient yet
    assert hypergradient_step(0.1, g, g, 0.01) == pytest.approx(0.1 + 0.01 * 5)  # agree: up
    assert hypergradient_step(0.1, g, -g, 0.01) == pytest.approx(0.1 - 0.01 * 5)  # oppose: down
    assert hypergradient_step(0.1, g, torch.tensor([2.0, -1.0]), 0.01) == 0.1  # orthogonal
    assert hypergradient_step(0.1, g, torch.tensor([math.nan, 0.0]), 0.01) == 0.1


def test_hypergradient_baseline_uses_the_interval_gradients_of_the_real_trainer():
    tr = TargetTrainer(from_dict(device="cpu", lr=0.005, momentum=0.0))
    hd = HypergradientBaseline(0.005, beta=1e-3)

    def flat():
        return torch.cat([p.detach().flatten() for p in tr.model.parameters()])

    w0 = flat()
    assert hd.next_lr(tr, {}) == 0.005  # step 0
    tr.train(10)
    w1 = flat()
    assert hd.next_lr(tr, {}) == 0.005  # one interval: no previous gradient
    tr.train(10)
    w2 = flat()
    g1, g2 = -(w1 - w0) / (10 * 0.005), -(w2 - w1) / (10 * 0.005)
    expected = 0.005 + 1e-3 * 10 * float(torch.dot(g2.double(), g1.double()))
    assert hd.next_lr(tr, {}) == pytest.approx(expected, rel=1e-4)
    assert expected > 0.005  # plain SGD at a small LR keeps going the same way


def test_hypergradient_lr_path_through_the_env_rises_from_a_small_lr():
    recs = run_schedule(_env(lr=0.005, epochs_per_episode=2), "hypergradient", 0.005, SEED)
    lrs = [r["lr"] for r in recs[1:]]
    assert lrs[:2] == [0.005, 0.005]  # the first two control points keep the start LR
    assert all(b > a for a, b in zip(lrs[1:], lrs[2:])) and lrs[-1] > 0.01


def test_make_baseline_knows_every_baseline_and_rejects_others():
    assert set(BASELINES) == {"fixed", "step", "cosine", "warmup_cosine", "plateau",
                              "hypergradient"}
    tr = TargetTrainer(from_dict(device="cpu"))
    assert make_baseline("fixed", 0.02).next_lr(tr, {}) == 0.02
    with pytest.raises(ValueError, match="baseline 'adagrad' must be one of"):
        make_baseline("adagrad", 0.1)


def test_run_baselines_adds_the_adaptive_baselines_from_the_task_lr():
    cfg = from_dict(device="cpu", epochs_per_episode=0.5, lr=0.05)
    runs, best_lr = run_baselines(cfg, seeds=1, lr_grid=(0.05,), log=lambda *_: None)
    assert set(runs.by_method) == {"fixed@0.05", "step@0.05", "cosine@0.05",
                                   "warmup_cosine@0.05", "plateau@0.05", "hypergradient@0.05"}
    for method in ("warmup_cosine@0.05", "plateau@0.05", "hypergradient@0.05"):
        (run,) = runs.by_method[method]
        assert run["recs"][0]["lr"] == pytest.approx(0.05)  # the controller's start
        assert 0 < run["final_val_accuracy"] <= 1
    assert runs.by_method["warmup_cosine@0.05"][0]["recs"][1]["lr"] == pytest.approx(0.005)
    result = summarise(runs)
    result.update(seeds=eval_seeds(1), total_batches=18)
    table = markdown_table(result, cfg)
    assert "| final LR |" in table
    row = next(line for line in table.splitlines() if line.startswith("| plateau@0.05"))
    assert "| 0.05 |" in row  # half an epoch: no plateau yet, the LR is still the start LR
