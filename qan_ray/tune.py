"""Trainable side of `QANScheduler`: what a user adds to their own Ray Tune function trainable.

Three lines per training iteration (see docs/scheduler.md for a complete example):
1. `reporter.apply(optimizer)` before training: read the current hyperparameters from the control
   channel (one cheap actor call) and put QAN's decision into effect. No restart: the LR QAN chose
   after the previous iteration is in effect for this one. Without QANScheduler it changes
   nothing: the optimizer keeps the LRs the user's own code set.
2. train and validate as usual (the user's own LR scheduler steps as usual);
3. `tune.report({**metrics, **reporter.metrics(model, train_loss=..., val_loss=...,
   val_accuracy=..., progress=...)})`.

How QAN's decision reaches the optimizer (with QANScheduler):
- `own_schedule=False` (default; the built-in trainables): QAN's LR is the LR. `apply` writes it
  into the first param group and every other group at its own ratio to the first (the ratios the
  user's optimizer had when `apply` first saw it), so a head at 10 x the backbone stays at 10 x.
  A cosine controller's "keep" follows the cosine from the trial's start LR (how it was trained).
- `own_schedule=True`: the trainable has its own LR schedule. QAN's decision is a factor, QAN's
  LR / the trial's start LR, that multiplies each param group's own LR while the optimizer steps
  (a step pre-hook scales, a post-hook restores the user's exact values), so the user's scheduler
  sees and steps its own LRs, and "keep" means the user's schedule unchanged.

`reporter.metrics` builds the controller's observation with the contract's `Observer` (the same
code the meta-training environment uses) on the model's device and hands it to the scheduler
through the control channel, not through the result: Tune's results, progress table and
experiment state stay the size of a few scalars whatever the model. The result carries only the
channel version the iteration trained with (`qan_version`, the trainable's acknowledgment of QAN's
decision), the LR it trained with (`qan_lr`), the observation's sequence number (`qan_obs_ref`)
and the progress (`qan_progress`).

The control channel is one named Ray actor per experiment (`ControlChannel`, 0 CPUs) holding
{trial_id: {hyperparams, version, initial, observe}} and each trial's latest observation.
QANScheduler writes the hyperparameters in `on_trial_result` and waits for the write; Tune
resumes a function trainable only after that hook returned, so the next `apply` sees the change.
A decision that still arrives while an iteration trains (another publisher, a slow channel) is
trained with from the next `apply` on; the iteration in flight reports the version and LR it did
train with.
Without QANScheduler (no channel) the reporter changes no LR and skips the features, so the same
trainable runs unchanged under ASHA, PBT or FIFO.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from qan_ray.config import QANConfig
from qan_ray.constants import NUM_CLASSES
from qan_ray.contract import OBS_VERSION, ObservationSpec, Observer
from qan_ray.episode import dying
from qan_ray.rewards import diverged
from qan_ray.scheduler_core import (
    LR_KEY,
    OBS_ERROR_KEY,
    OBS_KEY,
    OBS_REF_KEY,
    OWN_SCHEDULE_KEY,
    PROGRESS_KEY,
    RESCUED_KEY,
    RESCUES_KEY,
    VERSION_KEY,
)

logger = logging.getLogger(__name__)

CHANNEL_PREFIX = "qan-control:"


def channel_name(experiment_name: str) -> str:
    """Name of the control-channel actor of one Tune experiment."""
    return f"{CHANNEL_PREFIX}{experiment_name}"


class ControlChannel:
    """Named Ray actor (num_cpus=0): the hyperparameters QAN set for each running trial."""

    def __init__(self) -> None:
        self._entries: dict[str, dict[str, Any]] = {}
        self._observations: dict[str, dict[str, Any]] = {}

    def publish(self, trial_id: str, hyperparams: dict[str, Any], version: int,
                initial: dict[str, Any], observe: dict[str, Any] | None = None) -> int:
        """`observe` tells the trainable which observation the controller was trained on
        (ObservationSpec fields: with_weights, monitored_layers, num_classes)."""
        self._entries[trial_id] = {"hyperparams": dict(hyperparams), "version": int(version),
                                   "initial": dict(initial), "observe": dict(observe or {})}
        return int(version)

    def get(self, trial_id: str) -> dict[str, Any] | None:
        return self._entries.get(trial_id)

    def put_observation(self, trial_id: str, seq: int, values: list[float],
                        version: int) -> None:
        """The trainable's latest observation (number `seq`, format `version`)."""
        self._observations[trial_id] = {"seq": int(seq), "values": values,
                                        "version": int(version)}

    def take_observation(self, trial_id: str) -> dict[str, Any] | None:
        """The latest observation of a trial (and forget it); None if there is none."""
        return self._observations.pop(trial_id, None)

    def drop(self, trial_id: str) -> None:
        self._entries.pop(trial_id, None)
        self._observations.pop(trial_id, None)

    def snapshot(self) -> dict[str, dict[str, Any]]:
        return dict(self._entries)


