"""RLlib's real DQN learner over real Ray trainer actors (one Ray session; the tests that use it
are marked `ray` by conftest.py), and the pure parts of meta-training (no Ray)."""

from __future__ import annotations

import argparse
import json
import os
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from qan_ray.config import from_dict
from qan_ray.records import STEP_SCHEMA, read_parts

QAN = from_dict(task="digits-mlp", epochs_per_episode=1.0)  # 35 batches -> 4 control steps


def _meta(**kw):
    from qan_ray.meta import MetaConfig

    base = dict(episodes=4, num_actors=2, cpus_per_actor=0.5, learning_starts=8,
                training_intensity=16.0, train_batch_size=32, hidden=(16, 16), select_every=2,
                select_seeds=1)
    return MetaConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def run(ray_session, tmp_path_factory):
    from qan_ray.meta import MetaTrainer

    out = tmp_path_factory.mktemp("meta") / "run"
    mt = MetaTrainer(QAN, _meta(), out, log=lambda *_: None)
    mt.selections = []  # (episode, score) of every selection the loop makes
    select = mt.select

    def recorded_select() -> float:
        score = select()
        mt.selections.append((mt.progress["episodes"], score))
        return score

    mt.select = recorded_select
    yield mt
    mt.stop()


def test_a_controller_exported_before_any_dqn_update_says_so_in_spec_and_on_screen(run):
    """Before the DQN's first update (nothing sampled yet: fewer steps than learning_starts) the
    exported Q-network is its random initialisation: spec.json's provenance says so (the DQN's
    counters and a warning), and so does the screen. Runs first on the module's run."""
    from policies.qnet import load_controller

    said: list[str] = []
    log, run.log = run.log, said.append
    try:
        folder = run.export_controller()
    finally:
        run.log = log
    provenance = load_controller(folder).spec.provenance
    assert provenance["dqn"] == {"sampled_steps": 0, "learning_starts": 8,
                                 "trained_transitions": 0, "updated": False,
                                 "replay_ratio": 16.0, "train_batch_size": 32}
    assert provenance["warning"].startswith("NEVER UPDATED: the DQN sampled 0 control steps, "
                                            "fewer than learning_starts 8")
    assert any("WARNING" in line and "NEVER UPDATED" in line and str(folder) in line
               for line in said)
    assert run.updated is False


def _learner_state(algo):
    from ray.rllib.core import DEFAULT_MODULE_ID

    return algo.learner_group.get_weights()[DEFAULT_MODULE_ID]


def test_one_dqn_iteration_consumes_transitions_from_two_actors(run):
    algo = run.algo
    before = {k: np.array(v) for k, v in _learner_state(algo).items()}
    episodes = []
    result = {}
    while len(episodes) < 2 or result.get("learners", {}).get("default_policy", {}).get(
            "qf_loss") is None:
        result = algo.train()
        episodes += run.drain()
    run._flush(episodes, result, 0, 0.0)
    actors = {rows[-1]["actor"] for rows in episodes}
    assert len(actors) == 2  # both trainer actors delivered finished episodes
    sampled = result["env_runners"]["num_env_steps_sampled_lifetime"]
    assert sampled >= 2 * run.steps_per_episode
    assert result["learners"]["__all_modules__"]["num_module_steps_trained_lifetime"] > 0
    after = _learner_state(algo)
    changed = [k for k in before if not k.startswith("_target")
               and not np.allclose(before[k], np.asarray(after[k]))]
    assert changed  # the learner updated the Q-network
    runner_states = algo.env_runner_group.foreach_env_runner(
        lambda er: er.module.get_state(), local_env_runner=False)
    assert len(runner_states) == 2
    for state in runner_states:  # ...and the new weights reached the acting EnvRunners
        for k, v in state.items():
            assert np.allclose(np.asarray(v), np.asarray(after[k]))


def test_parquet_log_has_schema_and_one_row_per_control_step(run):
    run.train()  # up to meta.episodes, flushing each finished episode
    table = read_parts(run.out / "steps")
    assert table.schema == STEP_SCHEMA
    rows = table.to_pylist()
    episodes = sorted({r["episode"] for r in rows})
    assert episodes == list(range(run.progress["episodes"]))
    assert run.progress["episodes"] >= 4
    for ep in episodes:
        steps = sorted(r["step"] for r in rows if r["episode"] == ep)
        assert steps == list(range(run.steps_per_episode + 1))  # step 0 = state after reset
    acted = [r for r in rows if r["action"] >= 0]
    assert all(len(r["q_values"]) == QAN.num_actions for r in acted)
    assert all(r["action"] < QAN.num_actions and r["lr"] > 0 for r in acted)


