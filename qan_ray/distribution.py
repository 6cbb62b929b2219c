"""Task distributions for meta-training: every episode trains a task drawn from its seed.

`QANConfig.tasks` names the members of the mix, drawn uniformly per episode:
- a named distribution: `generalist` (below);
- a preset (`digits-mlp`, `mnist1d-cnn`, ...): its model, data, optimizer, batch size and epochs;
- your own task, `module:function` (qan_ray.tasks): the same fields from its `UserTask.config`.

Every sampled task keeps the control problem of the config it was drawn from (actions, LR
bounds, reward, observation, device, data split), so the observation and action spaces are the
same for every task. Per task: the initial LR is drawn log-uniformly (`LR_RANGES` per optimizer
family, or `lr_init_range` when set, both clipped to [lr_min, lr_max]) and the controller decides
once per epoch (`control_interval` = the task's mini-batches per epoch, what a Tune trainable
reports at), so an episode of E epochs has E steps.

`generalist`: data digits (8x8 images) or MNIST-1D (length-40 signals), uniformly; on each, an
MLP (1 to 4 hidden layers, each of width 32, 64, 128, 256 or 512) or its CNN (`cnn2d` on digits,
`cnn1d` on MNIST-1D), uniformly; SGD, momentum 0.9, Nesterov 0.9 or Adam, uniformly; batch size
16 to 256 (log-uniform over the powers of two); `EPOCHS` per dataset, uniform integers.

`generalist-wide`: `generalist` plus a small residual CNN with BatchNorm on each dataset (`resnet`
on digits, `resnet1d` on MNIST-1D: the presets `digits-resnet`, `mnist1d-resnet`) and AdamW with
weight decay (log-uniform 1e-3..1e-1) as a fifth optimizer family; every episode also draws label
noise on classes 0-2 (0, 10% or 30% of their training labels wrong) and the share of the
training split it trains on (all, half or a quarter). The held-out families of `generalist` hold
out the same tasks here (`--holdout cnn2d,mnist1d-mlp` leaves the residual CNNs in).

`QANConfig.holdout` removes every task one of whose `families` it names: a dataset (`digits`), a
model (`cnn2d`) or model family (`cnn`, `mlp`), a dataset-model pair (`mnist1d-mlp`,
`digits-cnn`, `digits-cnn2d`), an optimizer family (`adam`) or a task name (`mnist-lenet`, a
user task's `module:function`). Within the mix, each remaining member is equally likely, and
within `generalist` each remaining (dataset, model, optimizer) combination.

`sample_task(cfg, seed)` is a pure function of the config and the episode seed.

`load_config(values)` is where a config's tasks are loaded: a user task's `UserTask.config`
fills the fields not given (explicit values win), and `tasks`/`holdout` are checked against
their members (`check_distribution`). The CLI, the environments and the trainables build their
configs with it; `qan_ray.config` checks values only.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from qan_ray.config import (
    TASK_PRESETS,
    USER,
    QANConfig,
    args_values,
    from_dict,
    given_values,
    is_user_task,
)

GENERALIST = "generalist"
WIDE = "generalist-wide"
DISTRIBUTIONS = (GENERALIST, WIDE)

OPTIMIZER_FAMILIES = ("sgd", "momentum", "nesterov", "adam")
WIDE_OPTIMIZERS = (*OPTIMIZER_FAMILIES, "adamw")
# Initial LR range of each optimizer family, log-uniform: the whole range a Tune user searches
# (1e-4..1 for every SGD family), so that too-high starts, which kill runs, are common in
# training: with momentum 0.9 the top decade is mostly fatal; Adam's range reaches 0.3, where
# most runs die in their first epoch.
LR_RANGES: dict[str, tuple[float, float]] = {
    "sgd": (1e-4, 1.0),
    "momentum": (1e-4, 1.0),
    "nesterov": (1e-4, 1.0),
    "adam": (1e-5, 3e-1),
}
BATCH_SIZES = (16, 32, 64, 128, 256)
MLP_DEPTHS = (1, 2, 3, 4)
MLP_WIDTHS = (32, 64, 128, 256, 512)
EPOCHS: dict[str, tuple[int, int]] = {"digits": (4, 12), "mnist1d": (8, 24)}  # inclusive
# (dataset, model) of `generalist` -> the preset it is a variation of (its QANConfig.task).
GENERALIST_PAIRS: dict[tuple[str, str], str] = {
    ("digits", "mlp"): "digits-mlp",
    ("digits", "cnn2d"): "digits-cnn",
    ("mnist1d", "mlp"): "mnist1d-mlp",
    ("mnist1d", "cnn1d"): "mnist1d-cnn",
}
# `generalist-wide` adds the residual CNNs with BatchNorm, AdamW with weight decay, label noise and
# smaller training sets (per episode, uniformly: WIDE_NOISE of the training labels of classes
# 0-2 wrong, WIDE_FRACTIONS of the training split kept; AdamW's weight decay log-uniform over
# WIDE_DECAY).
WIDE_PAIRS: dict[tuple[str, str], str] = {
    **GENERALIST_PAIRS,
    ("digits", "resnet"): "digits-resnet",
    ("mnist1d", "resnet1d"): "mnist1d-resnet",
}
WIDE_NOISE = (0.0, 0.1, 0.3)
WIDE_FRACTIONS = (1.0, 0.5, 0.25)
WIDE_DECAY = (1e-3, 1e-1)
_OPTIMIZER_FIELDS: dict[str, dict[str, Any]] = {
    "sgd": dict(optimizer="sgd", momentum=0.0, nesterov=False),
    "momentum": dict(optimizer="sgd", momentum=0.9, nesterov=False),
    "nesterov": dict(optimizer="sgd", momentum=0.9, nesterov=True),
    "adam": dict(optimizer="adam", momentum=0.0, nesterov=False),
    "adamw": dict(optimizer="adamw", momentum=0.0, nesterov=False),
}
# The fields a task brings; every other field (the control problem, data split, device) comes
# from the config the task is drawn from.
TASK_FIELDS = ("task", "dataset", "model", "hidden", "wrn_depth", "wrn_width", "optimizer", "lr",
               "lr_init_range", "momentum", "nesterov", "weight_decay", "batch_size",
               "epochs_per_episode", "augment", "control_interval", "tasks", "holdout",
               "class_imbalance", "rare_classes", "label_noise", "noisy_classes")
_STREAM = 0x7A5C  # the task draw's own random stream of an episode seed
_FIXES = "Try --tasks generalist"


# --- families and descriptions -------------------------------------------------------------------
def model_family(model: str) -> str:
    """mlp | cnn (cnn1d, cnn2d, lenet, wrn) | user."""
    return model if model in ("mlp", USER) else "cnn"


def optimizer_family(cfg: QANConfig) -> str:
    """sgd | momentum | nesterov | adam | adamw."""
    if cfg.optimizer in ("adam", "adamw"):
        return cfg.optimizer
    if cfg.momentum > 0:
        return "nesterov" if cfg.nesterov else "momentum"
    return "sgd"


def _families(task: str, dataset: str, model: str, optimizer: str) -> set[str]:
    if model == USER:
        return {task, USER, optimizer}
    fam = model_family(model)
    return {task, dataset, model, fam, f"{dataset}-{model}", f"{dataset}-{fam}", optimizer}


def families(task_cfg: QANConfig) -> set[str]:
    """The names a `holdout` can exclude this task by: its task name, dataset, model, model
    family, dataset-model pairs (by model and by family) and optimizer family."""
    return _families(task_cfg.task, task_cfg.dataset, task_cfg.model, optimizer_family(task_cfg))


def describe(cfg: QANConfig, lr: float | None = None) -> str:
    """One line for logs: data/model optimizer batch initial-LR epochs, e.g.
    'digits/mlp-256-64 adam bs64 lr0.00312 9ep' (`lr`: the episode's initial LR when it was
    drawn from lr_init_range; default cfg.lr)."""
    if cfg.model == USER:
        what = cfg.task
    else:
        model = cfg.model
        if model == "mlp":
            model += "-" + "-".join(str(h) for h in cfg.hidden)
        elif model == "wrn":
            model += f"-{cfg.wrn_depth}-{cfg.wrn_width}"
        what = f"{cfg.dataset}/{model}"
    lr = cfg.lr if lr is None else lr
    return (f"{what} {optimizer_family(cfg)} bs{cfg.batch_size} lr{lr:.3g} "
            f"{cfg.epochs_per_episode:g}ep")


def trainer_key(task_cfg: QANConfig) -> str:
    """Tasks with equal keys can share a TargetTrainer: they differ only in the initial LR and
    the seed (which `TargetTrainer.reset` re-applies)."""
    d = {k: v for k, v in task_cfg.to_dict().items() if k not in ("lr", "seed")}
    return json.dumps(d, sort_keys=True, default=list)


# --- the members of a distribution -------------------------------------------------------------
@dataclass(frozen=True)
class _Option:
    """One (dataset, model, optimizer) combination of `generalist`, or one preset / user task."""

    member: str
    families: frozenset[str]
    dataset: str = ""
    model: str = ""
    optimizer: str = ""
    template: QANConfig | None = None  # a preset / user task, with its own fields


def _shared(cfg: QANConfig) -> dict[str, Any]:
    return {k: v for k, v in cfg.to_dict().items() if k not in TASK_FIELDS}


def _member_fields(name: str) -> dict[str, Any]:
    if is_user_task(name):
        from qan_ray.tasks import load_user_task

        return dict(load_user_task(name).config)
    return dict(TASK_PRESETS[name])


def _lr_range(cfg: QANConfig, family: str) -> tuple[float, float]:
    family = "adam" if family == "adamw" else family  # an AdamW task in a mix: Adam's range
    low, high = cfg.lr_init_range if cfg.lr_init_range is not None else LR_RANGES[family]
    return max(low, cfg.lr_min), min(high, cfg.lr_max)


def task_lr_range(cfg: QANConfig, task_cfg: QANConfig) -> tuple[float, float]:
    """The start-LR range (low, high) of a task drawn from cfg.tasks: its optimizer family's
    (`LR_RANGES`, or cfg.lr_init_range when set), within cfg's LR bounds."""
    return _lr_range(cfg, optimizer_family(task_cfg))


