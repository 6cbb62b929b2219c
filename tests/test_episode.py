"""The one control step (qan_ray.episode): each rule on plain numbers, and the surfaces that
share it (env, population vector env, run_schedules, QANScheduler's LR) agreeing with it."""

from __future__ import annotations

import math

import numpy as np
import pytest

from qan_ray.config import from_dict
from qan_ray.constants import (
    EVAL_SEED_BASE,
    NUM_CLASSES,
    SELECTION_SEED_BASE,
    at_chance,
    episode_seed,
    eval_seed,
    run_seed,
    selection_seed,
)
from qan_ray.contract import action_spec
from qan_ray.episode import Episodes, dying, next_lr, start_lr
from qan_ray.rewards import diverged
from qan_ray.schedules import cosine_factor

CFG = from_dict(task="digits-mlp", device="cpu")


def test_start_lr_is_the_config_lr_or_a_seeded_log_uniform_draw():
    assert start_lr(CFG, 7) == CFG.lr
    cfg = CFG.replace(lr_init_range=(1e-4, 1.0))
    draws = [start_lr(cfg, s) for s in range(200)]
    assert draws == [start_lr(cfg, s) for s in range(200)]  # a function of the seed alone
    assert all(1e-4 <= d <= 1.0 for d in draws)
    logs = np.log10(draws)  # log-uniform: every decade of the four is drawn
    assert all(((logs >= lo) & (logs < lo + 1)).any() for lo in (-4, -3, -2, -1))
    assert start_lr(cfg, 3) == math.exp(np.random.default_rng(3).uniform(math.log(1e-4), 0.0))


def test_diverged_is_nonfinite_or_above_factor_times_initial_loss():
    got = diverged([1.0, 10.0, 10.0001, math.nan, math.inf, -math.inf], 1.0, 10.0)
    assert got.tolist() == [False, False, True, True, True, True]
    assert diverged([5.0, 5.0], [2.0, 0.4], 3.0).tolist() == [False, True]


def test_next_lr_constant_multiplies_and_clamps():
    rule = action_spec(CFG)  # factors (0.5, 0.9, 1.0, 1.1, 2.0), LR in [1e-5, 1]
    for action, factor in enumerate(rule.lr_factors):
        lr, c = next_lr(rule, action, lr=0.1, correction=1.0, start=0.1, progress=0.5)
        assert (lr, c) == (pytest.approx(0.1 * factor), 1.0)
    assert next_lr(rule, 4, lr=0.8, correction=1.0, start=0.1, progress=0.0)[0] == rule.lr_max
    with pytest.raises(ValueError, match="action 9 is outside 0..4"):
        next_lr(rule, 9, lr=0.1, correction=1.0, start=0.1, progress=0.0)


def test_next_lr_cosine_keep_is_plain_cosine_and_actions_scale_the_correction():
    rule = action_spec(CFG.replace(lr_schedule="cosine"))
    keep = rule.keep_action
    c, lrs = 1.0, []
    for p in (0.0, 0.25, 0.5, 0.75):
        lr, c = next_lr(rule, keep, lr=123.0, correction=c, start=0.2, progress=p)
        lrs.append(lr)
    assert c == 1.0 and lrs == [0.2 * cosine_factor(p) for p in (0.0, 0.25, 0.5, 0.75)]
    lr, c = next_lr(rule, 4, lr=0.2, correction=1.0, start=0.2, progress=0.5)  # x2
    assert c == 2.0 and lr == pytest.approx(0.2 * 2.0 * 0.5)
    lr, c = next_lr(rule, 0, lr=lr, correction=c, start=0.2, progress=0.5)  # x0.5 undoes it
    assert c == 1.0 and lr == pytest.approx(0.1)


def test_minibatch_actions_leave_the_lr_alone():
    rule = action_spec(CFG.replace(action_mode="minibatch"))
    assert next_lr(rule, 4, lr=0.05, correction=1.0, start=0.05, progress=0.3) == (0.05, 1.0)


