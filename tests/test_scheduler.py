"""QANScheduler's decision core (pure functions, no Ray session) and the scheduler's hooks driven
by hand with small stand-in trials (no Ray session either: no channel, so the restart fallback)."""

from __future__ import annotations

import json
import math

import pytest
from controllers import fixed_action_controller

from qan_ray import scheduler_core as core
from qan_ray.scheduler_core import CONTINUE, NOOP, PAUSE, STOP, TrialState

NAN, INF = float("nan"), float("inf")


# --- scores: one sign multiplier, NaN/inf never raise --------------------------------------------
@pytest.mark.parametrize("mode, value, expected", [
    ("max", 0.9, 0.9), ("min", 0.9, -0.9), ("max", -2, -2.0), ("min", -2, 2.0),
    ("max", NAN, -INF), ("min", NAN, -INF), ("max", INF, -INF), ("min", -INF, -INF),
    ("max", None, -INF), ("min", "0.3", -INF), ("max", True, -INF),
])
def test_score_maximises_and_maps_nonfinite_to_worst(mode, value, expected):
    assert core.score(value, mode) == expected


def test_sign_rejects_an_unknown_mode_with_the_fix():
    with pytest.raises(ValueError, match=r"`mode` is 'maximize'; it must be 'min' or 'max'"):
        core.sign("maximize")


# --- results and observations ----------------------------------------------------------------
@pytest.mark.parametrize("metric, result, missing", [
    ("acc", {"acc": 1, "qan_obs": [0]}, []),
    ("acc", {"qan_obs": [0]}, ["acc"]),
    ("acc", {"acc": NAN}, ["qan_obs"]),  # NaN is present (handled later), the obs is not
    (None, {}, ["qan_obs"]),
    ("acc", {"acc": 1, "qan_obs_ref": 3}, []),  # on the control channel
    ("acc", {"acc": 1, "qan_obs_error": "no layers"}, []),  # explained: the trial is skipped
])
def test_missing_keys_lists_metric_then_observation(metric, result, missing):
    assert core.missing_keys(result, metric) == missing


def test_missing_message_names_the_keys_the_trial_and_both_fixes():
    text = core.missing_message(["acc", "qan_obs"], "abc_00001", ["loss"])
    assert "trial abc_00001" in text and "['acc', 'qan_obs']" in text
    assert "reporter.metrics(model" in text and "on_missing='warn'" in text


# --- when to act ---------------------------------------------------------------------------------
@pytest.mark.parametrize("every, due", [(1, [1, 2, 3, 4, 5, 6]), (2, [2, 4, 6]), (3, [3, 6])])
def test_control_due(every, due):
    assert [i for i in range(0, 7) if core.control_due(i, every)] == due


@pytest.mark.parametrize("reported, published, iteration, acted, fresh", [
    (0, 0, 1, 0, True),     # channel, nothing published yet
    (2, 2, 3, 2, True),     # trained with the latest version
    (1, 2, 3, 2, False),    # an older version: QAN's last action is not in this result yet
    (3, 2, 3, 2, True),
    (None, 0, 1, 0, True),  # restart fallback: a newer iteration
    (None, 5, 4, 4, False),  # fallback, the same iteration seen again (rollback)
    (None, 5, 3, 4, False),  # fallback, an older iteration (restored from an older checkpoint)
])
def test_result_is_fresh(reported, published, iteration, acted, fresh):
    assert core.result_is_fresh(reported, published, iteration, acted) is fresh


@pytest.mark.parametrize("decision, due, fresh, finite, done, act", [
    (CONTINUE, True, True, True, False, True),
    (PAUSE, True, True, True, False, True),
    (STOP, True, True, True, False, False),
    (NOOP, True, True, True, False, False),
    (CONTINUE, False, True, True, False, False),
    (CONTINUE, True, False, True, False, False),
    (CONTINUE, True, True, False, False, False),
    (CONTINUE, True, True, True, True, False),  # the last iteration: nothing trains with it
])
def test_should_act(decision, due, fresh, finite, done, act):
    assert core.should_act(decision, due, fresh, finite, done) is act


@pytest.mark.parametrize("result, done", [
    ({"qan_progress": 1.0}, True), ({"qan_progress": 0.5}, False), ({"done": True}, True),
    ({}, False), ({"qan_progress": NAN}, False),
])
def test_finished(result, done):
    assert core.finished(result) is done