def _options(cfg: QANConfig, name: str) -> list[_Option]:
    if name in DISTRIBUTIONS:
        pairs, optimizers = ((GENERALIST_PAIRS, OPTIMIZER_FAMILIES) if name == GENERALIST
                             else (WIDE_PAIRS, WIDE_OPTIMIZERS))
        return [_Option(name, frozenset(_families(task, dataset, model, opt)), dataset,
                        model, opt)
                for (dataset, model), task in pairs.items() for opt in optimizers]
    fields = {f.name: f.default for f in dataclasses.fields(QANConfig)}
    fields.update(_member_fields(name))
    probe = QANConfig(**{k: fields[k] for k in ("optimizer", "momentum", "nesterov")})
    low, high = _lr_range(cfg, optimizer_family(probe))
    try:
        template = load_config({**_shared(cfg), "task": name, "lr": low if low <= high else None,
                                "tasks": (), "holdout": ()})  # a member is one task
    except ValueError as err:
        raise ValueError(f"`tasks` entry {name!r} does not make a valid task with this "
                         f"config: {err}") from err
    return [_Option(name, frozenset(families(template)), template.dataset, template.model,
                    optimizer_family(template), template)]


def _available(cfg: QANConfig) -> list[list[_Option]]:
    """The members of cfg.tasks, each as its options left after cfg.holdout (empty ones
    dropped)."""
    held = set(cfg.holdout)
    members = [[o for o in _options(cfg, name) if not (o.families & held)] for name in cfg.tasks]
    return [m for m in members if m]


