"""The controller contract: what a controller observes, what its actions do, where it came from.

One module, so the producers of an observation (the meta-training environment, `QANReporter` in a
user's Tune trainable, `qan evaluate`, the selection actor) and its consumers (RLlib's learner, the
exported `Controller`, `QANScheduler`) cannot drift apart:

- `ObservationSpec`: format version, feature names, options. Its length is the same for every
  model (`features.WEIGHT_FEATURES` pooled weight statistics + `SIGNAL_NAMES`), so one controller
  fits a 2-layer MLP, a 6-layer MLP, a LeNet, a 1-D CNN and a WideResNet.
- `Observer`: owns the references (initial LR, the chance-level loss, the loss and LR history) and
  builds the vector. Everyone who observes uses it; nobody else computes a signal.
- `ActionSpec`: the LR rule (factors, restart, clamp) or the minibatch mode; the one keep action,
  the one LR arithmetic, the one LR writer and the one (NaN-safe) greedy action.
- `ControllerSpec`: the three above plus the Q-network shape and provenance, as `spec.json`.
  `check_fits` refuses a controller whose observation differs, naming both sides and the fix.

Normalisation: no signal depends on the dataset's scale or the loss magnitude. Losses enter as
log ratios to the chance-level cross-entropy log(num_classes) (the same reference in training
and in Tune, with no probe pass), the LR as its log and its log ratio to the trial's start,
accuracy as the fraction of the way from chance to perfect, time as fractions of the episode.
"""

from __future__ import annotations

import json
import math
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from qan_ray.config import CLASS_ACTIONS
from qan_ray.constants import NUM_CLASSES, chance_accuracy
from qan_ray.features import weight_feature_names, weight_features
from qan_ray.schedules import cosine_factor

OBS_VERSION = 2
"""Observation format. 2: pooled weight statistics + normalised signals (fixed length). Specs
written before it (no `format` field) carry the per-layer vector, whose length depends on the
model; they read as version 1."""
SPEC_FORMAT = 2
"""Layout of spec.json."""
SIGNAL_NAMES = (
    "log10_lr",             # the LR trained with since the last observation
    "log_lr_vs_initial",    # log(lr / the trial's initial LR)
    "last_log_lr_change",   # log(lr / previous interval's lr): the last action's effect
    "since_lr_change",      # episode fraction since the LR last changed
    "log_train_loss",       # log(train loss / log C): 0 at chance, negative when learning
    "log_val_loss",         # log(val loss / log C)
    "train_val_gap",        # log(val loss / train loss)
    "loss_slope",           # mean change of log train loss per observation (last 3)
    "loss_noise",           # std of those changes (last 5)
    "val_acc_above_chance",  # (acc - 1/C) / (1 - 1/C)
    "val_acc_change",       # change of that since the last observation
    "progress",             # fraction of the episode / trial budget done
    "nonfinite",            # count of non-finite entries zeroed in this vector
)
CLASS_SIGNAL_NAMES = tuple(
    f"rank{r}.{name}" for r in range(NUM_CLASSES)
    for name in ("log_val_loss",    # log(val loss of the class / log C), classes sorted by it
                 "val_acc",         # its val accuracy (recall) above chance
                 "share",           # its share of the next batches x C (1 = balanced)
                 "data_share")      # its share of the training split x C (uniform batches)
) + ("balanced_acc_above_chance",   # the mean of the classes' val accuracies, above chance
     "shift_from_data")             # total variation between the shares and the data's
"""Minibatch mode's per-class block (after SIGNAL_NAMES): classes ranked by validation loss,
hardest first, so the vector does not depend on which label a class has (the class actions name
none either)."""
SLOPE_WINDOW, NOISE_WINDOW = 3, 5
LR_MODES = ("lr", "minibatch")
LR_SCHEDULES = ("constant", "cosine")
CORRECTION_RANGE = (1 / 1024, 1024.0)
"""Bounds of the cosine schedule's correction factor (the LR itself is clamped too)."""


def _safe_log(x: float) -> float:
    return math.log(x) if x > 0 and math.isfinite(x) else float("nan")


