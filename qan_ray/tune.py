"""Trainable side of `QANScheduler`: what a user adds to their own Ray Tune function trainable.

Three things, once per training iteration (see docs/scheduler.md for a complete example):
1. `reporter.apply(optimizer)` before training: read the current hyperparameters from the control
   channel (one cheap actor call) and write the LR into the optimizer's param groups. No restart:
   the LR QAN chose after the previous iteration is in effect for this one.
2. train and validate as usual;
3. `tune.report({**metrics, **reporter.metrics(model, train_loss=..., val_loss=...,
   val_accuracy=..., progress=...)})`: the controller's observation (permutation-invariant weight
   statistics + training signals, `qan_ray.features.observation`, computed on the model's device)
   and the LR/version actually used.

The control channel is one named Ray actor per experiment (`ControlChannel`, 0 CPUs) holding
{trial_id: {hyperparams, version, initial}}. QANScheduler writes it in `on_trial_result`; Tune
resumes a function trainable only after that hook returned, so the next `apply` sees the change.
Without QANScheduler (no channel) the reporter returns the config's hyperparameters and skips the
features, so the same trainable runs unchanged under ASHA, PBT or FIFO.
"""

from __future__ import annotations

import logging
from typing import Any

from qan_ray.scheduler_core import LR_REPORTED_KEY, OBS_KEY, VERSION_KEY

logger = logging.getLogger(__name__)

CHANNEL_PREFIX = "qan-control:"


def channel_name(experiment_name: str) -> str:
    """Name of the control-channel actor of one Tune experiment."""
    return f"{CHANNEL_PREFIX}{experiment_name}"


class ControlChannel:
    """Named Ray actor (num_cpus=0): the hyperparameters QAN set for each running trial."""

    def __init__(self) -> None:
        self._entries: dict[str, dict[str, Any]] = {}

    def publish(self, trial_id: str, hyperparams: dict[str, Any], version: int,
                initial: dict[str, Any], observe: dict[str, Any] | None = None) -> int:
        """`observe` tells the trainable which observation the controller was trained on
        (with_weights, monitored_layers)."""
        self._entries[trial_id] = {"hyperparams": dict(hyperparams), "version": int(version),
                                   "initial": dict(initial), "observe": dict(observe or {})}
        return int(version)

    def get(self, trial_id: str) -> dict[str, Any] | None:
        return self._entries.get(trial_id)

    def drop(self, trial_id: str) -> None:
        self._entries.pop(trial_id, None)

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


def qan_metrics(model, *, lr: float, initial_lr: float, train_loss: float, initial_loss: float,
                val_loss: float, val_accuracy: float, progress: float,
                monitored_layers: tuple[str, ...] = (), with_weights: bool = True
                ) -> dict[str, Any]:
    """The controller's observation of `model` (on its device) plus the LR used, as the result
    keys QANScheduler reads. `progress` is the fraction of the trial's budget done (0..1);
    with_weights=False gives the signals-only observation (for controllers trained without
    weight statistics)."""
    from qan_ray.features import observation, signal_vector

    signals = signal_vector(lr, initial_lr, train_loss, initial_loss, val_loss, val_accuracy,
                            progress)
    obs = observation(model, signals, tuple(monitored_layers), with_weights=with_weights)
    return {OBS_KEY: obs.tolist(), LR_REPORTED_KEY: float(lr)}


class QANReporter:
    """Per-trial helper: hyperparameters from the control channel in, QAN's features out.

    config: the trial's config (the hyperparameters when no channel entry exists yet).
    lr_key: the config key QAN controls (must match QANScheduler(lr_key=...)).
    monitored_layers: Linear/Conv module names to observe (empty = all; as in training).
    channel: "auto" (find this experiment's channel through the Tune context), None (never), or
        an actor handle.
    features: "auto" (only when a channel exists, i.e. QANScheduler drives the run), or True.
    """

    def __init__(self, config: dict[str, Any], lr_key: str = "lr",
                 monitored_layers: tuple[str, ...] = (), channel: Any = "auto",
                 features: bool | str = "auto", timeout_s: float = 30.0):
        self.config = dict(config)
        self.lr_key = lr_key
        self.monitored_layers = tuple(monitored_layers)
        self.with_weights = True
        self.timeout_s = timeout_s
        self.version = 0
        self.hyperparams = dict(config)
        self.initial_lr = float(config[lr_key]) if lr_key in config else None
        self.initial_loss: float | None = None
        self._polled = False
        self._trial_id: str | None = None
        self._experiment: str | None = None
        self._channel = None
        if channel == "auto":
            self._connect()
        elif channel is not None:
            self._channel = channel
            self._trial_id = _tune_trial_id()
        self._features = features

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

    def poll(self) -> dict[str, Any]:
        """The current hyperparameters: the config overlaid by the channel's entry (if any)."""
        if self._channel is None:
            return self.hyperparams
        import ray

        try:
            entry = ray.get(self._channel.get.remote(self._trial_id), timeout=self.timeout_s)
        except ray.exceptions.RayActorError:
            # The channel was closed and may have been re-created (e.g. Tuner.restore): look
            # it up once more; without one, keep training with what we have.
            self._channel = open_channel(self._experiment) if self._experiment else None
            entry = None if self._channel is None else ray.get(
                self._channel.get.remote(self._trial_id), timeout=self.timeout_s)
        self._polled = True
        if entry is not None:
            self.version = int(entry["version"])
            self.hyperparams.update(entry["hyperparams"])
            initial = entry.get("initial", {}).get(self.lr_key)
            if initial is not None:
                self.initial_lr = float(initial)
            observe = entry.get("observe", {})
            self.with_weights = bool(observe.get("with_weights", True))
            if observe.get("monitored_layers") and not self.monitored_layers:
                self.monitored_layers = tuple(observe["monitored_layers"])
        return self.hyperparams

    def apply(self, optimizer) -> float:
        """poll(), then write the LR into every param group of `optimizer`; returns it. Call it
        before each iteration, and after loading optimizer state (which carries an old LR)."""
        self.poll()
        lr = self.lr
        for group in optimizer.param_groups:
            group["lr"] = lr
        return lr

    def metrics(self, model, *, train_loss: float, val_loss: float, val_accuracy: float,
                progress: float, initial_loss: float | None = None,
                lr: float | None = None) -> dict[str, Any]:
        """Result keys for QANScheduler: observation, LR used, channel version. `initial_loss` is
        the loss at initialisation (default: the first train_loss this reporter saw)."""
        lr = self.lr if lr is None else float(lr)
        if initial_loss is not None:
            self.initial_loss = float(initial_loss)
        elif self.initial_loss is None:
            self.initial_loss = float(train_loss)
        out: dict[str, Any] = {LR_REPORTED_KEY: lr}
        if self._features is True or (self._features == "auto" and self.active):
            out = qan_metrics(model, lr=lr, initial_lr=self.initial_lr or lr,
                              train_loss=train_loss, initial_loss=self.initial_loss,
                              val_loss=val_loss, val_accuracy=val_accuracy, progress=progress,
                              monitored_layers=self.monitored_layers,
                              with_weights=self.with_weights)
        if self._polled and self.active:
            out[VERSION_KEY] = self.version
        return out

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint should keep (the signals' references survive a restore)."""
        return {"initial_lr": self.initial_lr, "initial_loss": self.initial_loss}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("initial_lr") is not None:  # the channel's entry, if any, wins at poll()
            self.initial_lr = float(state["initial_lr"])
        if state.get("initial_loss") is not None:
            self.initial_loss = float(state["initial_loss"])


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
