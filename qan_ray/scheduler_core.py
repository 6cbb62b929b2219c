"""The decision core of `QANScheduler`: small pure functions over plain values (no Ray here).

`qan_ray.scheduler.QANScheduler` only wires these to Tune's hooks; everything it decides is
decided here, so it is unit-tested without a Ray session (tests/test_scheduler.py).

Vocabulary:
- a *result* is the flat dict a trial reported to Tune for one training iteration;
- the trainable-side helper (`qan_ray.tune.QANReporter`) hands the controller's observation to
  the control channel and reports its sequence number under `OBS_REF_KEY` (or, without a channel,
  the observation itself under `OBS_KEY`), the progress under `PROGRESS_KEY`, and, when it reads
  the control channel, the version of the hyperparameters it applied under `VERSION_KEY`;
- the *score* of a metric value is `sign(mode) * value`, so every comparison maximises, and a
  NaN/inf value scores -inf (worst), never raises.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

OBS_KEY = "qan_obs"
"""Result key of an inline observation (list of float32, `contract.Observer.observe`)."""
OBS_REF_KEY = "qan_obs_ref"
"""Result key: sequence number of the observation the trainable put on the control channel."""
OBS_ERROR_KEY = "qan_obs_error"
"""Result key: why the trainable could not build the observation (the trial is not driven)."""
PROGRESS_KEY = "qan_progress"
"""Result key: fraction of the trial's budget done (QAN does not act on a finished trial)."""
VERSION_KEY = "qan_version"
"""Result key: version of the control-channel hyperparameters the trainable trained with (its
acknowledgment: a decision published later is not in this result)."""
LR_KEY = "qan_lr"
"""Result key: the LR the iteration trained with (first param group; what QAN records)."""
OWN_SCHEDULE_KEY = "qan_own_schedule"
"""Result key: the trainable schedules its own LR; QAN's decision is a factor on it."""
RESCUED_KEY = "qan_rescued"
"""Result key: the rescue guard rolled this iteration back (QANScheduler cuts the LR)."""
RESCUES_KEY = "qan_rescues"
"""Result key: the trial's rescues so far."""
RESCUE_ACTION = -2
"""The action recorded in a trial's history for a rescue (-1: a stopper set the LR)."""

CONTINUE, PAUSE, STOP, NOOP = "CONTINUE", "PAUSE", "STOP", "NOOP"  # TrialScheduler's constants


def sign(mode: str) -> float:
    """+1 for mode 'max', -1 for 'min': score = sign * value is always maximised."""
    if mode == "max":
        return 1.0
    if mode == "min":
        return -1.0
    raise ValueError(f"`mode` is {mode!r}; it must be 'min' or 'max'. Pass mode='max' for an "
                     "accuracy, mode='min' for a loss (to QANScheduler or tune.TuneConfig).")