# --- observation ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class ObservationSpec:
    """What a controller observes. Equal specs give equal vectors for equal training states."""

    version: int = OBS_VERSION
    """Observation format (OBS_VERSION)."""
    with_weights: bool = True
    """Pooled weight statistics first (the paper's state); False = training signals only."""
    monitored_layers: tuple[str, ...] = ()
    """Linear/Conv module names observed (empty = every one)."""
    num_classes: int = NUM_CLASSES
    """Classes of the task: the chance level of loss and accuracy."""
    names: tuple[str, ...] | None = None
    """Feature names as stored (None = this code's names for `version`)."""
    class_signals: bool = False
    """The per-class block (CLASS_SIGNAL_NAMES) last: minibatch mode's observation."""

    @property
    def feature_names(self) -> list[str]:
        if self.names is not None:
            return list(self.names)
        weights = weight_feature_names() if self.with_weights else []
        signals = [f"signal.{s}" for s in SIGNAL_NAMES]
        if self.class_signals:  # before `nonfinite`, which stays the last entry
            signals[-1:-1] = [f"class.{s}" for s in CLASS_SIGNAL_NAMES]
        return weights + signals

    @property
    def size(self) -> int:
        return len(self.feature_names)

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "with_weights": self.with_weights,
                "monitored_layers": list(self.monitored_layers),
                "num_classes": self.num_classes, "class_signals": self.class_signals,
                "size": self.size,
                "feature_names": self.feature_names}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ObservationSpec:
        names = d.get("feature_names")
        if names and d.get("size") is not None and int(d["size"]) != len(names):
            raise ValueError(f"its observation declares size {d['size']} but lists "
                             f"{len(names)} feature names")
        if names and int(d.get("version", 1)) == OBS_VERSION:
            mine = cls(with_weights=bool(d.get("with_weights", True)),
                       class_signals=bool(d.get("class_signals", False)))
            if list(names) != mine.feature_names:
                raise ValueError(f"its observation (format {OBS_VERSION}) lists {len(names)} "
                                 f"feature names where the format has {mine.size}")
        return cls(version=int(d.get("version", 1)),
                   with_weights=bool(d.get("with_weights", True)),
                   monitored_layers=tuple(d.get("monitored_layers") or ()),
                   num_classes=int(d.get("num_classes", NUM_CLASSES)),
                   names=tuple(d["feature_names"]) if d.get("feature_names") else None,
                   class_signals=bool(d.get("class_signals", False)))

    def mismatch(self, other: ObservationSpec) -> str | None:
        """Why `other` (what a trainable or environment produces) does not fit a controller
        trained on `self`; None when it fits."""
        if self.version != other.version:
            return f"observation format {self.version} vs {other.version}"
        if self.with_weights != other.with_weights:
            return (f"with_weights {self.with_weights} vs {other.with_weights}")
        if self.class_signals != other.class_signals:
            return (f"per-class signals (minibatch mode) {self.class_signals} vs "
                    f"{other.class_signals}")
        mine, theirs = self.feature_names, other.feature_names
        if mine != theirs:
            diff = next((i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b),
                        min(len(mine), len(theirs)))
            first = (mine[diff] if diff < len(mine) else "<end>",
                     theirs[diff] if diff < len(theirs) else "<end>")
            return (f"{len(mine)} vs {len(theirs)} features, first difference at #{diff}: "
                    f"{first[0]!r} vs {first[1]!r}")
        if self.num_classes != other.num_classes:
            return f"num_classes {self.num_classes} vs {other.num_classes}"
        return None


