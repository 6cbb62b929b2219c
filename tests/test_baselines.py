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
from qan_ray.schedules import warmup_cosine
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


def test_plateau_reduces_by_factor_exactly_after_patience_non_improving_points():
    """A synthetic val-loss sequence, so the path is known exactly (no training trajectory)."""
    tr = TargetTrainer(from_dict(device="cpu", lr_min=1e-3))
    base = PlateauBaseline(0.05, factor=0.1, patience=1)
    # 2 sets the best; 2.5 is bad 1 (within patience 1); 1.9999 improves by less than the
    # relative threshold 1e-4, so it is bad 2 > 1: x0.1; 1.5 improves; then two bad points
    # reduce again, and two more would reach 0.05 x 0.001 but the trainer's lr_min (1e-3) holds
    path = [base.next_lr(tr, {"val_loss": v})
            for v in (2.0, 2.5, 1.9999, 1.5, 1.5, 1.5, 1.5, 1.5, 1.5, 1.5)]
    assert path == pytest.approx([0.05, 0.05, 0.005, 0.005, 0.005, 0.001, 0.001, 0.001, 0.001,
                                  0.001], rel=1e-9)
    keep = PlateauBaseline(0.05)  # a NaN or missing val loss is no decision: never a reduction
    assert [keep.next_lr(tr, info) for info in ({"val_loss": 1.0}, {"val_loss": math.nan}, {},
                                                {"val_loss": math.inf}, {"val_loss": math.nan})
            ] == [0.05] * 5


# val loss at reset and after each of the 14 control steps of a 4-epoch episode; the LR each
# point sets (patience 2, factor 0.5, rel threshold 1e-4) is used in the next interval
SCRIPTED_VAL = (2.0, 1.8, 1.8, 1.79999, 1.9, 1.9, 1.9, 1.7, 1.7, 1.7, 1.7, 1.7, 1.7, 1.7, 1.7)
SCRIPTED_LR = (0.05,  # the start LR, at reset
               0.05, 0.05, 0.05,  # best 2.0, then 1.8 improves, then bad 1 (1.8)
               0.05,  # bad 2 (1.79999 improves by 5.6e-6 < the threshold)
               0.025,  # bad 3 > patience: x0.5, the count restarts
               0.025, 0.025,  # bad 1, bad 2
               0.025, 0.025, 0.025,  # 1.7 improves just before it would reduce: 0, 1, 2
               0.0125, 0.0125, 0.0125,  # bad 3: x0.5; bad 1, bad 2
               0.00625)  # bad 3: x0.5 (the last val loss sets no LR: the episode ends)


def test_plateau_lr_path_through_the_env_reduces_only_after_patience():
    """The env's rollout feeds the baseline each control point's val loss and trains the next
    interval at the LR it returns. The val losses are scripted (the trainer still trains), so
    the path cannot depend on the float trajectory of the run."""
    env = _env(epochs_per_episode=4)
    assert env.total_steps == 14 and env.cfg.lr == 0.05
    script = iter(SCRIPTED_VAL)
    env.trainer.evaluate = lambda split="val": (next(script), 0.5)
    recs = run_schedule(env, "plateau", 0.05, SEED)
    assert next(script, None) is None  # one val loss per control point, all of them used
    assert [r["val_loss"] for r in recs] == list(SCRIPTED_VAL)
    assert [r["lr"] for r in recs] == pytest.approx(SCRIPTED_LR, rel=1e-6)
    assert [r["batches"] for r in recs] == list(range(0, 141, 10))
    assert env.trainer.lr == pytest.approx(0.00625, rel=1e-6)  # what the optimizer holds


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
    lr_free = {m for m in runs.by_method if m.split("@")[0] in ("prodigy", "schedulefree",
                                                                 "dadapt")}
    assert set(runs.by_method) - lr_free == {"fixed@0.05", "step@0.05", "cosine@0.05",
                                             "warmup_cosine@0.05", "plateau@0.05",
                                             "hypergradient@0.05"}
    assert {m.split("@")[0] for m in lr_free} == {"prodigy", "schedulefree", "dadapt"}
    assert best_lr == 0.05
    # half an epoch = 18 batches = 2 control steps of 10 (the last one 8): the reset record
    # and one per step; the LR each record holds is the one the baseline set at the point
    # before it, so every path is fixed by the baselines' rules, not by the run
    progress = 10 / 18  # at the second control point
    expected_lrs = {
        "fixed@0.05": [0.05, 0.05, 0.05],
        "step@0.05": [0.05, 0.05, 0.005],  # x0.1 from the milestone at half the episode
        "cosine@0.05": [0.05, 0.05, 0.025 * (1 + math.cos(math.pi * progress))],
        "warmup_cosine@0.05": [0.05, 0.005, warmup_cosine(0.05)(progress)],
        "plateau@0.05": [0.05, 0.05, 0.05],  # no reduction can come before patience + 1 points
        "hypergradient@0.05": [0.05, 0.05, 0.05],  # the first two control points keep lr0
    }
    for method, lrs in expected_lrs.items():
        (run,) = runs.by_method[method]
        recs = run["recs"]
        assert [r["batches"] for r in recs] == [0, 10, 18], method
        assert [r["action"] for r in recs][0] == -1 and run["seed"] == SEED
        assert [r["lr"] for r in recs] == pytest.approx(lrs, rel=1e-6), method
        assert run["final_val_accuracy"] == recs[-1]["val_accuracy"] and not run["diverged"]
    for method in ("fixed@0.05", "plateau@0.05", "hypergradient@0.05"):
        recs = runs.by_method[method][0]["recs"]
        # 18 batches at 0.05 with momentum 0.9 always cut the val loss a lot (2.35 -> 0.79 on
        # x86): a factor of 0.6 is far outside anything float rounding can move
        assert recs[-1]["val_loss"] < 0.6 * recs[0]["val_loss"], method
    result = summarise(runs)
    result.update(seeds=eval_seeds(1), total_batches=18)
    table = markdown_table(result, cfg)
    assert "| final LR |" in table
    row = next(line for line in table.splitlines() if line.startswith("| plateau@0.05"))
    assert "| 0.05 |" in row  # half an epoch: no plateau yet, the LR is still the start LR