def known_families(cfg: QANConfig) -> list[str]:
    """Every name a holdout may use with cfg.tasks."""
    return sorted({f for name in cfg.tasks for o in _options(cfg, name) for f in o.families})


def check_distribution(cfg: QANConfig) -> None:
    """The rules of `tasks` and `holdout` that need their members (load_config calls this; the
    rules on the values alone are QANConfig.validate's); ValueError naming the value, the rule
    and the fix."""
    for name in cfg.tasks:
        if not (isinstance(name, str) and (name in DISTRIBUTIONS or name in TASK_PRESETS
                                           or is_user_task(name))):
            raise ValueError(f"`tasks` names {name!r}; every entry must be a distribution "
                             f"({', '.join(DISTRIBUTIONS)}), a preset ({', '.join(TASK_PRESETS)}) "
                             f"or a task of your own written module:function. {_FIXES}, or fix "
                             "the spelling.")
    for family in OPTIMIZER_FAMILIES:
        low, high = _lr_range(cfg, family)
        if low > high:
            raise ValueError(f"`lr_min/lr_max` are ({cfg.lr_min}, {cfg.lr_max}); with `tasks` the "
                             f"initial LR of a {family} task is drawn from "
                             f"{cfg.lr_init_range or LR_RANGES[family]}, which lies outside "
                             "them. Widen the bounds (e.g. --lr-min 1e-5 --lr-max 1) or set "
                             "--lr-init-range inside them.")
    known = known_families(cfg)
    unknown = [h for h in cfg.holdout if h not in known]
    if unknown:
        raise ValueError(f"`holdout` names {unknown}, which are no family of the tasks "
                         f"{list(cfg.tasks)}; each must be one of {known}. Fix the spelling "
                         "(e.g. --holdout cnn,mnist1d-mlp).")
    if not _available(cfg):
        raise ValueError(f"`holdout` is {list(cfg.holdout)}; it leaves no task of "
                         f"{list(cfg.tasks)} to sample. Hold out fewer families, or add tasks.")