class Observer:
    """Builds the observation vector of one run (an episode, a Tune trial) from its model and its
    training signals, and keeps the references and history the signals need.

    Call `reset(initial_lr)` at the start of a run, then `observe(...)` at every control point
    with the LR the last interval trained with. `state_dict()` survives a Tune checkpoint."""

    def __init__(self, spec: ObservationSpec | None = None, initial_lr: float = 1.0):
        self.spec = spec or ObservationSpec()
        self.chance_loss = math.log(self.spec.num_classes)
        self.reset(initial_lr)

    def reset(self, initial_lr: float) -> None:
        self.initial_lr = float(initial_lr)
        self._log_losses: deque[float] = deque(maxlen=NOISE_WINDOW + 1)
        self._prev_lr: float | None = None
        self._changed_at = 0.0
        self._prev_acc: float | None = None

    def signals(self, *, lr: float, train_loss: float, val_loss: float, val_accuracy: float,
                progress: float) -> list[float]:
        """The SIGNAL_NAMES values (the last, `nonfinite`, is filled by `observe`); updates the
        history, so call it once per control point."""
        log_lr = _safe_log(lr)
        prev = self._prev_lr if self._prev_lr is not None else lr
        lr_change = log_lr - _safe_log(prev)
        if self._prev_lr is not None and not math.isclose(lr, prev, rel_tol=1e-9):
            self._changed_at = progress
        self._prev_lr = lr
        log_train = _safe_log(train_loss / self.chance_loss)
        log_val = _safe_log(val_loss / self.chance_loss)
        self._log_losses.append(log_train)
        hist = list(self._log_losses)
        diffs = [b - a for a, b in zip(hist, hist[1:])]
        slope = float(np.mean(diffs[-SLOPE_WINDOW:])) if diffs else 0.0
        noise = float(np.std(diffs[-NOISE_WINDOW:])) if len(diffs) > 1 else 0.0
        c = self.spec.num_classes
        chance = chance_accuracy(c)
        acc = ((val_accuracy - chance) / (1.0 - chance) if math.isfinite(val_accuracy)
               else 0.0)
        acc_change = acc - self._prev_acc if self._prev_acc is not None else 0.0
        self._prev_acc = acc
        return [math.log10(lr) if lr > 0 else float("nan"), log_lr - _safe_log(self.initial_lr),
                lr_change, progress - self._changed_at, log_train, log_val, log_val - log_train,
                slope, noise, acc, acc_change, float(progress), 0.0]

    def observe(self, model, *, lr: float, train_loss: float, val_loss: float,
                val_accuracy: float, progress: float,
                classes: dict[str, Any] | None = None) -> np.ndarray:
        """The observation (float32, length `spec.size`) of `model` (its weight statistics are
        computed on its device). Non-finite entries become 0 and their count is the last entry.
        `classes`: with a spec's class_signals, the per-class inputs of `class_signals`."""
        weights = (weight_features(model, self.spec.monitored_layers) if self.spec.with_weights
                   else None)
        return self.observe_weights(weights, lr=lr, train_loss=train_loss, val_loss=val_loss,
                                    val_accuracy=val_accuracy, progress=progress,
                                    classes=classes)

    def observe_weights(self, weights: Any, *, lr: float, train_loss: float, val_loss: float,
                        val_accuracy: float, progress: float,
                        classes: dict[str, Any] | None = None) -> np.ndarray:
        """`observe` from weight statistics computed elsewhere (a population computes every
        member's in one batched call): `weights` is one member's `features.weight_features`
        vector (a tensor or array), or None for a signals-only spec."""
        sig = np.asarray(self.signals(lr=lr, train_loss=train_loss, val_loss=val_loss,
                                      val_accuracy=val_accuracy, progress=progress),
                         dtype=np.float32)
        if self.spec.with_weights:
            w = weights.detach().cpu().numpy() if hasattr(weights, "detach") else weights
            sig = np.concatenate([np.asarray(w, dtype=np.float32).reshape(-1), sig])
        if self.spec.class_signals:
            if classes is None:
                raise ValueError("this observation (minibatch mode) needs the per-class "
                                 "signals: pass classes={'class_loss', 'class_accuracy', "
                                 "'shares', 'data_shares'} (PopulationTrainer.evaluate_classes "
                                 "and class_shares give them).")
            block = class_signals(self.spec.num_classes, **classes)
            sig = np.concatenate([sig[:-1], block, sig[-1:]])  # nonfinite stays last
        return clean(sig, self.spec.size)

    def state_dict(self) -> dict[str, Any]:
        return {"initial_lr": self.initial_lr, "log_losses": list(self._log_losses),
                "prev_lr": self._prev_lr, "changed_at": self._changed_at,
                "prev_acc": self._prev_acc}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.initial_lr = float(state["initial_lr"])
        self._log_losses = deque(state.get("log_losses", []), maxlen=NOISE_WINDOW + 1)
        self._prev_lr = state.get("prev_lr")
        self._changed_at = float(state.get("changed_at", 0.0))
        self._prev_acc = state.get("prev_acc")