@pytest.mark.parametrize("stopper, channel, changed, final", [
    (CONTINUE, True, True, CONTINUE),   # the channel needs no restart
    (CONTINUE, False, True, PAUSE),     # fallback: restart from the last checkpoint
    (CONTINUE, False, False, CONTINUE),
    (STOP, False, True, STOP),
    (PAUSE, False, True, PAUSE),
    (NOOP, False, True, NOOP),
])
def test_merge_decision(stopper, channel, changed, final):
    assert core.merge_decision(stopper, channel, changed) == final


def test_trial_state_round_trips_through_json():
    s = TrialState(lr=0.1, initial_lr=0.2)
    s.record_action(3, 0, 0.05)
    s.via_channel = True
    s.trained = {1: 0.2, 2: 0.1}
    s.skipped = "format 1 vs 2"
    back = TrialState.from_dict(json.loads(json.dumps(s.to_dict())))
    assert back == s
    assert back.version == 1 and back.history == [[3, 0, 0.05]] and back.trained[2] == 0.1


@pytest.mark.parametrize("config, message", [
    ({"learning_rate": 0.1}, "config has no 'lr'"),
    ({"lr": 0}, "'lr' is 0; it must be a number > 0"),
    ({"lr": NAN}, "it must be a number > 0"),
])
def test_initial_lr_of_errors(config, message):
    with pytest.raises(ValueError, match=message):
        core.initial_lr_of(config, "lr", "t1")


# --- the scheduler's hooks, by hand (no Ray session: the restart fallback path) ------------------
OBS = fixed_action_controller().obs_size


class StandInTrial:
    """The parts of a Tune Trial the scheduler touches."""

    PENDING, PAUSED, RUNNING = "PENDING", "PAUSED", "RUNNING"

    def __init__(self, trial_id: str, lr: float):
        self.trial_id, self.config, self.status = trial_id, {"lr": lr}, "RUNNING"
        self.storage = None

    def set_config(self, config):
        self.config = config

    def is_finished(self) -> bool:
        return False


class StandInController:
    def __init__(self, trials):
        self.trials = trials

    def get_trials(self):
        return self.trials


def _scheduler(mode="max", **kw):
    from qan_ray.scheduler import QANScheduler

    s = QANScheduler(policy=fixed_action_controller(), **kw)
    assert s.set_search_properties("m", mode)
    return s


def _result(it, m, obs=None, **extra):
    return {"training_iteration": it, "m": m, "qan_obs": obs if obs is not None else [0.0] * OBS,
            **extra}


@pytest.mark.parametrize("mode", ["min", "max"])
def test_scheduler_fallback_halves_lr_by_set_config_and_pause(mode):
    s = _scheduler(mode)
    trial = StandInTrial("t0", 0.1)
    tc = StandInController([trial])
    s.on_trial_add(tc, trial)
    assert s.on_trial_result(tc, trial, _result(1, 0.5)) == PAUSE
    assert trial.config["lr"] == pytest.approx(0.05)
    # the same iteration again (restored from the checkpoint before the change): no second action
    assert s.on_trial_result(tc, trial, _result(1, 0.5)) == CONTINUE
    assert s.on_trial_result(tc, trial, _result(2, 0.4)) == PAUSE
    assert trial.config["lr"] == pytest.approx(0.025)
    state = s.trial_state("t0")
    assert [h[:2] for h in state.history] == [[1, 0], [2, 0]] and state.version == 2
    assert [r["lr"] for r in s.schedule_rows("t0")] == [0.1, 0.05]  # what each trained with
    assert [r["action_label"] for r in s.schedule_rows("t0")] == ["x0.5", "x0.5"]


@pytest.mark.parametrize("mode", ["min", "max"])
@pytest.mark.parametrize("bad", [NAN, INF, -INF])
def test_scheduler_nonfinite_metric_continues_without_acting(mode, bad):
    s = _scheduler(mode)
    trial = StandInTrial("t0", 0.1)
    tc = StandInController([trial])
    s.on_trial_add(tc, trial)
    assert s.on_trial_result(tc, trial, _result(1, bad)) == CONTINUE
    assert trial.config["lr"] == 0.1 and s.trial_state("t0").history == []
    # a NaN inside the observation (NaN weights) is cleaned, not fatal, and QAN leaves the
    # broken trial alone; a healthy result after it is acted on again
    assert s.on_trial_result(tc, trial, _result(2, 0.5, obs=[NAN] * OBS)) == CONTINUE
    assert trial.config["lr"] == 0.1
    assert s.on_trial_result(tc, trial, _result(3, 0.5)) == PAUSE