def load_config(values: dict[str, Any] | None = None, **overrides: Any) -> QANConfig:
    """A validated QANConfig with the tasks it names loaded: for a task of your own
    ("module:function") its `UserTask.config` fills the fields not given (explicit values win;
    dataset and model are "user"), and a task distribution (`tasks`, `holdout`) is checked
    against its members. Otherwise `from_dict`."""
    given = given_values(values, **overrides)
    task = given.get("task") or QANConfig.task
    if is_user_task(task):
        from qan_ray.tasks import load_user_task  # imports torch: only for a user task

        given = {**given_values(load_user_task(task).config), "dataset": USER, "model": USER,
                 **given}
    cfg = from_dict(given)
    if cfg.tasks:
        check_distribution(cfg)
    return cfg


def config_from_args(args: Any, **overrides: Any) -> QANConfig:
    """`load_config` of the task flags given in parsed CLI args (unset flags fall back to the
    --task preset or the user task's config)."""
    return load_config({**args_values(args), **overrides})


# --- sampling ----------------------------------------------------------------------------------
@functools.lru_cache(maxsize=64)
def _n_train(dataset_or_task: str, data_root: str | None, download: bool, val_fraction: float,
             data_seed: int, max_train_samples: int | None, minibatch: bool,
             skew: tuple = (1.0, (5, 6, 7, 8, 9), 0.0, (0, 1, 2))) -> int:
    import torch

    from qan_ray.data import load_data

    task = dataset_or_task if is_user_task(dataset_or_task) else "digits-mlp"
    probe = QANConfig(task=task, dataset=USER if is_user_task(task) else dataset_or_task,
                      model=USER if is_user_task(task) else "mlp", data_root=data_root,
                      download=download, val_fraction=val_fraction, data_seed=data_seed,
                      max_train_samples=max_train_samples,
                      action_mode="minibatch" if minibatch else "lr", class_imbalance=skew[0],
                      rare_classes=skew[1], label_noise=skew[2], noisy_classes=skew[3])
    return load_data(probe, torch.device("cpu")).n_train