def class_signals(num_classes: int, *, class_loss: Any, class_accuracy: Any, shares: Any,
                  data_shares: Any) -> np.ndarray:
    """The CLASS_SIGNAL_NAMES values: per class (ranked by val loss, highest first; a NaN loss
    ranks last) log(loss / log C), accuracy above chance, share x C and data share x C; then
    the balanced accuracy above chance and the total variation between shares and data
    shares."""
    c = int(num_classes)
    loss = np.asarray(class_loss, dtype=np.float64).reshape(-1)[:c]
    acc = np.asarray(class_accuracy, dtype=np.float64).reshape(-1)[:c]
    share = np.asarray(shares, dtype=np.float64).reshape(-1)[:c]
    data = np.asarray(data_shares, dtype=np.float64).reshape(-1)[:c]
    chance = chance_accuracy(c)
    order = np.argsort(-np.where(np.isfinite(loss), loss, -np.inf), kind="stable")
    with np.errstate(divide="ignore", invalid="ignore"):
        log_loss = np.log(loss / math.log(c))
        above = (acc - chance) / (1 - chance)
    rows = np.stack([log_loss, above, share * c, data * c], axis=1)[order].reshape(-1)
    balanced = float(np.nanmean(above)) if np.isfinite(above).any() else 0.0
    shift = 0.5 * float(np.abs(share - data).sum())
    return np.concatenate([rows, [balanced, shift]]).astype(np.float32)


def clean(values: Any, size: int) -> np.ndarray:
    """A reported observation as float32 of length `size`; NaN/inf entries become 0 and their
    count is added to the last entry (as `Observer.observe` does)."""
    obs = np.asarray(values, dtype=np.float32).reshape(-1)
    if obs.shape[0] != size:
        raise ValueError(f"the observation has {obs.shape[0]} values but the controller expects "
                         f"{size}. Report it with qan_ray.tune.QANReporter (or build it with "
                         "qan_ray.contract.Observer), or use a controller of the same format.")
    bad = ~np.isfinite(obs)
    if bad.any():
        obs = np.where(bad, np.float32(0.0), obs)
        obs[-1] = obs[-1] + np.float32(bad.sum())
    return obs


