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
from qan_ray.scheduler_core import TrialState

logger = logging.getLogger(__name__)

STATE_FILE = "qan-scheduler-state.json"
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
            hint = ("No built-in controller is shipped yet (policies/builtin/ holds no qnet.pt + "
                    "spec.json). " if str(policy) == "builtin" else "")
            raise FileNotFoundError(
                f"QANScheduler(policy={str(policy)!r}): {hint}{err} Train one with `qan train "
                "--task digits-mlp --out runs/ctrl` and pass policy='runs/ctrl/controller' (CLI: "
                "--policy runs/ctrl/controller).") from err
    controller.net = controller.net.cpu().eval()
    return controller


def lr_rule(spec: dict[str, Any]):
    """The controller's LR arithmetic (factors, restart, clamp) as the duck-typed config that
    `qan_ray.control.next_lr` reads."""
    from qan_ray.config import QANConfig

    q = spec.get("qan", {})
    rule = QANConfig(lr_factors=tuple(q.get("lr_factors", QANConfig.lr_factors)),
                     restart_lr=q.get("restart_lr"), lr_min=float(q.get("lr_min", 1e-5)),
                     lr_max=float(q.get("lr_max", 1.0)))
    if not (0 < rule.lr_min <= rule.lr_max) or not all(f > 0 for f in rule.lr_factors):
        raise ValueError(f"the controller spec's LR rule (lr_factors {rule.lr_factors}, lr_min "
                         f"{rule.lr_min}, lr_max {rule.lr_max}) is invalid: factors must be > 0 "
                         "and 0 < lr_min <= lr_max. Re-export the controller with `qan train`.")
    return rule