def is_finite(value: Any) -> bool:
    """True for a real, finite number (bool excluded); False for None, NaN, inf, strings."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        return False
    return math.isfinite(float(value))


def score(value: Any, mode: str) -> float:
    """sign(mode) * value; NaN, inf, None or a non-number scores -inf (the worst)."""
    s = sign(mode)
    return s * float(value) if is_finite(value) else -math.inf


def missing_keys(result: dict[str, Any], metric: str | None, obs_key: str = OBS_KEY
                 ) -> list[str]:
    """The keys QANScheduler needs that `result` lacks (metric first), in a fixed order. The
    observation may come inline (`obs_key`), through the channel (OBS_REF_KEY), or be explained
    away (OBS_ERROR_KEY)."""
    missing = [metric] if metric and metric not in result else []
    if not any(k in result for k in (obs_key, OBS_REF_KEY, OBS_ERROR_KEY)):
        missing.append(obs_key)
    return missing


def missing_message(missing: list[str], trial_id: str, present: list[str]) -> str:
    """The error/warning text for a result without the metric or the observation."""
    return (f"trial {trial_id} reported a result without {missing}, which QANScheduler needs "
            f"(it has {sorted(present)[:12]}...). Report them with the helper: "
            "`tune.report({**metrics, **reporter.metrics(model, ...)})` from qan_ray.tune, or "
            "pass QANScheduler(on_missing='warn') to warn once and let such trials CONTINUE.")


def control_due(iteration: int, control_every: int) -> bool:
    """Act after every `control_every`-th training iteration (1, 2, ... are iterations)."""
    return iteration >= 1 and iteration % control_every == 0


def result_is_fresh(reported_version: Any, published_version: int, iteration: int,
                    acted_iteration: int) -> bool:
    """Whether a result was trained with the hyperparameters of QAN's last action, so the
    controller may act on it. A result from before that (a repeat after a PBT rollback, an
    iteration already in flight) must not trigger a second action on top of the first.
    With the channel, the trainable reports the version it applied; without it (restart
    fallback) the iteration must be newer than the one acted on."""
    if reported_version is not None:
        return int(reported_version) >= published_version
    return iteration > acted_iteration


def should_act(decision: str, due: bool, fresh: bool, metric_finite: bool,
               finished: bool = False) -> bool:
    """QAN acts only when the stopper lets the trial go on (CONTINUE, or PAUSE: it resumes with
    the new hyperparameters), it is a control step, the result reflects QAN's last action, the
    metric is finite (a diverged trial is the stopper's business, not the controller's), and the
    trial has budget left (an action after the last iteration would never be trained with, and
    would leave the config's LR different from the one the trial ended with)."""
    return decision in (CONTINUE, PAUSE) and due and fresh and metric_finite and not finished


def finished(result: dict[str, Any]) -> bool:
    """Whether the trial reported its last iteration (progress 1, or Tune's `done`)."""
    progress = result.get(PROGRESS_KEY)
    return bool(result.get("done")) or (is_finite(progress) and float(progress) >= 1.0)


def merge_decision(stopper_decision: str, via_channel: bool, changed: bool) -> str:
    """The decision returned to Tune. With the control channel a change needs no restart. Without
    it (the trainable does not poll the channel) a change is applied by `trial.set_config` +
    PAUSE (restart from the last checkpoint). STOP, PAUSE and NOOP of the stopper always win."""
    if stopper_decision != CONTINUE or via_channel or not changed:
        return stopper_decision
    return PAUSE


@dataclass
class TrialState:
    """What QAN keeps per trial (keyed by trial id); JSON-serialisable via to_dict/from_dict."""

    lr: float
    """The LR QAN last published (the trial's current LR)."""
    initial_lr: float
    """The trial's LR when it was added (the `log_lr_vs_initial` signal's reference)."""
    version: int = 0
    """Version of the published hyperparameters; 0 = nothing published beyond the config."""
    last_iteration: int = 0
    """Training iteration of the last result seen."""
    acted_iteration: int = 0
    """Training iteration of the last result QAN acted on."""
    via_channel: bool = False
    """The trainable reads the control channel (it reports VERSION_KEY)."""
    history: list[list[float]] = field(default_factory=list)
    """[iteration, action, lr_after] per action taken, in order."""
    trained: dict[int, float] = field(default_factory=dict)
    """iteration -> the LR that iteration trained with (a repeat after a rollback overwrites)."""
    skipped: str | None = None
    """Why QAN does not drive this trial (its observation does not fit); None = it does."""
    correction: float = 1.0
    """lr_schedule cosine: the controller's factor on the cosine decay from initial_lr."""
    rescues: int = 0
    """Rescues of the guard so far (each cut the LR)."""
    own_schedule: bool = False
    """The trainable schedules its own LR (QANReporter(own_schedule=True)): QAN's LR is a
    factor on it, so a cosine controller's correction applies without the controller's cosine."""
    published: dict[int, float] = field(default_factory=dict)
    """version -> the LR published with it (what a result acknowledging that version trained
    with, when the result does not say)."""

    def to_dict(self) -> dict[str, Any]:
        return {"lr": self.lr, "initial_lr": self.initial_lr, "version": self.version,
                "last_iteration": self.last_iteration, "acted_iteration": self.acted_iteration,
                "via_channel": self.via_channel, "history": [list(h) for h in self.history],
                "trained": {str(k): v for k, v in self.trained.items()},
                "skipped": self.skipped, "correction": self.correction,
                "rescues": self.rescues, "own_schedule": self.own_schedule,
                "published": {str(k): v for k, v in self.published.items()}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrialState:
        return cls(lr=float(d["lr"]), initial_lr=float(d["initial_lr"]),
                   version=int(d.get("version", 0)),
                   last_iteration=int(d.get("last_iteration", 0)),
                   acted_iteration=int(d.get("acted_iteration", 0)),
                   via_channel=bool(d.get("via_channel", False)),
                   history=[list(h) for h in d.get("history", [])],
                   trained={int(k): float(v) for k, v in d.get("trained", {}).items()},
                   skipped=d.get("skipped"), correction=float(d.get("correction", 1.0)),
                   rescues=int(d.get("rescues", 0)),
                   own_schedule=bool(d.get("own_schedule", False)),
                   published={int(k): float(v) for k, v in d.get("published", {}).items()})

    def record_action(self, iteration: int, action: int, lr: float) -> None:
        self.history.append([int(iteration), int(action), float(lr)])
        self.set_lr(lr)
        self.acted_iteration = int(iteration)

    def set_lr(self, lr: float) -> None:
        """A new LR to publish: the next version."""
        self.lr = float(lr)
        self.version += 1
        self.published[self.version] = self.lr

    def trained_lr(self, result: dict[str, Any], fresh: bool) -> float:
        """The LR the iteration of `result` trained with, from the trainable's acknowledgment:
        the LR it reports (LR_KEY), else the LR of the version it reports, else (restart
        fallback) the current LR for a fresh result. Never an LR only published after it."""
        return trained_lr(result, fresh, self.lr, self.published, self.initial_lr)


def trained_lr(result: dict[str, Any], fresh: bool, current: float,
               published: dict[int, float], initial: float) -> float:
    """See `TrialState.trained_lr`."""
    if is_finite(result.get(LR_KEY)):
        return float(result[LR_KEY])
    version = result.get(VERSION_KEY)
    if version is not None and not fresh:
        version = int(version)
        return published.get(version, initial if version == 0 else current)
    return current


def initial_lr_of(config: dict[str, Any], lr_key: str, trial_id: str) -> float:
    """The trial's LR from its config; a clear error if it is missing or not a positive number."""
    if lr_key not in config:
        raise ValueError(f"trial {trial_id}'s config has no {lr_key!r} (keys: "
                         f"{sorted(config)}). QANScheduler(lr_key={lr_key!r}) controls that key:"
                         " add it to param_space, or pass the key your trainable reads as lr_key.")
    lr = config[lr_key]
    if not is_finite(lr) or float(lr) <= 0:
        raise ValueError(f"trial {trial_id}'s {lr_key!r} is {lr!r}; it must be a number > 0. "
                         "Sample it from e.g. tune.loguniform(1e-3, 1).")
    return float(lr)