def test_scheduler_missing_features_error_by_default_and_warn_once_with_the_flag(caplog):
    trial = StandInTrial("t0", 0.1)
    tc = StandInController([trial])
    strict = _scheduler()
    strict.on_trial_add(tc, trial)
    with pytest.raises(ValueError, match=r"without \['qan_obs'\]"):
        strict.on_trial_result(tc, trial, {"training_iteration": 1, "m": 0.5})
    lenient = _scheduler(on_missing="warn")
    lenient.on_trial_add(tc, trial)
    for it in (1, 2):
        assert lenient.on_trial_result(tc, trial, {"training_iteration": it, "m": 0.5}) == CONTINUE
    assert sum("without ['qan_obs']" in r.message for r in caplog.records) == 1


def test_a_driven_trials_result_without_the_observation_warns_and_does_not_stop_tune(caplog):
    trial = StandInTrial("t0", 0.1)
    tc = StandInController([trial])
    strict = _scheduler()  # on_missing="error"
    strict.on_trial_add(tc, trial)
    strict.on_trial_result(tc, trial, _result(1, 0.5))  # QAN acts on a proper result
    assert strict.trial_state("t0").history
    lr = trial.config["lr"]
    # a result Tune rebuilt around a pause/restore, without the observation: not an error now
    assert strict.on_trial_result(tc, trial, {"training_iteration": 1, "m": 0.5}) == CONTINUE
    assert trial.config["lr"] == lr  # and no action on it
    assert sum("without ['qan_obs']" in r.message for r in caplog.records) == 1


def test_scheduler_clamps_at_lr_min():
    from qan_ray.scheduler import QANScheduler

    s = QANScheduler(policy=fixed_action_controller(lr_min=0.04), metric="m", mode="max")
    trial = StandInTrial("t0", 0.1)
    tc = StandInController([trial])
    s.on_trial_add(tc, trial)
    for it in (1, 2, 3):
        s.on_trial_result(tc, trial, _result(it, 0.5))
    assert [h[2] for h in s.trial_state("t0").history] == [0.05, 0.04, 0.04]
    assert s.trial_state("t0").version == 2  # the clamped no-op is recorded, not published


def test_scheduler_save_restore_round_trip(tmp_path):
    s = _scheduler()
    trial = StandInTrial("t0", 0.1)
    tc = StandInController([trial])
    s.on_trial_add(tc, trial)
    s.on_trial_result(tc, trial, _result(1, 0.5))
    path = str(tmp_path / "state.json")
    s.save(path)
    fresh = _scheduler()
    fresh.restore(path)
    assert fresh.trial_state("t0") == s.trial_state("t0")
    assert fresh.trial_state("t0").lr == pytest.approx(0.05)


@pytest.mark.parametrize("kwargs, message", [
    ({"control_every": 0}, "`control_every` is 0; it must be an integer >= 1"),
    ({"on_missing": "skip"}, "`on_missing` is 'skip'"),
    ({"action_mode": "minibatch"}, "controller was trained with action_mode 'lr'"),
    ({"on_mismatch": "ignore"}, "`on_mismatch` is 'ignore'"),
    ({"policy": "/nonexistent/ctrl"}, "Train one with `qan train"),
])
def test_scheduler_rejects_bad_arguments_with_the_fix(kwargs, message):
    from qan_ray.scheduler import QANScheduler

    args = {"policy": fixed_action_controller(), **kwargs}
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        QANScheduler(**args)


def test_scheduler_refuses_a_pbt_stopper_that_mutates_the_lr():
    from ray import tune
    from ray.tune.schedulers import PopulationBasedTraining

    from qan_ray.scheduler import QANScheduler

    pbt = PopulationBasedTraining(hyperparam_mutations={"lr": tune.uniform(0.01, 0.1)})
    with pytest.raises(ValueError, match="mutates 'lr', which QANScheduler controls"):
        QANScheduler(policy=fixed_action_controller(), stopper=pbt)