class QANScheduler(FIFOScheduler):
    """Learned LR control for Ray Tune trials (Fu et al. 2016's QAN), optionally beside a stopper.

    policy: "builtin" | path to an exported controller folder | a `Controller`.
    action_mode: "lr" (multiplicative LR actions) or "minibatch" (class emphasis; the trainable
        must understand the `focus_class` hyperparameter); must match the controller's spec.
    control_every: act after every n-th training iteration of a trial.
    lr_key: the config key holding the LR (the trainable and QANReporter read the same key).
    stopper: any Tune scheduler deciding STOP/CONTINUE/PAUSE (ASHA, HyperBand, PBT, ...).
    metric, mode: as in Tune; usually given by tune.TuneConfig (set_search_properties).
    on_missing: "error" (default) raises when a result lacks the metric or the observation;
        "warn" logs once and lets such trials CONTINUE.
    obs_key: the result key of the observation.
    """

    def __init__(self, policy: Any = "builtin", action_mode: str = "lr", control_every: int = 1,
                 lr_key: str = "lr", stopper: TrialScheduler | None = None,
                 metric: str | None = None, mode: str | None = None, on_missing: str = "error",
                 obs_key: str = core.OBS_KEY):
        super().__init__()
        if not isinstance(control_every, int) or control_every < 1:
            raise ValueError(f"`control_every` is {control_every!r}; it must be an integer >= 1 "
                             "training iteration. Try control_every=1.")
        if on_missing not in ON_MISSING:
            raise ValueError(f"`on_missing` is {on_missing!r}; it must be one of {ON_MISSING}. "
                             "Use 'warn' to let trials without QAN features continue.")
        if mode is not None:
            core.sign(mode)
        if isinstance(stopper, QANScheduler):
            raise ValueError("`stopper` is a QANScheduler; it must be a stopping scheduler such "
                             "as ASHAScheduler, HyperBandScheduler or MedianStoppingRule.")
        _check_pbt_mutations(stopper, lr_key)
        self.controller = load_policy(policy)
        spec = self.controller.spec
        spec_mode = spec.get("action_mode", "lr")
        if action_mode != spec_mode:
            raise ValueError(f"`action_mode` is {action_mode!r} but the controller was trained "
                             f"with action_mode {spec_mode!r}. Pass action_mode={spec_mode!r}, "
                             "or a controller trained for that mode.")
        self.action_mode = action_mode
        self.rule = lr_rule(spec)
        qan = spec.get("qan", {})
        self.observe = {"with_weights": bool(qan.get("weight_features", True)),
                        "monitored_layers": list(qan.get("monitored_layers") or [])}
        self.keep = core.keep_action(self.rule.lr_factors)
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
        real_metric = self._metric if self._metric not in (None, "_metric") else None
        missing = core.missing_keys(result, real_metric, self.obs_key)
        if missing:
            message = core.missing_message(missing, tid, list(result))
            if self.on_missing == "error":
                raise ValueError(message)
            if not self._warned:
                logger.warning(message)
                self._warned = True
            return decision
        value = result.get(real_metric) if real_metric else 0.0
        if real_metric:
            state.best = max(state.best, core.score(value, self._mode))
        state.via_channel = core.VERSION_KEY in result
        fresh = core.result_is_fresh(result.get(core.VERSION_KEY), state.version, iteration,
                                     state.acted_iteration)
        due = core.control_due(iteration, self.control_every)
        if not core.should_act(decision, due, fresh, core.is_finite(value)):
            return decision
        obs = core.clean_observation(result[self.obs_key], self.controller.obs_size)
        action = core.choose_action(self.controller.q_values(obs), self.keep)
        changed = self._act(trial, state, iteration, action)
        self._persist()
        final = core.merge_decision(decision, state.via_channel, changed)
        if final == TrialScheduler.PAUSE and decision != TrialScheduler.PAUSE:
            self._paused_by_qan.add(tid)
        return final

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
        text = (f"QANScheduler: {len(self._trials)} trials, {actions} controller actions "
                f"(every {self.control_every} iteration(s), key {self.lr_key!r}).")
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

    # --- internals -------------------------------------------------------------------------------
    def _act(self, trial: Trial, state: TrialState, iteration: int, action: int) -> bool:
        """Apply `action` to the trial; True if the hyperparameters changed."""
        if self.action_mode == "minibatch":
            state.record_action(iteration, action, state.lr)
            trial.set_config({**trial.config, "focus_class": int(action)})
            self._publish(trial.trial_id, state, {"focus_class": int(action)})
            return True
        from qan_ray.control import next_lr

        new_lr = next_lr(self.rule, state.lr, action)
        changed = not math.isclose(new_lr, state.lr, rel_tol=1e-12)
        if not changed:
            state.history.append([iteration, action, state.lr])
            state.acted_iteration = iteration
            return False
        state.record_action(iteration, action, new_lr)
        self._set_config_lr(trial, state)
        if state.via_channel:
            self._publish(trial.trial_id, state)
        return True

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
            state.lr = float(lr)
            state.version += 1
            self._publish(trial.trial_id, state)
            self._persist()

    def _publish(self, trial_id: str, state: TrialState,
                 extra: dict[str, Any] | None = None) -> None:
        channel = self._open_channel()
        if channel is None:
            return
        hyper = {self.lr_key: state.lr, **(extra or {})}
        channel.publish.remote(trial_id, hyper, state.version, {self.lr_key: state.initial_lr},
                               self.observe)

    def _open_channel(self):
        if self._channel is None and self._experiment is not None:
            import ray

            from qan_ray.tune import open_channel

            for attempt in range(5):  # a channel killed a moment ago may still hold the name
                channel = open_channel(self._experiment, create=True)
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
                logger.info("QANScheduler: restored the state of %d trials from %s",
                            len(self._trials), saved)
        self._open_channel()

    def _finish(self, tune_controller, trial: Trial) -> None:
        self._paused_by_qan.discard(trial.trial_id)
        self._persist()
        if self._channel is not None:
            self._channel.drop.remote(trial.trial_id)
            live = [t for t in tune_controller.get_trials()
                    if t is not trial and not t.is_finished()]
            search = getattr(tune_controller, "search_alg", None)
            if not live and search is not None and search.is_finished():
                import ray  # the experiment is over: free the actor (a restore re-creates it)

                ray.kill(self._channel)
                self._channel = None

    def _persist(self) -> None:
        if self._state_dir is not None:
            self._write_state(os.path.join(self._state_dir, STATE_FILE))

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