def _episodes(**kw) -> Episodes:
    cfg = CFG.replace(**kw)
    ep = Episodes(cfg, 3, total_batches=4 * cfg.control_interval)
    for i in range(3):
        ep.start(i, 0.1, 2.3, 2.3, 0.1)
    return ep


def test_step_pays_log_loss_and_penalises_divergence_without_raising():
    ep = _episodes(divergence_penalty=7.0, divergence_factor=10.0, guard=False)
    rewards, ended, div, _ = ep.step([0, 1, 2], [1.0, math.nan, 30.0], [1.1, 1.0, 1.0],
                                  [0.7, 0.7, 0.7], [2.3, 2.3, 2.3], [False] * 3)
    assert rewards[0] == pytest.approx(math.log(2.3) - math.log(1.0))
    assert rewards[1:].tolist() == [-7.0, -7.0] and ended.tolist() == [False, True, True]
    assert div.tolist() == [False, True, True]
    assert math.isnan(ep.last[1]["val_loss"]) and ep.last[1]["val_accuracy"] == 0.0
    assert ep.t.tolist() == [1, 1, 1]


def test_step_only_touches_the_members_given():
    ep = _episodes()
    rewards, ended, _, _ = ep.step([1], [1.0, 1.0, 1.0], [1.0] * 3, [0.5] * 3, [2.3] * 3,
                                [True] * 3)
    assert ep.t.tolist() == [0, 1, 0] and ended.tolist() == [False, True, False]
    assert rewards[0] == rewards[2] == 0.0 and ep.last[0]["train_loss"] == 2.3


def test_the_last_step_pays_the_terminal_reward_and_the_chance_penalty():
    ep = _episodes(reward="final_val", divergence_penalty=6.0)  # chance penalty: 6 / 2
    rewards, ended, _, _ = ep.step([0, 1], [1.0, 1.0, 1.0], [0.5, 2.2, 2.2], [0.9, 0.11, 0.5],
                                [2.3] * 3, [True, True, False])
    assert ended.tolist() == [True, True, False]
    assert rewards[0] == pytest.approx(math.log(2.3 / 0.5))  # final_val, not at chance
    assert rewards[1] == pytest.approx(math.log(2.3 / 2.2) - 3.0)  # at chance: penalised


def test_time_to_target_ends_early_when_the_target_is_reached():
    ep = _episodes(reward="time_to_target", target_accuracy=0.8, chance_penalty=0.0,
                   chance_step_penalty=0.0)
    rewards, ended, _, _ = ep.step([0, 1], [1.0] * 3, [1.0] * 3, [0.85, 0.5, 0.5], [2.3] * 3,
                                [False] * 3)
    assert ended.tolist() == [True, False, False]
    assert rewards[:2].tolist() == [pytest.approx(-1 / 4)] * 2


def test_a_step_at_chance_pays_the_chance_step_penalty():
    ep = _episodes(chance_step_penalty=0.25)
    rewards, ended, _, _ = ep.step([0, 1], [2.2] * 3, [2.2] * 3, [0.11, 0.5, 0.5], [2.3] * 3,
                                   [False] * 3)
    assert not ended.any()
    assert rewards[0] == pytest.approx(math.log(2.3 / 2.2) - 0.25)
    assert rewards[1] == pytest.approx(math.log(2.3 / 2.2))


def test_dying_is_a_rise_above_init_nonfinite_or_accuracy_lost_never_mere_slowness():
    # members: slow (just under init), train +3%, val +3%, NaN, lost (0.4 best -> 0.12), at
    # chance but never learned (a too-low LR: not dying)
    got = dying([2.29, 2.37, 2.2, math.nan, 2.0, 2.3], [2.30, 2.2, 2.37, 2.0, 2.2, 2.3],
                [0.1, 0.1, 0.1, 0.1, 0.12, 0.1], 2.3, 2.3, [0.1, 0.1, 0.1, 0.1, 0.4, 0.18])
    assert got.tolist() == [False, True, True, True, True, False]
    assert not dying([2.3 * 1.019], [2.0], [0.5], 2.3, 2.3, 0.5)[0]  # inside the 2% margin