def test_exported_controller_matches_rllib_q_values(run):
    from ray.rllib.core import DEFAULT_MODULE_ID
    from ray.rllib.core.columns import Columns

    from policies.qnet import load_controller

    run.export_controller()
    ctrl = load_controller(run.out / "controller_last")  # the learner's current network
    assert ctrl.spec.obs_size == run.obs_size and tuple(ctrl.spec.hidden) == (16, 16)
    obs = np.random.default_rng(0).normal(size=(5, run.obs_size)).astype(np.float32)
    module = run.algo.get_module(DEFAULT_MODULE_ID)
    with torch.no_grad():
        q = module.compute_q_values({Columns.OBS: torch.from_numpy(obs)})["qf_preds"].numpy()
    assert np.allclose(ctrl.q_values(obs), q, atol=1e-5)
    assert [ctrl.act(o) for o in obs] == list(q.argmax(axis=1))
    assert (run.out / "learning_curve.png").stat().st_size > 0
    dqn = ctrl.spec.provenance["dqn"]  # trained: the provenance says how much, and no warning
    assert dqn["updated"] and dqn["trained_transitions"] > 0 and dqn["sampled_steps"] >= 8
    assert "warning" not in ctrl.spec.provenance and run.updated


class _Selector:
    """Stands in for the selection actor: its greedy runs score `accs`."""

    def __init__(self, accs: list[float]):
        import ray

        self.greedy_final_accuracy = SimpleNamespace(remote=lambda *_: ray.put(accs))


def test_model_selection_keeps_the_best_greedy_controller(run):
    import ray

    from policies.qnet import load_controller
    from qan_ray.meta import SELECTION_SEED_BASE

    best = run.progress["best"]
    assert 2 <= best["episode"] <= run.progress["episodes"] and 0.0 <= best["score"] <= 1.0
    # the best of the selections the loop made (the first one on a tie)
    assert run.selections
    top = max(score for _, score in run.selections)
    assert best == {"score": top, "episode": min(e for e, s in run.selections if s == top)}
    chosen = load_controller(run.out)  # controller/ = the selected one
    assert chosen.spec.provenance["selection"] == best
    # Re-running the chosen controller on the selection seed reproduces its recorded score.
    accs = ray.get(run._selector.greedy_final_accuracy.remote(
        chosen.net.state_dict(), chosen.spec.to_dict(), [SELECTION_SEED_BASE]))
    assert accs == [best["score"]]
    # The decision itself, on scores we choose: a worse controller is not kept, a better one is.
    selector, saved = run._selector, run.out / "controller.saved"
    shutil.copytree(run.out / "controller", saved)
    try:
        worse, better = best["score"] / 2, best["score"] + 0.25
        run._selector = _Selector([worse])
        assert run.select() == worse
        assert run.progress["best"] == best
        assert load_controller(run.out).spec.provenance["selection"] == best
        run._selector = _Selector([better])
        assert run.select() == better
        now = {"score": better, "episode": run.progress["episodes"]}
        assert run.progress["best"] == now
        assert load_controller(run.out).spec.provenance["selection"] == now
    finally:  # the fixture's run goes on with its real selection
        run._selector, run.progress["best"] = selector, best
        shutil.rmtree(run.out / "controller")
        os.replace(saved, run.out / "controller")


def test_killed_actor_is_replaced_and_finished_episodes_survive(run):
    import ray

    from qan_ray.actors import ACTOR_NAMESPACE

    logged_before = read_parts(run.out / "steps").num_rows
    names = [r["actor"] for r in read_parts(run.out / "steps").to_pylist()]
    victim_name = sorted(set(names))[0]
    victim = ray.get_actor(victim_name, namespace=ACTOR_NAMESPACE)
    ray.kill(victim, no_restart=True)
    run.train(until=run.progress["episodes"] + 3)
    assert read_parts(run.out / "steps").num_rows > logged_before
    replacements = run.algo.env_runner_group.foreach_env_runner(
        lambda er: er.env.unwrapped.envs[0].unwrapped.replacements, local_env_runner=False)
    assert sorted(replacements) == [0, 1]
    replacement = ray.get_actor(f"{victim_name}-r1", namespace=ACTOR_NAMESPACE)
    assert replacement._actor_id != victim._actor_id
    rows = read_parts(run.out / "steps").to_pylist()
    cut = [r for r in rows if r["truncated"]]
    # the kill lands mid-episode (a cut, flagged episode) or at a reset (no cut)
    assert all(r["episode"] is None and r["actor"] == victim_name for r in cut)
    full = {(r["episode"], r["global_episode"], r["seed"]) for r in rows if not r["truncated"]}
    indices = [g for _, g, _ in full] + sorted({r["global_episode"] for r in cut})
    assert len(indices) == len(set(indices))  # the replacement never repeats an episode