def open_channel(experiment_name: str, create: bool = False):
    """Handle of the experiment's channel actor; None if it does not exist and create=False."""
    import ray

    name = channel_name(experiment_name)
    if create:
        actor = ray.remote(num_cpus=0, max_concurrency=8)(ControlChannel)
        return actor.options(name=name, get_if_exists=True, lifetime=None).remote()
    try:
        return ray.get_actor(name)
    except ValueError:
        return None


class QANReporter:
    """Per-trial helper: hyperparameters from the control channel in, QAN's observation out.

    config: the trial's config (the hyperparameters when no channel entry exists yet).
    lr_key: the config key QAN controls (must match QANScheduler(lr_key=...)).
    monitored_layers: Linear/Conv module names to observe (empty = all; as in training).
    channel: "auto" (find this experiment's channel through the Tune context), None (never), or
        an actor handle (with `trial_id`, the trial's entry on it; default: Tune's trial id).
    features: "auto" (only when a channel exists, i.e. QANScheduler drives the run), or True
        (always; without a channel the observation is returned under `qan_obs`).
    num_classes: classes of the task (the chance level of the loss and accuracy signals).
    model, optimizer: the trial's network and optimizer (anything with state_dict() and
        load_state_dict()), given once, for the rescue guard: while QANScheduler's guard is on,
        the reporter keeps the last good state of both in memory (on their device) and, when an
        iteration leaves the run dying (`qan_ray.episode.dying`), loads it back and reports
        `qan_rescued`; QANScheduler then cuts the LR. Without them there is no rollback.
    own_schedule: False (default): QAN's LR replaces the optimizer's (first group; the others at
        their ratios to it). True: the trainable schedules its own LR (e.g. CosineAnnealingLR)
        and QAN's factor (its LR / the trial's start LR) multiplies each group's own LR at every
        optimizer step; a cosine controller's "keep" is then the user's schedule unchanged.
        Either way, without QANScheduler `apply` changes no LR.
    """

    def __init__(self, config: dict[str, Any], lr_key: str = "lr",
                 monitored_layers: tuple[str, ...] = (), channel: Any = "auto",
                 features: bool | str = "auto", timeout_s: float = 30.0,
                 num_classes: int = NUM_CLASSES, model: Any = None, optimizer: Any = None,
                 own_schedule: bool = False, trial_id: str | None = None):
        self.config = dict(config)
        self.own_schedule = bool(own_schedule)
        self.lr_key = lr_key
        self.timeout_s = timeout_s
        self.version = 0
        self.hyperparams = dict(config)
        initial_lr = float(config[lr_key]) if lr_key in config else 1.0
        self.observer = Observer(ObservationSpec(monitored_layers=tuple(monitored_layers),
                                                 num_classes=num_classes), initial_lr)
        self.initial_loss: float | None = None
        self._seq = 0
        self._polled = False
        self._trial_id: str | None = None
        self._experiment: str | None = None
        self._channel = None
        if channel == "auto":
            self._connect()
        elif channel is not None:
            self._channel = channel
            self._trial_id = trial_id if trial_id is not None else _tune_trial_id()
        self._features = features
        self.model, self.optimizer = model, optimizer
        self.guard = {"on": False, "max_rescues": 0}  # QANScheduler's, from the channel
        self.rescues = 0
        self.best_accuracy: float | None = None
        self.initial_val_loss: float | None = None
        self._good: tuple[dict, dict] | None = None
        self._applied: tuple[int, float] | None = None  # (version, LR) of the last apply()
        self._factor = 1.0  # own_schedule: QAN's factor on the user's LRs while stepping
        self._ratios: dict[int, list[float]] = {}  # id(optimizer) -> group LR / first group LR
        self._hooked: dict[int, Any] = {}  # id(optimizer) -> the optimizer, its hooks installed
        self._step_lrs: list[float] = []  # first group's LR at each step since the last apply
        self._keep_good()  # the state at init: the fallback of a rescue before a good one

    def _keep_good(self) -> None:
        """Copy the model's and optimizer's state (on their device) as the last good one."""
        if self.model is not None and self.optimizer is not None:
            self._good = (_copy_state(self.model.state_dict()),
                          _copy_state(self.optimizer.state_dict()))

    def _rescue(self) -> None:
        model, opt = self._good
        groups = getattr(self.optimizer, "param_groups", None)
        lrs = [g.get("lr") for g in groups] if self.own_schedule and groups else None
        self.model.load_state_dict(model)
        self.optimizer.load_state_dict(_copy_state(opt))
        if lrs is not None:  # the user's schedule goes on from where it is, not from the snapshot
            for group, lr in zip(self.optimizer.param_groups, lrs):
                group["lr"] = lr

    def _connect(self) -> None:
        ctx = _tune_context()
        if ctx is None:
            return
        self._trial_id = ctx.get_trial_id()
        self._experiment = ctx.get_experiment_name()
        self._channel = open_channel(self._experiment)

    @property
    def active(self) -> bool:
        """Whether a control channel drives this trial (QANScheduler is in charge)."""
        return self._channel is not None

    @property
    def lr(self) -> float:
        return float(self.hyperparams[self.lr_key])

    @property
    def initial_lr(self) -> float:
        return self.observer.initial_lr

    def _call(self, method: str, *args):
        """One channel call; after a lost channel (e.g. Tuner.restore re-created it) look it up
        once more; without one, keep training with what we have."""
        import ray

        try:
            return ray.get(getattr(self._channel, method).remote(*args), timeout=self.timeout_s)
        except ray.exceptions.RayActorError:
            self._channel = open_channel(self._experiment) if self._experiment else None
            if self._channel is None:
                return None
            return ray.get(getattr(self._channel, method).remote(*args), timeout=self.timeout_s)

    def poll(self) -> dict[str, Any]:
        """The current hyperparameters: the config overlaid by the channel's entry (if any)."""
        if self._channel is None:
            return self.hyperparams
        entry = self._call("get", self._trial_id)
        self._polled = True
        if entry is not None:
            self.version = int(entry["version"])
            self.hyperparams.update(entry["hyperparams"])
            initial = entry.get("initial", {}).get(self.lr_key)
            if initial is not None:
                self.observer.initial_lr = float(initial)
            observe = entry.get("observe") or {}
            if "guard" in observe:
                self.guard = dict(observe["guard"])
            if observe:
                mine = self.observer.spec
                layers = tuple(observe.get("monitored_layers") or mine.monitored_layers)
                self.observer.spec = ObservationSpec(
                    with_weights=bool(observe.get("with_weights", True)),
                    monitored_layers=layers, num_classes=mine.num_classes,
                    class_signals=bool(observe.get("class_signals", False)))
        return self.hyperparams

    @property
    def factor(self) -> float:
        """QAN's decision as a factor on the trial's start LR (1.0 before any decision)."""
        return self.lr / self.initial_lr if self.initial_lr > 0 else 1.0

    def apply(self, optimizer) -> float:
        """Put QAN's current decision into effect for the next iteration; returns the LR of the
        first param group it will train with. Call it before each iteration, and after loading
        optimizer state (which carries an old LR).

        Without QANScheduler (no channel) it changes nothing. With it: poll(), then (default)
        write QAN's LR into the first param group and each other group at its ratio to the first,
        or (own_schedule=True) scale each group's own LR by `factor` while the optimizer steps.
        The version and LR applied are what the next `metrics()` acknowledges."""
        groups = optimizer.param_groups
        if not self.active:
            return _as_float(groups[0]["lr"])
        self.poll()
        self._hook(optimizer)
        self._step_lrs = []
        if self.own_schedule:
            self._factor = self.factor
            lr = _as_float(groups[0]["lr"]) * self._factor
        else:
            key = id(optimizer)
            if key not in self._ratios:
                first = _as_float(groups[0]["lr"])
                self._ratios[key] = [(_as_float(g["lr"]) / first if first > 0 else 1.0)
                                     for g in groups]
            ratios = self._ratios[key]
            for i, group in enumerate(groups):
                group["lr"] = self.lr * (ratios[i] if i < len(ratios) else 1.0)
            lr = self.lr
        self._applied = (self.version, float(lr))
        return float(lr)

    def _hook(self, optimizer) -> None:
        """Step hooks on `optimizer` (once): record the first group's LR at each step and, with
        own_schedule, scale every group's LR by QAN's factor during the step only."""
        key = id(optimizer)
        if key in self._hooked or not hasattr(optimizer, "register_step_pre_hook"):
            return
        saved: list[Any] = []

        def pre(opt, args, kwargs):
            saved[:] = [g["lr"] for g in opt.param_groups]
            if self.own_schedule and self._factor != 1.0:
                for group in opt.param_groups:
                    group["lr"] = group["lr"] * self._factor
            self._step_lrs.append(_as_float(opt.param_groups[0]["lr"]))

        def post(opt, args, kwargs):
            if self.own_schedule:
                for group, lr in zip(opt.param_groups, saved):
                    group["lr"] = lr

        optimizer.register_step_pre_hook(pre)
        optimizer.register_step_post_hook(post)
        self._hooked[key] = optimizer

    def trained_lr(self) -> float:
        """The LR (first param group) this iteration trained with: the mean over its optimizer
        steps (exact when they all used one LR), else the LR `apply` set, else QAN's LR."""
        lrs = self._step_lrs
        if lrs:
            return lrs[0] if all(x == lrs[0] for x in lrs) else float(sum(lrs) / len(lrs))
        return self._applied[1] if self._applied is not None else self.lr

    def start(self, *, train_loss: float, val_loss: float, val_accuracy: float,
              lr: float | None = None) -> None:
        """Optional, before the first iteration: the losses at initialisation, so the loss-slope
        signals of the first iterations match the meta-training environment's (which observes
        the initial state too). No weight statistics are computed here."""
        self.observer.signals(lr=self.lr if lr is None else float(lr), train_loss=train_loss,
                              val_loss=val_loss, val_accuracy=val_accuracy, progress=0.0)
        self.initial_loss = float(train_loss)
        self.initial_val_loss = float(val_loss)
        self.best_accuracy = float(val_accuracy)

    def diverged(self, train_loss: float, factor: float | None = None) -> bool:
        """The environment's divergence rule (`rewards.diverged`): NaN/inf, or above `factor` x
        the initial loss. `factor` defaults to the trial config's `divergence_factor`, else the
        task default (QANConfig.divergence_factor), as in meta-training."""
        if factor is None:
            factor = float(self.config.get("divergence_factor", QANConfig.divergence_factor))
        ref = math.inf if self.initial_loss is None else self.initial_loss
        return bool(diverged([train_loss], [ref], factor)[0])

    def metrics(self, model, *, train_loss: float, val_loss: float, val_accuracy: float,
                progress: float, initial_loss: float | None = None,
                lr: float | None = None, classes: dict[str, Any] | None = None) -> dict[str, Any]:
        """Result keys for QANScheduler (a few scalars; the observation goes through the
        channel). `initial_loss` (the loss at initialisation) is the reference of
        `diverged()` and of the guard; `lr` is the LR this iteration trained with (default:
        `trained_lr()`, what the optimizer stepped with). With QANScheduler the result carries
        that LR (`qan_lr`) and the channel version it came from (`qan_version`, the one the last
        `apply` used, whatever was published since). With the guard on and a model and
        optimizer given, a dying iteration is rolled back here (`qan_rescued`: True; no
        observation is sent for it). `classes`: a minibatch controller's per-class inputs
        (contract.class_signals: class_loss, class_accuracy, shares, data_shares)."""
        lr = self.trained_lr() if lr is None else float(lr)
        version = self._applied[0] if self._applied is not None else self.version
        if initial_loss is not None:
            self.initial_loss = float(initial_loss)
        elif self.initial_loss is None:
            self.initial_loss = float(train_loss)
        if self.initial_val_loss is None:  # start() was not called: the first result's
            self.initial_val_loss = float(val_loss)
        if self.best_accuracy is None:
            self.best_accuracy = float(val_accuracy)
        out: dict[str, Any] = {}
        if self.active and self._polled:
            out[RESCUES_KEY] = self.rescues
            out[LR_KEY] = lr
            if self.own_schedule:
                out[OWN_SCHEDULE_KEY] = True
        if self._guarding():
            lost = dying([train_loss], [val_loss], [val_accuracy], self.initial_loss,
                         self.initial_val_loss, self.best_accuracy,
                         self.observer.spec.num_classes)[0]
            if lost and self.rescues < int(self.guard.get("max_rescues", 0)):
                self._rescue()
                self.rescues += 1
                out.update({RESCUED_KEY: True, RESCUES_KEY: self.rescues,
                            PROGRESS_KEY: float(progress), VERSION_KEY: version})
                logger.info("QAN guard: trial %s rolled back to its last good state after "
                            "iteration loss %.4g / val acc %.4f (rescue %d)", self._trial_id,
                            train_loss, val_accuracy, self.rescues)
                return out
            if not lost:
                self._keep_good()
        if math.isfinite(val_accuracy):
            self.best_accuracy = max(self.best_accuracy, float(val_accuracy))
        if self._features is True or (self._features == "auto" and self.active):
            try:
                obs = self.observer.observe(model, lr=lr, train_loss=train_loss,
                                            val_loss=val_loss, val_accuracy=val_accuracy,
                                            progress=progress, classes=classes)
            except ValueError as err:  # e.g. the controller's monitored layers are not here
                out[OBS_ERROR_KEY] = str(err)
            else:
                self._seq += 1
                if self.active:
                    self._call("put_observation", self._trial_id, self._seq, obs.tolist(),
                               OBS_VERSION)
                    out[OBS_REF_KEY] = self._seq
                else:
                    out[OBS_KEY] = obs.tolist()
            out[PROGRESS_KEY] = float(progress)
        if self._polled and self.active:
            out[VERSION_KEY] = version
        return out

    def _guarding(self) -> bool:
        return (bool(self.guard.get("on")) and self.active and self.model is not None
                and self.optimizer is not None)

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint should keep (the signals' references and history, the guard's
        references and count)."""
        return {"observer": self.observer.state_dict(), "initial_loss": self.initial_loss,
                "seq": self._seq, "rescues": self.rescues, "best_accuracy": self.best_accuracy,
                "initial_val_loss": self.initial_val_loss}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("observer"):  # the channel's entry, if any, wins at poll()
            self.observer.load_state_dict(state["observer"])
        elif state.get("initial_lr") is not None:  # a checkpoint of qan-ray < 0.2
            self.observer.initial_lr = float(state["initial_lr"])
        if state.get("initial_loss") is not None:
            self.initial_loss = float(state["initial_loss"])
        self._seq = int(state.get("seq", self._seq))
        self.rescues = int(state.get("rescues", self.rescues))
        for key in ("best_accuracy", "initial_val_loss"):
            if state.get(key) is not None:
                setattr(self, key, float(state[key]))
        self._keep_good()  # call after loading the model and optimizer: a rescue returns here


def _as_float(value: Any) -> float:
    """A param group's LR (a float, or a 0-d tensor for capturable/fused optimizers)."""
    return float(value.item()) if hasattr(value, "item") else float(value)


def _copy_state(state: Any) -> Any:
    """A deep copy of a state_dict: tensors cloned on their device, containers rebuilt."""
    import torch

    if isinstance(state, torch.Tensor):
        return state.detach().clone()
    if isinstance(state, dict):
        return {k: _copy_state(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(_copy_state(v) for v in state)
    return state


def _tune_context():
    """The Tune context inside a trial, else None (plain Python, tests without Tune)."""
    import warnings

    try:
        from ray import tune

        with warnings.catch_warnings():  # outside Tune the accessors warn and return None
            warnings.simplefilter("ignore")
            ctx = tune.get_context()
            return ctx if ctx.get_trial_id() is not None else None
    except Exception:  # noqa: BLE001 - outside a Tune session an accessor may also raise
        return None


def _tune_trial_id() -> str | None:
    ctx = _tune_context()
    return None if ctx is None else ctx.get_trial_id()