def test_builtin_policy_missing_is_a_clear_file_not_found(tmp_path, monkeypatch):
    import policies.qnet
    from qan_ray.scheduler import load_policy

    monkeypatch.setattr(policies.qnet, "BUILTIN", tmp_path / "no-builtin-here")
    with pytest.raises(FileNotFoundError, match="path 'builtin' has no spec.json"):
        load_policy("builtin")
    with pytest.raises(FileNotFoundError, match=r"policy='/nope'.*--policy runs/ctrl/controller"):
        load_policy("/nope")


def test_metric_mode_from_search_properties_and_conflicts():
    from qan_ray.scheduler import QANScheduler

    s = QANScheduler(policy=fixed_action_controller())
    assert s.set_search_properties("loss", "min") and (s.metric, s._mode) == ("loss", "min")
    given = QANScheduler(policy=fixed_action_controller(), metric="acc", mode="max")
    assert given.set_search_properties(None, None) and given.metric == "acc"
    assert not given.set_search_properties("loss", "min")  # Tune then raises its usual error


def test_action_mode_is_read_from_the_controller_spec():
    from qan_ray.scheduler import QANScheduler

    ctrl = fixed_action_controller(action=3, action_mode="minibatch")
    s = QANScheduler(policy=ctrl)
    assert s.action_mode == "minibatch" and s.spec_mismatch is None
    trial = StandInTrial("t0", 0.1)
    tc = StandInController([trial])
    s.on_trial_add(tc, trial)
    assert s.set_search_properties("m", "max")
    obs = [0.0] * ctrl.spec.obs_size  # with the per-class block
    assert s.on_trial_result(tc, trial, _result(1, 0.5, obs)) == PAUSE  # restart fallback
    assert trial.config["class_action"] == 3 and trial.config["class_decision"] == 1
    assert trial.config["lr"] == 0.1


def test_old_format_controller_warns_and_leaves_trials_at_their_lr(caplog, tmp_path):
    """A controller of another observation format never aborts the experiment: one warning,
    and the trial trains on at its config's LR. With on_mismatch='error' it is refused."""
    from test_contract import _legacy_spec

    from qan_ray.scheduler import QANScheduler

    folder = _legacy_spec(tmp_path)
    with pytest.raises(ValueError, match="observation format 1 vs 2"):
        QANScheduler(policy=str(folder), on_mismatch="error")
    s = QANScheduler(policy=str(folder), metric="m", mode="max")
    assert sum("observation format 1 vs 2" in r.message for r in caplog.records) == 1
    trial = StandInTrial("t0", 0.1)
    tc = StandInController([trial])
    s.on_trial_add(tc, trial)
    for it in (1, 2, 3):
        assert s.on_trial_result(tc, trial, _result(it, 0.5, obs=[0.0] * 392)) == CONTINUE
    assert trial.config["lr"] == 0.1 and s.trial_state("t0").skipped is not None
    assert "at their config's LR" in s.debug_string()


def test_a_trial_whose_observation_does_not_fit_is_skipped_alone(caplog):
    s = _scheduler()
    bad, good = StandInTrial("bad", 0.1), StandInTrial("good", 0.1)
    tc = StandInController([bad, good])
    s.on_trial_add(tc, bad)
    s.on_trial_add(tc, good)
    assert s.on_trial_result(tc, bad, _result(1, 0.5, obs=[0.0] * 7)) == CONTINUE
    assert s.on_trial_result(tc, bad, _result(2, 0.5, obs=[0.0] * 7)) == CONTINUE
    assert s.on_trial_result(tc, good, _result(1, 0.5)) == PAUSE
    assert bad.config["lr"] == 0.1 and good.config["lr"] == 0.05
    assert sum("trial bad trains at its config's LR" in r.message for r in caplog.records) == 1
    assert "good it 1 x0.5 -> lr 0.05" in s.debug_string()


def test_no_action_after_the_last_iteration_so_config_lr_is_the_last_trained():
    s = _scheduler()
    trial = StandInTrial("t0", 0.1)
    tc = StandInController([trial])
    s.on_trial_add(tc, trial)
    assert s.on_trial_result(tc, trial, _result(1, 0.5, qan_progress=0.5)) == PAUSE
    assert s.on_trial_result(tc, trial, _result(2, 0.5, qan_progress=1.0)) == CONTINUE
    assert trial.config["lr"] == 0.05 == s.schedule_rows("t0")[-1]["lr"]