def _train_args(*argv: str) -> argparse.Namespace:
    from qan_ray.meta import configure_train

    parser = argparse.ArgumentParser()
    configure_train(parser)
    return parser.parse_args(list(argv))


def test_resume_continues_the_count_and_keeps_the_epsilon_schedule(run, capsys, monkeypatch):
    """`qan train --resume --episodes N` on the run: it continues the episode count (its own and
    RLlib's) and keeps the exploration schedule of the original run; N moves the loop bound."""
    from qan_ray.meta import MetaTrainer, run_train

    run.save()
    done = run.progress["episodes"]
    rows_before = read_parts(run.out / "steps").num_rows
    run.stop()
    bound = json.loads((run.out / "config.json").read_text())["meta"]["episodes"]
    seen = {}
    train = MetaTrainer.train

    def spy(self, until=None):  # the resumed trainer, as restored and after its loop
        seen.update(trainer=self, start=self.progress["episodes"], meta=self.meta,
                    epsilon=self.algo.config.epsilon)
        seen["result"] = train(self, until)
        return seen["result"]

    monkeypatch.setattr(MetaTrainer, "train", spy)
    assert run_train(_train_args("--out", str(run.out), "--resume",
                                 "--episodes", str(done + 2))) == 0
    printed = capsys.readouterr().out
    assert f"resumed from {run.out / 'checkpoint'} at episode {done} " in printed
    assert "WARNING" not in printed and "NEVER UPDATED" not in printed  # RLlib's counters resumed
    assert seen["start"] == done
    assert (f"resume: --episodes {done + 2} (was {bound}) changes only the loop bound; the "
            "exploration schedule stays that of the original run.") in printed
    # the horizon of the original run (4 episodes), not of the new loop bound, in the restored
    # algorithm's own config (printed from it too)
    assert seen["meta"].explore_episodes == 4
    assert seen["epsilon"] == [(0, 1.0), (2 * run.steps_per_episode, 0.05)]
    steps = int(0.5 * 4 * run.steps_per_episode)
    assert (f"exploration: epsilon 1 -> 0.05 over the first {steps} control steps "
            "(explore_episodes 4, fixed when the run started)") in printed
    resumed = seen["trainer"]
    assert resumed.progress["episodes"] >= done + 2
    assert seen["result"]["env_runners"]["num_episodes_lifetime"] >= done + 2  # RLlib's count
    rows = read_parts(run.out / "steps").to_pylist()
    assert len(rows) > rows_before
    assert max(r["episode"] for r in rows if r["episode"] is not None) == (
        resumed.progress["episodes"] - 1)
    saved = json.loads((run.out / "config.json").read_text())["meta"]
    assert (saved["episodes"], saved["explore_episodes"]) == (done + 2, 4)
    assert json.loads((run.out / "progress.json").read_text())["episodes"] == (
        resumed.progress["episodes"])


def test_fresh_run_refuses_to_overwrite_an_existing_log(run):
    from qan_ray.meta import MetaTrainer

    with pytest.raises(ValueError, match="already holds a run; pass --resume"):
        MetaTrainer(QAN, _meta(), run.out, log=lambda *_: None)


def test_a_run_that_cannot_reach_learning_starts_is_named_with_both_numbers_and_the_fix():
    """issue 22: 4 episodes of a 5-step task sample 20 steps, below the default learning_starts
    100: the DQN would never update. The message names both numbers and fixes that work."""
    import dataclasses

    from qan_ray.meta import MetaConfig, learning_starts_problem

    meta = MetaConfig(episodes=4)
    assert meta.learning_starts == 100
    text = learning_starts_problem(meta, 5)
    assert ("--episodes 4 x 5 control steps per episode = 20 sampled steps, fewer than "
            "--learning-starts 100") in text
    assert "NEVER UPDATE" in text and "Fix: --episodes 40 or more, or --learning-starts 5" in text
    for fixed in (dataclasses.replace(meta, episodes=40), dataclasses.replace(meta,
                                                                              learning_starts=5)):
        assert learning_starts_problem(fixed, 5) is None
    assert learning_starts_problem(MetaConfig(episodes=20), 5) is None  # 100 steps: it updates
    assert learning_starts_problem(MetaConfig(episodes=12), 4) is not None  # the old user-task
    # command of docs/user_tasks.md; the one there now learns (its task: 4 steps per episode)
    import re
    from pathlib import Path

    from qan_ray.distribution import load_config
    from qan_ray.env import TargetTrainingEnv

    doc = (Path(__file__).parent.parent / "docs" / "user_tasks.md").read_text()
    command = re.search(r"qan train +--task digits_cnn:make_task(.*?)--out", doc, re.S).group(1)
    flags = dict(re.findall(r"--(episodes|learning-starts) (\d+)", command))
    steps = TargetTrainingEnv(load_config(task="user_task_example:make_task")).total_steps
    documented = MetaConfig(episodes=int(flags.get("episodes", MetaConfig.episodes)),
                            learning_starts=int(flags.get("learning-starts", 100)))
    assert steps == 4 and learning_starts_problem(documented, steps) is None
    assert documented.episodes * steps >= 2 * documented.learning_starts  # half the run learns