def test_the_guard_rescues_a_dying_member_and_keeps_its_last_good_record():
    ep = _episodes(rescue_penalty=1.5, max_rescues=2)
    ep.step([0, 1, 2], [1.0] * 3, [1.0] * 3, [0.6] * 3, [2.3] * 3, [False] * 3)
    good = dict(ep.last[0])
    out = ep.step([0, 1], [math.nan, 2.5, 1.0], [math.nan, 2.6, 1.0], [0.0, 0.1, 0.6], [2.3] * 3,
                  [False] * 3)
    assert out.rescued.tolist() == [True, True, False] and not out.ended.any()
    assert out.rewards[:2].tolist() == [-1.5, -1.5] and not out.diverged.any()
    assert ep.last[0] == good and ep.rescues.tolist() == [1, 1, 0]
    ep.step([0], [math.nan] * 3, [1.0] * 3, [0.6] * 3, [2.3] * 3, [False] * 3)
    out = ep.step([0], [math.nan] * 3, [1.0] * 3, [0.6] * 3, [2.3] * 3, [False] * 3)
    assert not out.rescued[0] and out.diverged[0] and out.ended[0]  # max_rescues spent
    off = _episodes(guard=False)
    assert not off.step([0], [2.5] * 3, [2.6] * 3, [0.1] * 3, [2.3] * 3, [False] * 3).rescued[0]


def test_a_rescue_cuts_the_lr_or_the_cosine_correction_by_the_rescue_factor():
    ep = _episodes(rescue_factor=0.1)
    assert ep.cut_lrs([0.5, 0.3, 0.2], [0.5] * 3, [0, 2]).tolist() == [
        pytest.approx(0.05), 0.3, pytest.approx(0.02)]
    cos = _episodes(lr_schedule="cosine", rescue_factor=0.1)
    lrs = cos.cut_lrs([0.1] * 3, [0.5] * 3, [1])
    assert cos.correction.tolist() == [1.0, pytest.approx(0.1), 1.0]
    assert lrs[1] == pytest.approx(0.1 * 0.1 * 0.5) and lrs[0] == 0.1


def test_the_first_decision_is_keep():
    ep = _episodes()
    lrs = ep.lrs_after([4, 4, 0], [0.1] * 3, [0.0] * 3, [0, 1, 2])  # x2, x2, x0.5 ignored
    assert lrs.tolist() == [0.1, 0.1, 0.1]
    ep.step([0, 1, 2], [1.0] * 3, [1.0] * 3, [0.6] * 3, [2.3] * 3, [False] * 3)
    assert ep.lrs_after([4, 4, 0], [0.1] * 3, [0.3] * 3, [0, 1, 2]).tolist() == [
        pytest.approx(0.2), pytest.approx(0.2), pytest.approx(0.05)]


def test_chance_and_seed_formulas_are_the_constants():
    assert NUM_CLASSES == 10 and at_chance(0.12) and not at_chance(0.1201)
    assert at_chance(math.nan)
    assert run_seed(5, 3) == 8 and eval_seed(2) == EVAL_SEED_BASE + 2
    assert selection_seed(0) == SELECTION_SEED_BASE
    train = {episode_seed(m, i) for m in range(3) for i in range(1000)}
    held_out = {eval_seed(i) for i in range(1000)} | {selection_seed(i) for i in range(1000)}
    assert len(train) == 3000 and not train & held_out
    with pytest.raises(ValueError, match="both must be >= 0"):
        episode_seed(-1, 0)