# --- actions -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ActionSpec:
    """What the controller's actions do."""

    mode: str = "lr"
    """lr: multiply the LR | minibatch: move the class shares of the next batches (CLASS_ACTIONS,
    qan_ray.class_sampling)."""
    lr_factors: tuple[float, ...] = (0.5, 0.9, 1.0, 1.1, 2.0)
    """Action i multiplies the LR by lr_factors[i] (lr mode)."""
    restart_lr: float | None = None
    """One more action resets the LR to this value (None = no restart action)."""
    lr_min: float = 1e-5
    lr_max: float = 1.0
    num_classes: int = NUM_CLASSES
    """Minibatch mode: the classes whose shares the class actions move."""
    schedule: str = "constant"
    """constant: an action multiplies the current LR | cosine: an action multiplies a correction
    c of a cosine decay from the run's initial LR, lr = clamp(lr0 * c * (1 + cos(pi p)) / 2) at
    progress p, so the keep action is plain cosine (a strong baseline) and the controller only
    learns deviations from it."""

    @classmethod
    def from_config(cls, cfg) -> ActionSpec:
        return cls(mode=cfg.action_mode, lr_factors=tuple(cfg.lr_factors),
                   restart_lr=cfg.restart_lr, lr_min=cfg.lr_min, lr_max=cfg.lr_max,
                   schedule=getattr(cfg, "lr_schedule", "constant"))

    def validate(self) -> ActionSpec:
        if self.schedule not in LR_SCHEDULES:
            raise ValueError(f"LR schedule {self.schedule!r} must be one of {LR_SCHEDULES}. "
                             "Re-export the controller with `qan train`.")
        if self.mode not in LR_MODES:
            raise ValueError(f"action mode {self.mode!r} must be one of {LR_MODES}. Re-export the "
                             "controller with `qan train`.")
        if not (0 < self.lr_min <= self.lr_max) or not all(f > 0 for f in self.lr_factors):
            raise ValueError(f"the LR rule (lr_factors {self.lr_factors}, lr_min {self.lr_min}, "
                             f"lr_max {self.lr_max}) is invalid: factors must be > 0 and 0 < "
                             "lr_min <= lr_max. Re-export the controller with `qan train`.")
        return self

    @property
    def num_actions(self) -> int:
        if self.mode == "minibatch":
            return len(CLASS_ACTIONS)
        return len(self.lr_factors) + (self.restart_lr is not None)

    @property
    def labels(self) -> list[str]:
        if self.mode == "minibatch":
            return list(CLASS_ACTIONS)
        labels = ["keep" if f == 1.0 else f"x{f:g}" for f in self.lr_factors]
        if self.restart_lr is not None:
            labels.append(f"restart {self.restart_lr:g}")
        return labels

    @property
    def keep(self) -> int | None:
        """The action that leaves the LR (minibatch mode: the class mix) unchanged; None if there
        is none."""
        if self.mode == "minibatch":
            return 0
        return self.lr_factors.index(1.0) if 1.0 in self.lr_factors else None

    @property
    def keep_action(self) -> int:
        """The action a run takes when nobody decides (a baseline's rollout, all-NaN Q-values):
        keep, or action 0 if there is no keep action."""
        return 0 if self.keep is None else self.keep

    def clamp(self, lr: float) -> float:
        return float(min(max(lr, self.lr_min), self.lr_max))

    def checked(self, action: int) -> int:
        """`action` as an int; a clear error when it is not one of this spec's actions."""
        action = int(action)
        if not 0 <= action < self.num_actions:
            raise ValueError(f"action {action} is outside 0..{self.num_actions - 1} for action "
                             f"mode {self.mode!r}.")
        return action

    def next_lr(self, lr: float, action: int) -> float:
        """The LR after `action` (lr mode), clamped to [lr_min, lr_max]."""
        action = self.checked(action)
        if self.mode == "minibatch":
            return float(lr)
        if action < len(self.lr_factors):
            return self.clamp(lr * self.lr_factors[action])
        return self.clamp(float(self.restart_lr))

    def next_correction(self, correction: float, action: int, initial_lr: float) -> float:
        """Cosine schedule: the correction after `action` (restart: the correction that puts the
        schedule's start at restart_lr), within CORRECTION_RANGE."""
        action = self.checked(action)
        if self.mode == "minibatch":
            return float(correction)
        c = (correction * self.lr_factors[action] if action < len(self.lr_factors)
             else float(self.restart_lr) / initial_lr)
        return float(min(max(c, CORRECTION_RANGE[0]), CORRECTION_RANGE[1]))

    def scheduled_lr(self, initial_lr: float, correction: float, progress: float) -> float:
        """Cosine schedule: the LR of the interval starting at `progress` (0..1)."""
        return self.clamp(initial_lr * correction * cosine_factor(progress))

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "lr_factors": list(self.lr_factors),
                "restart_lr": self.restart_lr, "lr_min": self.lr_min, "lr_max": self.lr_max,
                "schedule": self.schedule, "labels": self.labels,
                "num_actions": self.num_actions}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ActionSpec:
        return cls(mode=d.get("mode", "lr"), lr_factors=tuple(d.get("lr_factors",
                                                                    cls.lr_factors)),
                   restart_lr=d.get("restart_lr"), lr_min=float(d.get("lr_min", 1e-5)),
                   lr_max=float(d.get("lr_max", 1.0)),
                   schedule=d.get("schedule", "constant")).validate()


def write_lr(optimizer, lr: float) -> float:
    """The one place an LR is written: every param group of `optimizer`, effective at once."""
    for group in optimizer.param_groups:
        group["lr"] = float(lr)
    return float(lr)


def greedy_action(q_values: Any, fallback: int) -> int:
    """argmax of the Q-values ignoring NaN; `fallback` when none is finite."""
    q = np.asarray(q_values, dtype=np.float64).reshape(-1)
    finite = np.isfinite(q)
    if not finite.any():
        return int(fallback)
    return int(np.argmax(np.where(finite, q, -np.inf)))