def batches_per_epoch(cfg: QANConfig) -> int:
    """Mini-batches per epoch of a task, as TargetTrainer counts them (loads the data split on
    the CPU once per process)."""
    n = _n_train(cfg.task if cfg.model == USER else cfg.dataset, cfg.data_root, cfg.download,
                 cfg.val_fraction, cfg.data_seed, cfg.max_train_samples,
                 cfg.action_mode == "minibatch", (cfg.class_imbalance, tuple(cfg.rare_classes),
                                                  cfg.label_noise, tuple(cfg.noisy_classes)))
    return max(1, n // min(cfg.batch_size, n))


def _log_uniform(rng: np.random.Generator, low: float, high: float) -> float:
    return float(min(max(math.exp(rng.uniform(math.log(low), math.log(high))), low), high))


def episode_rng(seed: int) -> np.random.Generator:
    """The task draw's random stream of an episode seed (apart from the seed's other uses)."""
    return np.random.default_rng([int(seed), _STREAM])


def sample_task(cfg: QANConfig, rng: np.random.Generator | int) -> QANConfig:
    """The task of one episode: a validated single-task QANConfig (tasks and holdout empty) drawn
    from cfg.tasks minus cfg.holdout. `rng` is the episode seed (or a Generator). A config
    without tasks is returned as is."""
    if not cfg.tasks:
        return cfg
    if not isinstance(rng, np.random.Generator):
        rng = episode_rng(int(rng))
    members = _available(cfg)
    options = members[int(rng.integers(len(members)))]
    option = options[int(rng.integers(len(options)))]
    if option.template is not None:
        task = option.template
        lr = _log_uniform(rng, *_lr_range(cfg, option.optimizer))
    else:
        batch = int(rng.choice(BATCH_SIZES))
        low, high = EPOCHS[option.dataset]
        epochs = float(rng.integers(low, high + 1))
        hidden: tuple[int, ...] = QANConfig.hidden
        if option.model == "mlp":
            depth = int(rng.choice(MLP_DEPTHS))
            hidden = tuple(int(w) for w in rng.choice(MLP_WIDTHS, size=depth))
        lr = _log_uniform(rng, *_lr_range(cfg, option.optimizer))
        variation: dict[str, Any] = {"weight_decay": 0.0}
        if option.member == WIDE:
            variation = _wide_variation(cfg, option, rng)
        task = from_dict({
            **_shared(cfg), "task": WIDE_PAIRS[(option.dataset, option.model)],
            "dataset": option.dataset, "model": option.model, "hidden": hidden,
            **_OPTIMIZER_FIELDS[option.optimizer], "batch_size": batch,
            "epochs_per_episode": epochs, "augment": False, "lr": lr, **variation})
    return task.replace(lr=lr, lr_init_range=None, control_interval=batches_per_epoch(task))


def _wide_variation(cfg: QANConfig, option: _Option, rng: np.random.Generator
                    ) -> dict[str, Any]:
    """`generalist-wide`'s per-episode variations: AdamW's weight decay, label noise on
    classes 0-2, the share of the training split kept."""
    decay = _log_uniform(rng, *WIDE_DECAY) if option.optimizer == "adamw" else 0.0
    noise = float(rng.choice(WIDE_NOISE))
    fraction = float(rng.choice(WIDE_FRACTIONS))
    keep = cfg.max_train_samples
    if fraction < 1.0:
        full = _n_train(option.dataset, cfg.data_root, cfg.download, cfg.val_fraction,
                        cfg.data_seed, cfg.max_train_samples, cfg.action_mode == "minibatch")
        keep = max(1, int(full * fraction))
    return {"weight_decay": decay, "label_noise": noise, "max_train_samples": keep}


def episode_steps(task_cfg: QANConfig) -> int:
    """Control steps of one episode of a single task, as TargetTrainingEnv counts them."""
    per_epoch = batches_per_epoch(task_cfg)
    total = max(1, round(task_cfg.epochs_per_episode * per_epoch))
    return math.ceil(total / task_cfg.control_interval)


def mean_episode_steps(cfg: QANConfig, samples: int = 64) -> float:
    """Mean control steps per episode over `samples` episode seeds (0, 1, ...) of cfg.tasks, or
    the steps of cfg's own task: what an exploration schedule sized in episodes needs."""
    if not cfg.tasks:
        return float(episode_steps(cfg))
    return sum(episode_steps(sample_task(cfg, s)) for s in range(samples)) / samples


__all__ = ["DISTRIBUTIONS", "GENERALIST", "WIDE", "LR_RANGES", "batches_per_epoch",
           "check_distribution",
           "config_from_args", "describe", "episode_steps", "families", "known_families",
           "load_config", "mean_episode_steps", "model_family", "optimizer_family", "sample_task",
           "task_lr_range", "trainer_key"]