def test_cosine_controller_keeps_trials_on_the_cosine_schedule():
    from qan_ray.scheduler import QANScheduler

    s = QANScheduler(policy=fixed_action_controller(action=2, lr_schedule="cosine"), metric="m",
                     mode="max")  # always keep
    trial = StandInTrial("t0", 0.2)
    tc = StandInController([trial])
    s.on_trial_add(tc, trial)
    for it, progress in ((1, 0.25), (2, 0.5)):
        s.on_trial_result(tc, trial, _result(it, 0.5, qan_progress=progress))
        cosine = 0.2 * 0.5 * (1 + math.cos(math.pi * progress))
        assert trial.config["lr"] == pytest.approx(cosine)
    assert s.trial_state("t0").correction == 1.0
    # a trainable with its own schedule (QANReporter(own_schedule=True)): "keep" is its schedule,
    # so QAN's LR (start LR x its factor) stays the start LR; a x0.5 halves the factor
    own = StandInTrial("own", 0.2)
    s.on_trial_add(tc, own)
    for it, progress in ((1, 0.25), (2, 0.5)):
        s.on_trial_result(tc, own, _result(it, 0.5, qan_progress=progress, qan_own_schedule=True))
        assert own.config["lr"] == 0.2
    assert s.trial_state("own").own_schedule
    halving = QANScheduler(policy=fixed_action_controller(action=0, lr_schedule="cosine"),
                           metric="m", mode="max")
    halving.on_trial_add(tc, own)
    halving.on_trial_result(tc, own, _result(1, 0.5, qan_progress=0.5, qan_own_schedule=True))
    assert own.config["lr"] == pytest.approx(0.1)


@pytest.mark.parametrize("result, fresh, trained", [
    ({"qan_lr": 0.07, "qan_version": 0}, False, 0.07),  # the trainable says what it trained with
    ({"qan_lr": 0.07, "qan_version": 2}, True, 0.07),
    ({"qan_version": 1}, False, 0.05),  # else the LR of the version it acknowledges
    ({"qan_version": 0}, False, 0.1),  # version 0: the start LR
    ({"qan_version": 2}, True, 0.025),
    ({}, True, 0.025),  # restart fallback: a fresh result trained with the current LR
])
def test_the_trained_lr_is_what_the_result_acknowledges(result, fresh, trained):
    state = TrialState(lr=0.1, initial_lr=0.1)
    state.set_lr(0.05)
    state.set_lr(0.025)
    assert state.published == {1: 0.05, 2: 0.025}
    assert state.trained_lr(result, fresh) == trained


def test_a_rescued_result_cuts_the_lr_instead_of_asking_the_controller():
    s = _scheduler("max", rescue_factor=0.1)
    trial = StandInTrial("t0", 0.5)
    tc = StandInController([trial])
    s.on_trial_add(tc, trial)
    rescued = {"training_iteration": 1, "m": 0.1, "qan_rescued": True, "qan_rescues": 1,
               "qan_progress": 0.25}  # no observation: the reporter rolled the trial back
    assert s.on_trial_result(tc, trial, rescued) == PAUSE  # restart fallback applies the cut
    assert trial.config["lr"] == pytest.approx(0.05)
    state = s.trial_state("t0")
    assert state.rescues == 1 and [h[1] for h in state.history] == [-2]
    assert [r["action_label"] for r in s.schedule_rows("t0")] == ["rescue"]
    assert s.on_trial_result(tc, trial, _result(2, 0.6)) == PAUSE  # then the controller again
    assert trial.config["lr"] == pytest.approx(0.025)  # its x0.5
    off = _scheduler("max", guard=False)
    other = StandInTrial("t1", 0.5)
    off.on_trial_add(StandInController([other]), other)
    off.on_trial_result(StandInController([other]), other,
                        _result(1, 0.1, qan_rescued=True))  # guard off: an ordinary result
    assert off.trial_state("t1").rescues == 0 and other.config["lr"] == pytest.approx(0.25)
    with pytest.raises(ValueError, match=r"`rescue_factor` is 1.5; it must lie in \(0, 1\)"):
        _scheduler("max", rescue_factor=1.5)