def test_meta_config_rejects_bad_values():
    from qan_ray.meta import MetaConfig

    with pytest.raises(ValueError, match="`num_actors` is 0; it must be an integer >= 1"):
        MetaConfig(num_actors=0).validate()
    with pytest.raises(ValueError, match="`gpus_per_actor` is 1.5"):
        MetaConfig(gpus_per_actor=1.5).validate()
    with pytest.raises(ValueError, match="`explore_episodes` is 0; it must be an integer >= 1"):
        MetaConfig(explore_episodes=0).validate()


def test_epsilon_horizon_is_fixed_at_build_and_not_by_the_loop_bound():
    from qan_ray.meta import MetaConfig, build_dqn_config, epsilon_schedule

    steps = 4  # control steps per episode
    assert epsilon_schedule(MetaConfig(episodes=4), steps) == [(0, 1.0), (8, 0.05)]
    # a run meant for 20 episodes but trained in chunks of 4 decays over all 20 (0.5 x 20 x 4)
    chunked = MetaConfig(episodes=4, explore_episodes=20, epsilon_final=0.1)
    assert epsilon_schedule(chunked, steps) == [(0, 1.0), (40, 0.1)]
    cfg = build_dqn_config(QAN, chunked, "t", steps)  # the real DQNConfig (no Ray started)
    assert cfg.epsilon == [(0, 1.0), (40, 0.1)]
    assert build_dqn_config(QAN, MetaConfig(episodes=40, explore_episodes=20), "t",
                            steps).epsilon == [(0, 1.0), (40, 0.05)]


def test_resume_refuses_another_exploration_horizon(tmp_path):
    from qan_ray.meta import MetaConfig, run_train

    (tmp_path / "config.json").write_text(json.dumps(
        {"qan": QAN.to_dict(), "meta": {**MetaConfig().__dict__, "hidden": [64, 64],
                                        "explore_episodes": 4}}))
    with pytest.raises(ValueError, match="--explore-episodes is 8 but the run in .* explores "
                                         "over 4 episodes; the schedule is fixed when a run "
                                         "starts"):
        run_train(_train_args("--out", str(tmp_path), "--resume", "--explore-episodes", "8"))


@pytest.mark.parametrize("population", [1, 4])
def test_training_intensity_keeps_its_replay_ratio_with_a_population(population):
    # RLlib's round: each of N runners samples rollout_fragment_length x K steps; the learner
    # makes weights[1] updates of train_batch_size per weights[0] rounds.
    from ray.rllib.algorithms.dqn.dqn import calculate_rr_weights

    from qan_ray.meta import build_dqn_config

    meta = _meta(population=population, training_intensity=16.0)
    cfg = build_dqn_config(QAN, meta, "ratio", steps_per_episode=4)
    assert cfg.num_envs_per_env_runner == population
    assert cfg.gym_env_vectorize_mode == ("vector_entry_point" if population > 1 else "sync")
    stores, updates = calculate_rr_weights(cfg)
    sampled = stores * 4 * population * meta.num_actors
    assert updates * meta.train_batch_size / sampled == pytest.approx(16.0)


@pytest.mark.parametrize("population, ratio, batch", [(1, 16.0, 32), (4, 8.0, 64),
                                                      (16, 4.0, 128), (64, 2.0, 256)])
def test_the_learner_replays_less_of_a_populations_fresh_data(population, ratio, batch):
    # Unset, the replay ratio and batch follow K (population_learner); RLlib gets them.
    from ray.rllib.algorithms.dqn.dqn import calculate_rr_weights

    from qan_ray.meta import MetaConfig, build_dqn_config, population_learner

    meta = MetaConfig(population=population, num_actors=2)
    assert population_learner(meta) == (ratio, batch)
    cfg = build_dqn_config(QAN, meta, "ratio", steps_per_episode=4)
    assert cfg.train_batch_size_per_learner == batch
    assert cfg.sample_timeout_s is None  # a slow fragment is waited for, never dropped
    stores, updates = calculate_rr_weights(cfg)
    assert updates * batch / (stores * 4 * population * 2) == pytest.approx(ratio)
    given = MetaConfig(population=population, training_intensity=3.0, train_batch_size=48)
    assert population_learner(given) == (3.0, 48)  # given values win
