"""Ray Tune function trainables for the built-in tasks: thin wrappers of `TargetTrainer`.

One training iteration = one epoch of the target network. Each iteration:
1. read the hyperparameters (QANScheduler's control channel if it drives the run, else the trial
   config) and write them into the optimizer (also right after a checkpoint restore, whose
   optimizer state carries the old LR/momentum); with `trial_schedule` (e.g. "cosine"), the LR
   of epoch e is that schedule from the trial's LR at progress e / epochs
   (`qan_ray.schedules.baseline_schedule`), so it follows the trial's whole epoch budget across
   checkpoint restores and PBT restarts alike;
2. train one epoch, validate;
3. report metrics (+ QAN's observation when QANScheduler drives the run) and, every
   `checkpoint_every` epochs, a `tune.Checkpoint` (trainer state: model, optimizer, batch order).

Config keys: any `QANConfig` field (task, lr, momentum, weight_decay, seed, ...) plus
`TRAINABLE_KEYS`. `optimizer` may name an LR-free optimizer (prodigy, schedulefree-sgd, ...;
qan_ray.lrfree): the trainer builds it, its state is part of every checkpoint, and Schedule-Free
is validated and tested at its averaged weights (TargetTrainer.evaluate switches them in).
Reported metrics: val_accuracy, val_loss, val_score (accuracy with a tiny validation-loss
tie-breaker, see `val_score`), train_loss, lr, epoch, epochs_this_iter, diverged,
test_accuracy at the last epoch, and class_action and balanced_accuracy in minibatch mode. The
trial's observation is built by `QANReporter.metrics` (per-class signals too in minibatch mode,
`validate`). Divergence -- the
environment's one rule, `TargetTrainer.diverged`: a non-finite loss or one above
divergence_factor x the initial loss -- ends the trial (reported with diverged=True), under every
scheduler alike.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile
from typing import Any

TRAINABLE_KEYS = {
    "epochs": "epochs per trial (the iteration budget; default: the task's epochs_per_episode)",
    "checkpoint_every": "epochs between checkpoints (1 = every epoch, what PBT needs; 0 = never)",
    "torch_threads": "torch intra-op threads (1 on a shared CPU node)",
    "class_action": "minibatch mode: the class action (keep, toward uniform/balanced/"
                    "loss-proportional/the hardest class) of the next batches",
    "class_decision": "minibatch mode: the number of the decision class_action belongs to "
                      "(a trainer applies each decision once)",
    "trial_schedule": "the trial's own LR schedule over its epochs, one of "
                      "qan_ray.schedules.SCHEDULES (fixed, step, cosine, warmup_cosine) from its "
                      "LR; unset = the LR stays as set",
}
STATE_FILE = "trainer.pt"


def val_score(val_accuracy: float, val_loss: float) -> float:
    """Validation accuracy minus 1e-3 x min(val_loss, 3): ranks like accuracy (the shift is below
    one sample's worth of accuracy on a 300+ sample validation set) but breaks ties by loss, so
    PBT's quantiles do not loop on tied accuracies (docs/background.md)."""
    if not (math.isfinite(val_accuracy) and math.isfinite(val_loss)):
        return float("nan")
    return float(val_accuracy - 1e-3 * min(val_loss, 3.0))


def split_config(config: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(QANConfig fields, trainable keys); any other key raises (a typo would be ignored)."""
    from qan_ray.config import QANConfig

    fields = {f.name for f in dataclasses.fields(QANConfig)}
    unknown = sorted(set(config) - fields - set(TRAINABLE_KEYS))
    if unknown:
        raise ValueError(f"trainable config has unknown key(s) {unknown}; valid keys are the "
                         f"QANConfig fields and {sorted(TRAINABLE_KEYS)}. Check the spelling in "
                         "param_space.")
    qan = {k: v for k, v in config.items() if k in fields}
    extra = {k: v for k, v in config.items() if k in TRAINABLE_KEYS}
    return qan, extra


def apply_hyperparams(trainer, hyper: dict[str, Any]) -> None:
    """Write LR (clamped), momentum and weight decay from `hyper` into the optimizer now."""
    if "lr" in hyper:
        trainer.set_lr(float(hyper["lr"]))
    if "momentum" in hyper or "weight_decay" in hyper:
        momentum = hyper.get("momentum") if trainer.cfg.optimizer == "sgd" else None
        weight_decay = hyper.get("weight_decay")
        trainer.set_hyperparams(momentum=None if momentum is None else float(momentum),
                                weight_decay=None if weight_decay is None else float(weight_decay))
    if hyper.get("class_action") is not None and trainer.cfg.action_mode == "minibatch":
        decision = hyper.get("class_decision")
        if decision is None or decision != getattr(trainer, "class_decision", None):
            trainer.class_action(int(hyper["class_action"]))
            trainer.class_decision = decision


def validate(trainer) -> tuple[float, float, dict[str, Any] | None]:
    """(val loss, val accuracy, per-class inputs of a minibatch controller's observation or
    None): in minibatch mode one per-class pass, whose class losses the next class action
    reads."""
    if trainer.cfg.action_mode != "minibatch":
        return (*trainer.evaluate("val"), None)
    out = trainer.evaluate_classes("val")
    return out["loss"], out["accuracy"], {
        "class_loss": out["class_loss"], "class_accuracy": out["class_accuracy"],
        "shares": trainer.class_shares, "data_shares": trainer.population.data_shares,
        "balanced_accuracy": out["balanced_accuracy"]}


def scheduled_lr(schedule: str, lr: float, epoch: int, epochs: int) -> float:
    """The LR of epoch `epoch` (0-based) of `epochs` under `schedule` from base LR `lr`:
    `baseline_schedule(schedule, lr)` at progress epoch / epochs (the trainer clamps it)."""
    from qan_ray.schedules import baseline_schedule

    return float(baseline_schedule(schedule, lr)(epoch / epochs))


def check_trial_schedule(schedule: Any) -> str | None:
    """`trial_schedule` of a trial config, checked (None = no schedule)."""
    from qan_ray.schedules import SCHEDULES

    if schedule is None:
        return None
    if schedule not in SCHEDULES:
        raise ValueError(f"`trial_schedule` is {schedule!r}; it must be one of "
                         f"{sorted(SCHEDULES)} (or unset). Try 'cosine'.")
    return str(schedule)


def clamp_lr(qan_keys: dict[str, Any]) -> dict[str, Any]:
    """The trial's LR inside [lr_min, lr_max]: PBT's perturbations (x1.2) step past a search
    space's top, and the trainer would clamp such an LR anyway; a trial must not fail on it."""
    from qan_ray.config import QANConfig

    lr = qan_keys.get("lr")
    if not isinstance(lr, (int, float)) or isinstance(lr, bool):
        return qan_keys
    low = float(qan_keys.get("lr_min", QANConfig.lr_min))
    high = float(qan_keys.get("lr_max", QANConfig.lr_max))
    return {**qan_keys, "lr": min(max(float(lr), low), high)}


def target_trainable(config: dict[str, Any]) -> None:
    """Train the task of `config["task"]` for `epochs` epochs under Ray Tune."""
    import torch
    from ray import tune

    from qan_ray.distribution import load_config
    from qan_ray.trainer import TargetTrainer
    from qan_ray.tune import QANReporter

    qan_keys, extra = split_config(config)
    torch.set_num_threads(int(extra.get("torch_threads", 1)))
    qan_keys = clamp_lr(qan_keys)
    cfg = load_config(qan_keys)  # a user task's UserTask.config fills what the trial omits
    epochs = int(extra.get("epochs", math.ceil(cfg.epochs_per_episode)))
    if epochs < 1:
        raise ValueError(f"`epochs` is {epochs}; it must be >= 1. Try 8.")
    cfg = cfg.replace(epochs_per_episode=float(epochs))
    checkpoint_every = int(extra.get("checkpoint_every", 1))
    schedule = check_trial_schedule(extra.get("trial_schedule"))
    trainer = TargetTrainer(cfg)
    reporter = QANReporter(config, lr_key="lr", monitored_layers=cfg.monitored_layers,
                           model=trainer.model, optimizer=trainer.population.optimizer)
    if schedule is not None and reporter.active:
        raise ValueError(f"`trial_schedule` {schedule!r} and QANScheduler would both set the LR "
                         "of this trial; drop `trial_schedule` from the config under QAN.")
    start = 0
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            saved = torch.load(os.path.join(folder, STATE_FILE), weights_only=True)
        trainer.load_state_dict(saved["trainer"])
        reporter.load_state_dict(saved["reporter"])
        start = int(saved["epoch"])
    if reporter.active and start == 0:  # the initial state, as the environment observes it
        val_loss, val_acc, _ = validate(trainer)
        reporter.start(train_loss=trainer.initial_loss, val_loss=val_loss, val_accuracy=val_acc,
                       lr=float(reporter.poll()[reporter.lr_key]))
    for epoch in range(start, epochs):
        hyper = reporter.poll()
        if schedule is not None:  # from the (possibly PBT-mutated) config LR, at this epoch
            hyper = {**hyper, "lr": scheduled_lr(schedule, float(hyper.get("lr", cfg.lr)), epoch,
                                                 epochs)}
        apply_hyperparams(trainer, hyper)
        train_loss = trainer.train(trainer.batches_per_epoch)
        diverged = trainer.diverged(train_loss)
        val_loss, val_acc, classes = validate(trainer)
        last = diverged or epoch + 1 == epochs
        metrics: dict[str, Any] = {
            "val_accuracy": val_acc, "val_loss": val_loss, "val_score": val_score(val_acc,
                                                                                   val_loss),
            "train_loss": train_loss, "lr": trainer.lr, "epoch": epoch + 1,
            "epochs_this_iter": 1.0, "diverged": diverged,
        }
        if last:
            metrics["test_accuracy"] = trainer.evaluate("test")[1]
        if classes is not None:  # the class action this epoch's batches followed
            metrics["class_action"] = hyper.get("class_action")
            metrics["balanced_accuracy"] = classes.pop("balanced_accuracy")
        metrics.update(reporter.metrics(trainer.model, train_loss=train_loss, val_loss=val_loss,
                                        val_accuracy=val_acc, progress=(epoch + 1) / epochs,
                                        initial_loss=trainer.initial_loss, lr=trainer.lr,
                                        classes=classes))
        if checkpoint_every and ((epoch + 1) % checkpoint_every == 0 or last):
            with tempfile.TemporaryDirectory() as folder:
                torch.save({"trainer": trainer.state_dict(), "reporter": reporter.state_dict(),
                            "epoch": epoch + 1}, os.path.join(folder, STATE_FILE))
                tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))
        else:
            tune.report(metrics)
        if diverged:
            return


def _for_task(task: str):
    def trainable(config: dict[str, Any]) -> None:
        return target_trainable({**config, "task": task})

    trainable.__name__ = trainable.__qualname__ = task.replace("-", "_")
    trainable.__doc__ = f"Tune trainable of the built-in task {task!r} (see target_trainable)."
    return trainable


digits_mlp = _for_task("digits-mlp")
mnist_mlp = _for_task("mnist-mlp")
mnist_lenet = _for_task("mnist-lenet")
fashion_mnist_lenet = _for_task("fashion-mnist-lenet")
cifar10_wrn = _for_task("cifar10-wrn")

TASK_TRAINABLES = {
    "digits-mlp": digits_mlp, "mnist-mlp": mnist_mlp, "mnist-lenet": mnist_lenet,
    "fashion-mnist-lenet": fashion_mnist_lenet, "cifar10-wrn": cifar10_wrn,
}


def trainable_for(task: str):
    """The function trainable of a built-in task (generic `target_trainable` for the others)."""
    return TASK_TRAINABLES.get(task, target_trainable)