# --- the whole controller ------------------------------------------------------------------------
@dataclass
class ControllerSpec:
    """spec.json of an exported controller."""

    observation: ObservationSpec
    action: ActionSpec
    hidden: tuple[int, ...] = (64, 64)
    """Hidden widths of the Q-MLP (policies.qnet.plain_qnet)."""
    provenance: dict[str, Any] = field(default_factory=dict)
    """task (QANConfig dict), meta (MetaConfig dict), command, commit, created, episodes,
    selection."""

    @property
    def obs_size(self) -> int:
        return self.observation.size

    @property
    def num_actions(self) -> int:
        return self.action.num_actions

    @property
    def task(self) -> dict[str, Any]:
        """The QANConfig fields the controller was trained on ({} if unknown)."""
        return dict(self.provenance.get("task") or {})

    def fallback_action(self) -> int:
        """What to do when the Q-values are all NaN: keep the LR (or action 0)."""
        return self.action.keep_action

    def check_fits(self, produced: ObservationSpec, where: str) -> None:
        """Refuse (ValueError) when `produced` (the observation `where` builds) does not fit."""
        why = self.observation.mismatch(produced)
        if why is not None:
            raise ValueError(self.mismatch_message(why, where))

    def mismatch_message(self, why: str, where: str) -> str:
        task = self.task.get("task", "?")
        return (f"the controller (trained on task {task!r}, observation format "
                f"{self.observation.version}, {self.observation.size} features) does not fit "
                f"{where} (observation format {OBS_VERSION}): {why}. Use a controller exported "
                "by this version of qan-ray (policy='builtin', or retrain: `qan train --task "
                f"{task if task != '?' else 'digits-mlp'} --out DIR`).")

    def to_dict(self) -> dict[str, Any]:
        return {"format": SPEC_FORMAT, "observation": self.observation.to_dict(),
                "action": self.action.to_dict(), "hidden": list(self.hidden),
                "provenance": self.provenance}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ControllerSpec:
        if "format" not in d:  # written before the contract: per-layer observation
            q = d.get("qan", {})
            obs = ObservationSpec(version=1, with_weights=bool(q.get("weight_features", True)),
                                  monitored_layers=tuple(q.get("monitored_layers") or ()),
                                  names=tuple(d.get("feature_names")
                                              or (f"legacy.{i}" for i in range(d["obs_size"]))))
            action = ActionSpec(mode=d.get("action_mode", "lr"),
                                lr_factors=tuple(q.get("lr_factors", ActionSpec.lr_factors)),
                                restart_lr=q.get("restart_lr"),
                                lr_min=float(q.get("lr_min", 1e-5)),
                                lr_max=float(q.get("lr_max", 1.0))).validate()
            prov = {k: v for k, v in d.items() if k not in ("obs_size", "feature_names")}
            prov["task"] = q
            return cls(obs, action, tuple(d.get("hidden", (64, 64))), prov)
        if int(d["format"]) > SPEC_FORMAT:
            raise ValueError(f"spec format {d['format']} is newer than this qan-ray reads "
                             f"({SPEC_FORMAT}). Upgrade qan-ray.")
        return cls(ObservationSpec.from_dict(d["observation"]),
                   ActionSpec.from_dict(d["action"]), tuple(d.get("hidden", (64, 64))),
                   dict(d.get("provenance", {})))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, default=str))

    @classmethod
    def load(cls, path: str | Path) -> ControllerSpec:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
            return cls.from_dict(data)
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
            raise ValueError(f"{path} is not a valid controller spec ({type(err).__name__}: "
                             f"{err}). Re-export the controller with `qan train`, or restore "
                             "the file from the run folder.") from err
        except ValueError as err:  # a spec that contradicts itself
            raise ValueError(f"{path} is not a valid controller spec: {err}. Re-export the "
                             "controller with `qan train`, or restore the file from the run "
                             "folder.") from err


def spec_for(cfg, hidden: tuple[int, ...], provenance: dict[str, Any] | None = None
             ) -> ControllerSpec:
    """The spec of a controller trained on task config `cfg` (a QANConfig)."""
    return ControllerSpec(observation_spec(cfg), ActionSpec.from_config(cfg).validate(),
                          tuple(hidden), {"task": cfg.to_dict(), **(provenance or {})})


def action_spec(cfg) -> ActionSpec:
    """The actions a task config asks for (labels, keep action, LR rule), validated."""
    return ActionSpec.from_config(cfg).validate()


def observation_spec(cfg) -> ObservationSpec:
    """The observation a task config asks for."""
    return ObservationSpec(with_weights=cfg.weight_features,
                           monitored_layers=tuple(cfg.monitored_layers),
                           class_signals=cfg.action_mode == "minibatch")


__all__ = ["OBS_VERSION", "SIGNAL_NAMES", "ActionSpec", "ControllerSpec", "ObservationSpec",
           "Observer", "action_spec", "clean", "greedy_action", "observation_spec", "spec_for",
           "write_lr"]
