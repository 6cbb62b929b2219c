"""QANScheduler: a Ray Tune scheduler whose learned controller sets each running trial's LR.

On every trial result it reads the controller's observation the trial reported (computed in the
trainable by `qan_ray.tune.QANReporter`, so the scheduler never needs the model), asks the
controller (loaded once, greedy, on the CPU of the driver) for an action, and applies it:
- through the control channel (a named Ray actor per experiment) when the trainable reads it: no
  restart, the trial trains its next iteration with the new LR;
- otherwise by `trial.set_config(...)` + PAUSE: Tune restarts the trial from its last checkpoint.
`trial.config[lr_key]` always holds the current LR (as with PBT), so a PBT exploit clones it.

`stopper=` takes any Tune scheduler (ASHA, HyperBand, median stopping, PBT, ...): it decides
STOP/CONTINUE/PAUSE and gets every hook; QAN owns the LR. The decisions themselves are the pure
functions of `qan_ray.scheduler_core`.

State: one `TrialState` per trial id, written as JSON to the experiment directory after each
change (and by `save`), and read back on `Tuner.restore(...)` -- Tune itself does not persist
scheduler state (ray#30838) -- after which the channel is re-created and re-published.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

from ray.tune.experiment import Trial
from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from qan_ray import scheduler_core as core
from qan_ray.contract import OBS_VERSION, ObservationSpec, clean, greedy_action
from qan_ray.episode import next_lr, rescue_lr
from qan_ray.scheduler_core import TrialState

logger = logging.getLogger(__name__)

STATE_FILE = "qan-scheduler-state.json"
PERSIST_EVERY_S = 1.0
SCHEDULE_DIR = "qan-schedules"
PUBLISH_TIMEOUT_S = 10.0
ON_MISSING = ("error", "warn")


def load_policy(policy: Any):
    """A `policies.qnet.Controller` from "builtin", a folder path, or a Controller; on CPU."""
    from policies.qnet import Controller, load_controller

    if isinstance(policy, Controller):
        controller = policy
    else:
        try:
            controller = load_controller(policy)
        except FileNotFoundError as err:
            raise FileNotFoundError(
                f"QANScheduler(policy={str(policy)!r}): {err} Train one with `qan train "
                "--task digits-mlp --out runs/ctrl` and pass policy='runs/ctrl/controller' (CLI: "
                "--policy runs/ctrl/controller), or use policy='builtin'.") from err
    controller.net = controller.net.cpu().eval()
    return controller


def produced_observation(spec) -> ObservationSpec:
    """The observation this qan-ray's trainables produce for a controller with `spec`'s
    options (the current format)."""
    want = spec.observation
    return ObservationSpec(with_weights=want.with_weights,
                           monitored_layers=want.monitored_layers, num_classes=want.num_classes,
                           class_signals=want.class_signals)


class QANScheduler(FIFOScheduler):
    """Learned LR control for Ray Tune trials (Fu et al. 2016's QAN), optionally beside a stopper.

    policy: "builtin" | path to an exported controller folder | a `Controller`.
    action_mode: None (default: the controller's, from its spec) | "lr" | "minibatch" (class
        shares; the trainable must apply the `class_action` hyperparameter once per
        `class_decision` and report the per-class signals, as the built-in ones do). A value that
        differs from the controller's spec is refused.
    control_every: act after every n-th training iteration a trial reports (1 = every report,
        e.g. every epoch for the built-in trainables).
    lr_key: the config key holding the LR (the trainable and QANReporter read the same key).
    stopper: any Tune scheduler deciding STOP/CONTINUE/PAUSE (ASHA, HyperBand, PBT, ...).
    metric, mode: as in Tune; usually given by tune.TuneConfig (set_search_properties).
    on_missing: "error" (default) raises when a result lacks the metric or the observation;
        "warn" logs once and lets such trials CONTINUE.
    on_mismatch: "warn" (default): a controller whose observation does not fit (another format,
        or a trial that cannot build it) leaves the affected trials at their config's LR with one
        warning each, and the experiment goes on; "error" refuses such a controller at once.
    obs_key: the result key of an inline observation.
    guard: the rescue guard (default on): a trial whose iteration left it dying (a loss above
        its value at init, NaN/inf, or accuracy back at chance after it had learned;
        qan_ray.episode.dying) is rolled back by its QANReporter to its last good state (the
        reporter needs the model and optimizer) and QAN cuts its LR by `rescue_factor`, at most
        `max_rescues` times per trial. guard=False is the ablation.
    """

    def __init__(self, policy: Any = "builtin", action_mode: str | None = None,
                 control_every: int = 1, lr_key: str = "lr",
                 stopper: TrialScheduler | None = None, metric: str | None = None,
                 mode: str | None = None, on_missing: str = "error", on_mismatch: str = "warn",
                 obs_key: str = core.OBS_KEY, guard: bool = True, rescue_factor: float = 0.1,
                 max_rescues: int = 4):
        super().__init__()
        if not isinstance(control_every, int) or control_every < 1:
            raise ValueError(f"`control_every` is {control_every!r}; it must be an integer >= 1 "
                             "training iteration. Try control_every=1.")
        if on_missing not in ON_MISSING:
            raise ValueError(f"`on_missing` is {on_missing!r}; it must be one of {ON_MISSING}. "
                             "Use 'warn' to let trials without QAN features continue.")
        if on_mismatch not in ON_MISSING:
            raise ValueError(f"`on_mismatch` is {on_mismatch!r}; it must be one of "
                             f"{ON_MISSING}. Use 'warn' to let trials the controller does not "
                             "fit train at their config's LR.")
        if mode is not None:
            core.sign(mode)
        if isinstance(stopper, QANScheduler):
            raise ValueError("`stopper` is a QANScheduler; it must be a stopping scheduler such "
                             "as ASHAScheduler, HyperBandScheduler or MedianStoppingRule.")
        _check_pbt_mutations(stopper, lr_key)
        if not 0 < rescue_factor < 1:
            raise ValueError(f"`rescue_factor` is {rescue_factor!r}; it must lie in (0, 1). Try "
                             "rescue_factor=0.1.")
        if not isinstance(max_rescues, int) or max_rescues < 0:
            raise ValueError(f"`max_rescues` is {max_rescues!r}; it must be an integer >= 0. "
                             "Try max_rescues=4.")
        self.guard, self.rescue_factor = bool(guard), float(rescue_factor)
        self.controller = load_policy(policy)
        spec = self.controller.spec
        spec_mode = spec.action.mode
        if action_mode is not None and action_mode != spec_mode:
            raise ValueError(f"`action_mode` is {action_mode!r} but the controller was trained "
                             f"with action_mode {spec_mode!r}. Leave action_mode unset (it is "
                             "read from the controller's spec), or pass a controller trained "
                             "for that mode.")
        self.action_mode = spec_mode
        self.rule = spec.action
        self.observe = {"with_weights": spec.observation.with_weights,
                        "monitored_layers": list(spec.observation.monitored_layers),
                        "num_classes": spec.observation.num_classes,
                        "class_signals": spec.observation.class_signals,
                        "guard": {"on": self.guard, "max_rescues": max_rescues}}
        self.fallback = spec.fallback_action()
        self.on_mismatch = on_mismatch
        why = spec.observation.mismatch(produced_observation(spec))
        self.spec_mismatch = (None if why is None
                              else spec.mismatch_message(why, "the trials of this experiment"))
        if self.spec_mismatch is not None:
            if on_mismatch == "error":
                raise ValueError(self.spec_mismatch)
            logger.warning("QANScheduler: %s Every trial trains at its config's LR.",
                           self.spec_mismatch)
        self.control_every = control_every
        self.lr_key = lr_key
        self.stopper = stopper
        self.on_missing = on_missing
        self.obs_key = obs_key
        self._metric, self._mode = metric, mode
        self._trials: dict[str, TrialState] = {}
        self._paused_by_qan: set[str] = set()
        self._warned = False
        self._state_dir: str | None = None
        self._experiment: str | None = None
        self._channel = None
        self._loaded_saved = False
        self._restored = False
        self._persisted_at = -math.inf

    # --- pickling: the channel handle belongs to one driver session ----------------------------
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_channel"] = None
        return state

    # --- Tune hooks ------------------------------------------------------------------------------
    def set_search_properties(self, metric: str | None, mode: str | None, **spec) -> bool:
        if (self._metric and metric) or (self._mode and mode):
            return False  # given twice: Tune raises its usual "already instantiated" error
        if mode is not None:
            core.sign(mode)
        self._metric = self._metric or metric
        self._mode = self._mode or mode
        if self.stopper is not None:
            s_metric = getattr(self.stopper, "_metric", None)
            s_mode = getattr(self.stopper, "_mode", None)
            ok = self.stopper.set_search_properties(
                None if s_metric else self._metric, None if s_mode else self._mode, **spec)
            if not ok:
                return False
            self._metric = self._metric or getattr(self.stopper, "_metric", None)
            self._mode = self._mode or getattr(self.stopper, "_mode", None)
        if self._metric and not self._mode:
            raise ValueError(f"QANScheduler got metric {self._metric!r} but no mode; pass "
                             "mode='max' (accuracy) or mode='min' (loss) to tune.TuneConfig.")
        return True

    @property
    def metric(self):
        return self._metric

    @property
    def supports_buffered_results(self) -> bool:
        # QAN acts on every result and needs the trainable to wait for it: no buffering.
        return False

    def on_trial_add(self, tune_controller, trial: Trial) -> None:
        self._attach(trial)
        tid = trial.trial_id
        state = self._trials.get(tid)
        if state is None:
            lr = core.initial_lr_of(trial.config, self.lr_key, tid)
            state = self._trials[tid] = TrialState(lr=lr, initial_lr=lr)
        else:  # restored from a saved state: the trial resumes with QAN's LR
            self._set_config_lr(trial, state)
        self._publish(tid, state)  # before the trial starts: version, initial LR, observation
        if self.stopper is not None:
            self.stopper.on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial: Trial, result: dict) -> str:
        decision = (self.stopper.on_trial_result(tune_controller, trial, result)
                    if self.stopper is not None else TrialScheduler.CONTINUE)
        self._adopt_external_changes(tune_controller)
        tid = trial.trial_id
        state = self._trials.get(tid)
        if state is None:  # added before this scheduler saw it (should not happen)
            lr = core.initial_lr_of(trial.config, self.lr_key, tid)
            state = self._trials[tid] = TrialState(lr=lr, initial_lr=lr)
        iteration = int(result.get("training_iteration", state.last_iteration + 1))
        state.last_iteration = iteration
        if result.get(core.OWN_SCHEDULE_KEY):
            state.own_schedule = True
        fresh = core.result_is_fresh(result.get(core.VERSION_KEY), state.version, iteration,
                                     state.acted_iteration)
        # what the iteration trained with, as the trainable acknowledges it (never an LR only
        # published meanwhile); a stale repeat without its LR keeps its record
        if fresh or iteration not in state.trained or core.is_finite(result.get(core.LR_KEY)):
            state.trained[iteration] = state.trained_lr(result, fresh)
        if result.get(core.RESCUED_KEY) and self.guard and fresh:
            # the reporter rolled the trial back to its last good state; QAN cuts the LR
            state.via_channel = core.VERSION_KEY in result
            progress = result.get(core.PROGRESS_KEY)
            self._rescue(trial, state, iteration,
                         float(progress) if core.is_finite(progress) else 0.0)
            return self._decided(tid, state, decision, changed=True)
        real_metric = self._metric if self._metric not in (None, "_metric") else None
        missing = core.missing_keys(result, real_metric, self.obs_key)
        if missing:
            message = core.missing_message(missing, tid, list(result))
            # a trainable that never reported the observation is misconfigured: refuse it; one
            # result without it from a trial QAN already drove (e.g. a result Tune rebuilds
            # around a PBT pause/restore) is not worth an experiment: warn once, do not act
            if self.on_missing == "error" and not (state.history or state.acted_iteration):
                raise ValueError(message)
            if not self._warned:
                logger.warning(message)
                self._warned = True
            return decision
        value = result.get(real_metric) if real_metric else 0.0
        state.via_channel = core.VERSION_KEY in result
        obs = self._observation(trial, state, result)
        if obs is None:
            return decision
        due = core.control_due(iteration, self.control_every)
        # a non-finite entry (NaN weights, a NaN loss) means the trial is broken: the stopper's
        # business, not the controller's (it would otherwise keep changing a dead trial's LR)
        healthy = core.is_finite(value) and obs[-1] == 0
        if not core.should_act(decision, due, fresh, healthy, core.finished(result)):
            return decision
        action = greedy_action(self.controller.q_values(obs), self.fallback)
        progress = result.get(core.PROGRESS_KEY)
        changed = self._act(trial, state, iteration, action,
                            float(progress) if core.is_finite(progress) else 0.0)
        return self._decided(tid, state, decision, changed)

    def _decided(self, tid: str, state: TrialState, decision: str, changed: bool) -> str:
        """Persist QAN's change and merge it with the stopper's decision (a change a trial
        that does not read the channel can only get by a restart pauses it)."""
        self._persist(force=False)
        final = core.merge_decision(decision, state.via_channel, changed)
        if final == TrialScheduler.PAUSE and decision != TrialScheduler.PAUSE:
            self._paused_by_qan.add(tid)
        return final

    def _observation(self, trial: Trial, state: TrialState, result: dict):
        """The trial's observation for this result (inline or from the channel), or None when
        QAN does not drive the trial (it does not fit: one warning per trial)."""
        tid = trial.trial_id
        why = None
        values, version = result.get(self.obs_key), OBS_VERSION
        if self.spec_mismatch is not None:
            why = self.spec_mismatch
        elif core.OBS_ERROR_KEY in result:
            why = f"the trainable could not build the observation: {result[core.OBS_ERROR_KEY]}"
        elif values is None and core.OBS_REF_KEY in result:
            entry = self._take_observation(tid)
            if entry is None or int(entry["seq"]) != int(result[core.OBS_REF_KEY]):
                return None  # not on the channel (lost with a restore): skip this result only
            values, version = entry["values"], int(entry["version"])
        if why is None and version != OBS_VERSION:
            why = f"the trial reports observation format {version}, this qan-ray reads " \
                  f"{OBS_VERSION}"
        if why is None:
            try:
                return clean(values, self.controller.obs_size)
            except ValueError as err:
                why = str(err)
        if state.skipped is None:
            state.skipped = why
            if self.on_mismatch == "error":
                raise ValueError(f"trial {tid}: {why}")
            if why != self.spec_mismatch:
                logger.warning("QANScheduler: trial %s trains at its config's LR: %s", tid, why)
            self._persist()
        return None

    def _take_observation(self, trial_id: str):
        channel = self._open_channel()
        if channel is None:
            return None
        import ray

        try:
            return ray.get(channel.take_observation.remote(trial_id), timeout=60)
        except ray.exceptions.RayActorError:  # the channel died: a new one, re-published
            logger.warning("QANScheduler: the control channel was lost; re-creating it")
            self._channel = None
            self._open_channel(verify=True)
            for tid, state in self._trials.items():
                self._publish(tid, state)
            return None

    def on_trial_complete(self, tune_controller, trial: Trial, result: dict) -> None:
        if self.stopper is not None:
            self.stopper.on_trial_complete(tune_controller, trial, result)
        self._finish(tune_controller, trial)

    def on_trial_error(self, tune_controller, trial: Trial) -> None:
        if self.stopper is not None:
            self.stopper.on_trial_error(tune_controller, trial)
        self._finish(tune_controller, trial)

    def on_trial_remove(self, tune_controller, trial: Trial) -> None:
        if self.stopper is not None:
            self.stopper.on_trial_remove(tune_controller, trial)
        self._finish(tune_controller, trial)

    def choose_trial_to_run(self, tune_controller) -> Trial | None:
        if self.stopper is not None:
            return self.stopper.choose_trial_to_run(tune_controller)
        # Resume trials QAN paused to apply a change (restart fallback) before new ones.
        for trial in tune_controller.get_trials():
            if trial.status == Trial.PAUSED and trial.trial_id in self._paused_by_qan:
                self._paused_by_qan.discard(trial.trial_id)
                return trial
        return super().choose_trial_to_run(tune_controller)

    def debug_string(self) -> str:
        actions = sum(len(s.history) for s in self._trials.values())
        skipped = sum(s.skipped is not None for s in self._trials.values())
        text = (f"QANScheduler: {len(self._trials)} trials, {actions} controller actions "
                f"(every {self.control_every} iteration(s), key {self.lr_key!r})"
                + (f", {skipped} trial(s) at their config's LR (controller does not fit)"
                   if skipped else "") + ".")
        recent = sorted(((h, tid) for tid, s in self._trials.items() for h in s.history[-3:]),
                        key=lambda x: x[0][0])[-3:]
        if recent:
            text += "\nLast decisions: " + "; ".join(
                f"{tid} it {int(h[0])} {self._label(int(h[1]))} -> lr {h[2]:.3g}"
                for h, tid in recent)
        if self.stopper is not None:
            text += "\n" + self.stopper.debug_string()
        return text

    def save(self, checkpoint_path: str) -> None:
        """Per-trial QAN state as JSON at `checkpoint_path` (atomic); the stopper's own state,
        if it implements save(), next to it (`<path>.stopper`)."""
        self._write_state(checkpoint_path)
        if _implements(self.stopper, "save"):
            self.stopper.save(checkpoint_path + ".stopper")

    def restore(self, checkpoint_path: str) -> None:
        data = json.loads(Path(checkpoint_path).read_text())
        self._trials.update({tid: TrialState.from_dict(d) for tid, d in data["trials"].items()})
        self._metric = self._metric or data.get("metric")
        self._mode = self._mode or data.get("mode")
        stopper_file = checkpoint_path + ".stopper"
        if _implements(self.stopper, "restore") and os.path.exists(stopper_file):
            self.stopper.restore(stopper_file)

    # --- public read-only view -------------------------------------------------------------------
    def trial_state(self, trial_id: str) -> TrialState:
        """QAN's state of one trial (LR, version, history of [iteration, action, lr])."""
        return self._trials[trial_id]

    def schedule_rows(self, trial_id: str) -> list[dict[str, Any]]:
        """One row per iteration of a trial: the LR it trained with and QAN's action after it
        (label "-" when QAN did not act; "set by stopper" for a PBT clone's LR)."""
        state = self._trials[trial_id]
        acted = {int(h[0]): h for h in state.history}
        rows = []
        for it in sorted(state.trained):
            h = acted.get(it)
            rows.append({"trial_id": trial_id, "iteration": it, "lr": state.trained[it],
                         "action": int(h[1]) if h else None,
                         "action_label": self._label(int(h[1])) if h else "-",
                         "lr_after": float(h[2]) if h else state.trained[it]})
        return rows

    # --- internals -------------------------------------------------------------------------------
    def _label(self, action: int) -> str:
        if action == core.RESCUE_ACTION:
            return "rescue"
        if action < 0:
            return "set by stopper"
        labels = self.rule.labels
        return labels[action] if action < len(labels) else str(action)

    def _act(self, trial: Trial, state: TrialState, iteration: int, action: int,
             progress: float = 0.0) -> bool:
        """Apply `action` to the trial; True if the hyperparameters changed. `progress`: the
        trial's budget done (the cosine schedule's position for the next iteration)."""
        if self.action_mode == "minibatch":
            state.record_action(iteration, action, state.lr)
            decision = {"class_action": int(action), "class_decision": len(state.history)}
            trial.set_config({**trial.config, **decision})
            self._publish(trial.trial_id, state, decision, wait=True)
            return True
        # the episode's rule: x factor, or a correction of the cosine from the trial's start LR
        # (a trainable with its own schedule: the correction alone, its schedule is the cosine's)
        new_lr, state.correction = next_lr(self.rule, action, lr=state.lr,
                                           correction=state.correction,
                                           start=state.initial_lr,
                                           progress=0.0 if state.own_schedule else progress)
        changed = not math.isclose(new_lr, state.lr, rel_tol=1e-12)
        if not changed:
            state.history.append([iteration, action, state.lr])
            state.acted_iteration = iteration
            return False
        state.record_action(iteration, action, new_lr)
        self._set_config_lr(trial, state)
        if state.via_channel:
            self._publish(trial.trial_id, state, wait=True)
        return True

    def _rescue(self, trial: Trial, state: TrialState, iteration: int, progress: float) -> None:
        """The guard's LR cut after a rollback (the episode's rule, `episode.rescue_lr`)."""
        new_lr, state.correction = rescue_lr(self.rule, self.rescue_factor, lr=state.lr,
                                             correction=state.correction,
                                             start=state.initial_lr,
                                             progress=0.0 if state.own_schedule else progress)
        state.rescues += 1
        state.record_action(iteration, core.RESCUE_ACTION, new_lr)
        self._set_config_lr(trial, state)
        if state.via_channel:
            self._publish(trial.trial_id, state, wait=True)
        logger.info("QANScheduler: trial %s rescued after iteration %d (rolled back, LR -> "
                    "%.4g; rescue %d)", trial.trial_id, iteration, new_lr, state.rescues)

    def _set_config_lr(self, trial: Trial, state: TrialState) -> None:
        if trial.config.get(self.lr_key) != state.lr:
            trial.set_config({**trial.config, self.lr_key: state.lr})

    def _adopt_external_changes(self, tune_controller) -> None:
        """A stopper that copies configs (PBT's exploit) changed a trial's LR: from now on QAN
        drives that LR (the cloned one), and the trial reads it when it restarts."""
        if self.stopper is None:
            return
        for trial in tune_controller.get_trials():
            state = self._trials.get(trial.trial_id)
            lr = trial.config.get(self.lr_key)
            if state is None or not core.is_finite(lr) or float(lr) == state.lr:
                continue
            state.history.append([state.last_iteration, -1, float(lr)])  # -1: set by the stopper
            state.set_lr(float(lr))
            self._publish(trial.trial_id, state, wait=True)
            self._persist()

    def _publish(self, trial_id: str, state: TrialState,
                 extra: dict[str, Any] | None = None, wait: bool = False) -> None:
        """Write the trial's hyperparameters to the channel. `wait`: return only once the
        channel holds them (a decision: Tune resumes the trainable when on_trial_result returns,
        and its next `apply` must find it); the trial's first publication does not wait for the
        channel's process to start."""
        channel = self._open_channel()
        if channel is None:
            return
        hyper = {self.lr_key: state.lr, **(extra or {})}
        ref = channel.publish.remote(trial_id, hyper, state.version,
                                     {self.lr_key: state.initial_lr}, self.observe)
        if wait:
            import ray

            try:
                ray.get(ref, timeout=PUBLISH_TIMEOUT_S)
            except Exception as err:  # noqa: BLE001 - the trainable reports what it trained with
                logger.warning("QANScheduler: publishing trial %s's LR %.4g (version %d) took "
                               "more than %gs or failed (%s); the trial acknowledges the version "
                               "it trains with, so the records stay true", trial_id, state.lr,
                               state.version, PUBLISH_TIMEOUT_S, err)

    def _open_channel(self, verify: bool = False):
        """The experiment's channel actor, created on first use. A fresh experiment does not wait
        for the actor's process to start (about a second here; it starts while the first trial
        does, and calls queue meanwhile). After a restore, a channel killed a moment ago may still
        hold the name, so the handle is verified (and re-created) before anything is published."""
        if self._channel is None and self._experiment is not None:
            import ray

            from qan_ray.tune import open_channel

            for attempt in range(5):
                channel = open_channel(self._experiment, create=True)
                if not verify:
                    self._channel = channel
                    break
                try:
                    ray.get(channel.snapshot.remote(), timeout=30)
                    self._channel = channel
                    break
                except ray.exceptions.RayActorError:
                    time.sleep(0.2 * (attempt + 1))
        return self._channel

    def _attach(self, trial: Trial) -> None:
        """Learn the experiment (channel name, state folder) from the first trial; after a
        `Tuner.restore` load the state saved there, then make sure the channel exists before the
        trial starts (its reporter looks it up once at start)."""
        storage = getattr(trial, "storage", None)
        if storage is not None and self._experiment is None:
            self._experiment = storage.experiment_dir_name
            self._state_dir = storage.experiment_driver_staging_path
        if not self._loaded_saved and self._state_dir is not None:
            self._loaded_saved = True
            saved = os.path.join(self._state_dir, STATE_FILE)
            if os.path.exists(saved):
                self.restore(saved)
                self._restored = True
                logger.info("QANScheduler: restored the state of %d trials from %s",
                            len(self._trials), saved)
        self._open_channel(verify=self._restored)

    def _finish(self, tune_controller, trial: Trial) -> None:
        self._paused_by_qan.discard(trial.trial_id)
        self._persist()
        self._write_schedule(trial.trial_id)
        if self._channel is not None:
            self._channel.drop.remote(trial.trial_id)
            live = [t for t in tune_controller.get_trials()
                    if t is not trial and not t.is_finished()]
            search = getattr(tune_controller, "search_alg", None)
            if not live and search is not None and search.is_finished():
                import ray  # the experiment is over: free the actor (a restore re-creates it)

                ray.kill(self._channel)
                self._channel = None

    def _persist(self, force: bool = True) -> None:
        """Write the state file; routine writes (after an action) at most every PERSIST_EVERY_S
        seconds (a write costs a few ms; the last change is written by the next one, at the
        latest when a trial ends), changes of ownership and trial ends at once."""
        if self._state_dir is None:
            return
        now = time.monotonic()
        if not force and now - self._persisted_at < PERSIST_EVERY_S:
            return
        self._write_state(os.path.join(self._state_dir, STATE_FILE))
        self._persisted_at = now

    def _write_schedule(self, trial_id: str) -> None:
        """`<experiment>/qan-schedules/<trial_id>.parquet`: the LR each iteration trained with,
        so the best trial's schedule can be re-run without QAN."""
        if self._state_dir is None or trial_id not in self._trials:
            return
        from qan_ray.records import write_table

        folder = Path(self._state_dir) / SCHEDULE_DIR
        folder.mkdir(parents=True, exist_ok=True)
        rows = self.schedule_rows(trial_id)
        if rows:
            tmp = folder / f".{trial_id}.parquet.tmp"
            write_table(tmp, rows)
            os.replace(tmp, folder / f"{trial_id}.parquet")

    def _write_state(self, path: str) -> None:
        data = {"format": 1, "metric": self._metric, "mode": self._mode, "lr_key": self.lr_key,
                "trials": {tid: s.to_dict() for tid, s in self._trials.items()}}
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tmp = f"{path}.tmp"
        Path(tmp).write_text(json.dumps(data))
        os.replace(tmp, path)


def _implements(stopper: Any, method: str) -> bool:
    """Whether the stopper overrides TrialScheduler's abstract save/restore (ASHA does, FIFO,
    HyperBand and PBT do not)."""
    if stopper is None:
        return False
    return getattr(type(stopper), method) is not getattr(TrialScheduler, method)


def _check_pbt_mutations(stopper: Any, lr_key: str) -> None:
    mutations = getattr(stopper, "_hyperparam_mutations", None)
    if mutations and lr_key in mutations:
        raise ValueError(f"the stopper ({type(stopper).__name__}) mutates {lr_key!r}, which "
                         "QANScheduler controls. Let PBT explore the other hyperparameters (e.g. "
                         "momentum, weight_decay) and leave the LR to QAN.")