def test_env_and_vector_env_follow_the_same_episode_rules():
    """The env (K = 1) and a population vector env at K = 3, fed the same actions from the same
    seeds, give member 0 the same LRs, rewards and ends (both call qan_ray.episode)."""
    from qan_ray.env import TargetTrainingEnv
    from qan_ray.vector_env import PopulationVectorEnv

    conf = {"task": "digits-mlp", "device": "cpu", "epochs_per_episode": 1.0,
            "control_interval": 7, "lr_schedule": "cosine", "lr_init_range": [0.01, 0.05],
            "reward": "final_val"}
    env = TargetTrainingEnv(conf)
    venv = PopulationVectorEnv({**conf, "num_envs": 3})
    _, info = env.reset(seed=11)
    _, vinfo = venv.reset(options={"seeds": [11, 12, 13]})
    assert vinfo["lr"][0] == pytest.approx(info["lr"])
    for action in (0, 4, 2, 4, 0):  # 35 batches = 5 steps of 7; the first is keep
        _, r, term, _, info = env.step(action)
        _, vr, vterm, _, vinfo = venv.step(np.array([action, 2, 2]))
        assert vinfo["lr"][0] == pytest.approx(info["lr"], rel=1e-9)
        assert vr[0] == pytest.approx(r, rel=1e-3, abs=1e-4) and vterm[0] == term
    assert term and abs(r) > 0.05  # the last step paid final_val
    assert env.episodes.correction[0] == venv.episodes.correction[0] == 2.0


def test_evaluate_counts_dead_runs_and_rescues_per_method():
    from qan_ray.evaluate import Runs, markdown_table, summarise

    def recs(final_acc, rescues):
        return [{"batches": 0, "val_accuracy": 0.1, "val_loss": 2.3, "train_loss": 2.3,
                 "lr": 0.1, "action": -1},
                {"batches": 10, "val_accuracy": final_acc, "val_loss": 1.0, "train_loss": 1.0,
                 "lr": 0.01, "action": 2, "rescued": rescues > 0, "rescues": rescues}]

    runs = Runs()
    for seed, (acc, resc) in enumerate([(0.9, 2), (0.149, 0), (0.95, 1)]):
        runs.add_records("qan", seed, recs(acc, resc), acc, 1.0)
    for seed, acc in enumerate([0.12, 0.151, 0.8]):
        runs.add_records("fixed@0.1", seed, recs(acc, 0), acc, 1.0)
    result = summarise(runs)
    rows = {r["method"]: r for r in result["summary"]}
    assert (rows["qan"]["dead"], rows["qan"]["rescues"]) == (1, 3)
    assert (rows["fixed@0.1"]["dead"], rows["fixed@0.1"]["rescues"]) == (1, 0)  # 0.151 lives
    result.update(seeds=[0, 1, 2], total_batches=10)
    table = markdown_table(result, CFG)
    assert "| dead runs | rescues |" in table and "| 1/3 | 3 |" in table
    assert sum(c["rescued"] for c in result["curves"]) == 2


def test_evaluate_table_says_which_runs_diverged():
    from qan_ray.evaluate import Runs, markdown_table, summarise

    def recs(acc, diverged):
        return [{"batches": 0, "val_accuracy": 0.1, "val_loss": 2.3, "train_loss": 2.3,
                 "lr": 1.0, "action": -1},
                {"batches": 10, "val_accuracy": acc, "val_loss": 1.0, "train_loss": 1.0,
                 "lr": 1.0, "action": 2, "diverged": diverged}]

    runs = Runs()
    for seed, (acc, div) in enumerate([(0.0, True), (0.0, True), (0.9, False)]):
        runs.add_records("fixed@1", seed, recs(acc, div), acc, 1.0)
    for seed in range(3):
        runs.add_records("cosine@1", seed, recs(0.9, False), 0.9, 1.0)
    result = summarise(runs)
    result.update(seeds=[0, 1, 2], total_batches=10)
    rows = {line.split(" |")[0]: line for line in markdown_table(result, CFG).splitlines()}
    assert "(diverged 2/3) |" in rows["| fixed@1"] and "diverged" not in rows["| cosine@1 (best)"]
    assert rows["| fixed@1"].count("|") == rows["| cosine@1 (best)"].count("|")  # same columns
