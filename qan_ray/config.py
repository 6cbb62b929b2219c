"""Configuration of one target-training task and of how a controller drives it.

`QANConfig` is the single source of truth for the trainer, the environment, the Ray actors and the
CLI. Every field is validated in `validate()`; bad input raises `ValueError` naming the value, the
rule and the fix. Presets (`TASK_PRESETS`) fill in dataset/model/optimizer for a task name; a
task of your own, "module:function" (qan_ray.tasks, docs/user_tasks.md), fills them from the
`UserTask.config` its function returns, with dataset and model "user". `tasks` turns the config
into a task distribution for meta-training (qan_ray.distribution): every episode draws its own
task from the episode seed.

The lowest layer: plain values, imports nothing of the project. `validate()` checks values only.
What needs a task loaded (a user task's `UserTask.config` and its module, a distribution's
members and families) is done by `qan_ray.distribution.load_config`, which ends in `from_dict`.
Each field's help text (the CLI's, `add_dataclass_arguments`) is its `documented(...)` text.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

CLASS_ACTIONS = ("keep", "toward uniform", "toward balanced", "toward loss-proportional",
                 "toward hardest class")  # minibatch mode (qan_ray.class_sampling)
DATASETS = ("digits", "mnist1d", "mnist", "fashion-mnist", "cifar10", "user")
EMBEDDED_DATASETS = ("digits", "mnist1d")  # built in-process: no data_root, no download
MODELS = ("mlp", "lenet", "cnn1d", "cnn2d", "resnet", "resnet1d", "wrn", "user")
USER = "user"  # dataset and model of a module:function task: the task supplies both
LR_FREE_OPTIMIZERS = ("prodigy", "schedulefree-sgd", "schedulefree-adamw", "dadapt-sgd",
                      "dadapt-adam")  # qan_ray.lrfree: K = 1 only, the `baselines` extra
OPTIMIZERS = ("sgd", "adam", "adamw", *LR_FREE_OPTIMIZERS)
ACTION_MODES = ("lr", "minibatch")
LR_SCHEDULES = ("constant", "cosine")
REWARDS = ("log_loss", "val_loss", "time_to_target", "final_val", "final_acc")
MM_REFERENCES = ("final", "trajectory")

def documented(default: Any = dataclasses.MISSING, doc: str = "") -> Any:
    """A dataclass field with its help text (metadata "help", whitespace collapsed)."""
    return dataclasses.field(default=default, metadata={"help": " ".join(doc.split())})


# Task presets: a name the user types -> the fields it sets. Anything given explicitly wins.
TASK_PRESETS: dict[str, dict[str, Any]] = {
    # The embedded default: scikit-learn's 8x8 digits (1,797 images, no download), a small MLP.
    "digits-mlp": dict(
        dataset="digits", model="mlp", hidden=(64,), optimizer="sgd", lr=0.05, momentum=0.9,
        batch_size=32, epochs_per_episode=8.0, control_interval=10,
    ),
    # MNIST-1D (Greydanus 2020), built by its generator in-process (no download): 4,000 train
    # (less the validation share) / 1,000 test signals of length 40. An MLP and the paper's 1-D
    # CNN; the MLP-CNN gap (reported 68% vs 94% test) leaves room for a schedule to matter.
    # 32 batches of 100 per epoch, one decision per epoch (what a Tune trainable reports). LR and
    # epochs measured in benchmarks/mnist1d_check.py (benchmarks/results/mnist1d_check.md).
    "mnist1d-mlp": dict(
        dataset="mnist1d", model="mlp", hidden=(100, 100), optimizer="sgd", lr=0.1,
        momentum=0.9, batch_size=100, epochs_per_episode=40.0, control_interval=32,
    ),
    "mnist1d-cnn": dict(
        dataset="mnist1d", model="cnn1d", optimizer="sgd", lr=0.1, momentum=0.9,
        batch_size=100, epochs_per_episode=40.0, control_interval=32,
    ),
    # Tasks where mini-batch class selection can matter: classes 5-9 are 8x rarer in the
    # training split (validation and test balanced), or 40% of the training labels of classes
    # 0-2 are wrong. Minibatch mode, reward val_loss (on the balanced validation split).
    "digits-mlp-imbalanced": dict(
        dataset="digits", model="mlp", hidden=(64,), optimizer="sgd", lr=0.05, momentum=0.9,
        batch_size=32, epochs_per_episode=8.0, control_interval=10, class_imbalance=8.0,
        action_mode="minibatch", reward="val_loss",
    ),
    "digits-mlp-noisy": dict(
        dataset="digits", model="mlp", hidden=(64,), optimizer="sgd", lr=0.05, momentum=0.9,
        batch_size=32, epochs_per_episode=8.0, control_interval=10, label_noise=0.4,
        action_mode="minibatch", reward="val_loss",
    ),
    "mnist1d-mlp-imbalanced": dict(
        dataset="mnist1d", model="mlp", hidden=(100, 100), optimizer="sgd", lr=0.1,
        momentum=0.9, batch_size=100, epochs_per_episode=40.0, control_interval=32,
        class_imbalance=8.0, action_mode="minibatch", reward="val_loss",
    ),
    "mnist1d-cnn-imbalanced": dict(
        dataset="mnist1d", model="cnn1d", optimizer="sgd", lr=0.1, momentum=0.9,
        batch_size=100, epochs_per_episode=40.0, control_interval=32, class_imbalance=8.0,
        action_mode="minibatch", reward="val_loss",
    ),
    # A small 2-D CNN (two 3x3 convs + pooling + a Linear head) on the embedded digits.
    "digits-cnn": dict(
        dataset="digits", model="cnn2d", optimizer="sgd", lr=0.05, momentum=0.9,
        batch_size=32, epochs_per_episode=8.0, control_interval=10,
    ),
    # Small residual CNNs with BatchNorm (stem + 2 basic blocks) on the embedded data: members of
    # the `generalist-wide` distribution (its start LRs are drawn; these LRs are the 2-D CNN's and
    # the MNIST-1D CNN's defaults, not tuned for them).
    "digits-resnet": dict(
        dataset="digits", model="resnet", optimizer="sgd", lr=0.05, momentum=0.9,
        batch_size=32, epochs_per_episode=8.0, control_interval=10,
    ),
    "mnist1d-resnet": dict(
        dataset="mnist1d", model="resnet1d", optimizer="sgd", lr=0.1, momentum=0.9,
        batch_size=100, epochs_per_episode=40.0, control_interval=32,
    ),
    "mnist-mlp": dict(
        dataset="mnist", model="mlp", hidden=(256,), optimizer="sgd", lr=0.05, momentum=0.9,
        batch_size=64, epochs_per_episode=3.0, control_interval=100,
    ),
    "mnist-lenet": dict(
        dataset="mnist", model="lenet", optimizer="sgd", lr=0.05, momentum=0.0,
        batch_size=64, epochs_per_episode=3.0, control_interval=100,
    ),
    "fashion-mnist-lenet": dict(
        dataset="fashion-mnist", model="lenet", optimizer="sgd", lr=0.05, momentum=0.9,
        batch_size=64, epochs_per_episode=5.0, control_interval=100,
    ),
    "cifar10-wrn": dict(
        dataset="cifar10", model="wrn", wrn_depth=16, wrn_width=4, optimizer="sgd", lr=0.1,
        momentum=0.9, nesterov=True, weight_decay=5e-4, batch_size=128, epochs_per_episode=10.0,
        control_interval=195, augment=True,
    ),
    # Reproduction presets of Fu et al. (2016), with the corrections of docs/background.md: the
    # action really reaches the optimizer, optimizer state persists, float32 states, greedy
    # evaluation.
    "paper-mnist-lr": dict(
        dataset="mnist", model="lenet", optimizer="sgd", lr=0.05, momentum=0.0, batch_size=10,
        epochs_per_episode=20.0, control_interval=100, action_mode="lr",
        lr_factors=(0.97, 1.0), restart_lr=0.05, mm_coef=0.005, mm_active_fraction=0.5,
    ),
    "paper-mnist-minibatch": dict(
        dataset="mnist", model="lenet", optimizer="sgd", lr=0.05, momentum=0.0, batch_size=128,
        epochs_per_episode=20.0, control_interval=1, action_mode="minibatch",
        mm_coef=0.005, mm_active_fraction=0.5,
    ),
    "paper-cifar-wrn": dict(
        dataset="cifar10", model="wrn", wrn_depth=40, wrn_width=4, optimizer="sgd", lr=0.1,
        momentum=0.9, nesterov=True, weight_decay=5e-4, batch_size=128, epochs_per_episode=200.0,
        control_interval=391, augment=True, action_mode="lr", lr_factors=(0.97, 1.0),
        restart_lr=0.1,
    ),
}


@dataclass
class QANConfig:
    """One target-training task plus the control problem over it (see docs/background.md)."""

    task: str = documented("digits-mlp", """
        A preset name (TASK_PRESETS), or your own task as module:function (a function returning
        qan_ray.tasks.UserTask: model factory, data, optimizer settings; docs/user_tasks.md). It
        fills the fields below that are not given.""")
    tasks: tuple[str, ...] = documented((), """
        Meta-train on a task distribution instead of the single `task`: each episode draws one
        task from the episode seed, uniformly over the names given here. A name is a distribution
        (generalist: digits and MNIST-1D; MLPs 1-4 layers of width 32-512, 1-D and 2-D CNNs; SGD,
        momentum, Nesterov, Adam; batch 16-256; a log-uniform initial LR over 3 decades; one
        decision per epoch), a preset or your own module:function. Empty = the single `task`.""")
    holdout: tuple[str, ...] = documented((), """
        Families left out of the `tasks` distribution (for transfer tests): a dataset (digits,
        mnist1d), a model (mlp, cnn1d, cnn2d) or model family (cnn), a dataset-model pair
        (mnist1d-mlp, digits-cnn), an optimizer (sgd, momentum, nesterov, adam) or a task name.""")
    dataset: str = documented("digits", """
        digits (embedded, no download) | mnist1d (MNIST-1D, built by its generator, no download) |
        mnist | fashion-mnist | cifar10 | user (the data of a module:function task).""")
    data_root: str | None = documented(None, """
        Folder holding torchvision's on-disk dataset files; required for all but digits and
        mnist1d.""")
    download: bool = documented(False, """
        Let torchvision download the dataset into data_root (only when the user asks).""")
    val_fraction: float = documented(0.2, """
        Share of the training split held out for validation (fixed by data_seed).""")
    data_seed: int = documented(0, """
        Seed of the train/validation/test split; the same for every episode.""")
    max_train_samples: int | None = documented(None, """
        Cap on training samples (None = all); handy for quick runs on big datasets.""")
    augment: bool = documented(False, """
        Random flip + pad-4 crop on the device (CIFAR-10).""")

    model: str = documented("mlp", """
        mlp | lenet (the paper's MNIST CNN) | cnn1d (the MNIST-1D paper's 1-D CNN) | cnn2d (a
        small 2-D CNN: two 3x3 convs + pooling + a Linear head, any image size) | resnet (a
        small residual CNN with BatchNorm: stem + 2 basic blocks, any image size) | resnet1d
        (the same for 1-D signals: mnist1d) | wrn (WideResNet-depth-width) | user (the model
        factory of a module:function task).""")
    hidden: tuple[int, ...] = documented((64,), """
        Hidden layer widths of the MLP.""")
    wrn_depth: int = documented(16, """
        WideResNet depth (6n+4).""")
    wrn_width: int = documented(4, """
        WideResNet widening factor k.""")

    optimizer: str = documented("sgd", """
        sgd | adam | adamw (Adam with decoupled weight decay, torch.optim.AdamW's arithmetic);
        the LR-free baselines (one network at a time, the `baselines` extra; qan_ray.lrfree):
        prodigy | schedulefree-sgd | schedulefree-adamw | dadapt-sgd | dadapt-adam, for which
        `lr` multiplies the optimizer's own step size (1 for prodigy and dadapt).""")
    lr: float = documented(0.05, """
        Initial learning rate of every episode.""")
    lr_init_range: tuple[float, ...] | None = documented(None, """
        If set (LOW,HIGH), each episode starts at an LR drawn log-uniformly from it (seeded by the
        episode seed) instead of `lr`, so a controller learns to correct bad initial LRs (as
        Tune's sampled trials need).""")
    momentum: float = documented(0.9, """
        SGD momentum (0 = plain SGD).""")
    nesterov: bool = documented(False, """
        Nesterov momentum (SGD only; needs momentum > 0).""")
    weight_decay: float = documented(0.0, """
        Weight decay: an L2 term in the gradient (sgd, adam), or decoupled (adamw: the weights
        shrink by 1 - lr x weight_decay each step).""")
    batch_size: int = documented(32, """
        Mini-batch size.""")
    epochs_per_episode: float = documented(8.0, """
        Length of one episode (one training run from a fresh init), in epochs.""")
    amp: bool = documented(True, """
        bf16 autocast on CUDA (ignored on the CPU).""")

    action_mode: str = documented("lr", """
        lr: multiplicative LR actions | minibatch: pick the class emphasised in the next
        batches.""")
    control_interval: int = documented(10, """
        Mini-batches between two controller decisions (the paper used 1).""")
    lr_factors: tuple[float, ...] = documented((0.5, 0.9, 1.0, 1.1, 2.0), """
        Multiplicative LR actions (action i multiplies the LR by lr_factors[i]).""")
    restart_lr: float | None = documented(None, """
        If set, one more action resets the LR to this value (the paper's 'restart').""")
    lr_schedule: str = documented("constant", """
        constant: each action multiplies the current LR | cosine: actions multiply a correction of
        a cosine schedule from the episode's initial LR (keep = plain cosine decay).""")
    lr_min: float = documented(1e-5, """
        Lower clamp of the LR.""")
    lr_max: float = documented(1.0, """
        Upper clamp of the LR.""")
    focus_share: float = documented(20 / 128, """
        Unused: the share of the paper's class roulette, which the bounded class sampler
        (class_floor, class_step) replaced; kept so that older saved configs load.""")
    class_floor: float = documented(0.5, """
        Minibatch mode: every class keeps at least this fraction of its uniform share (its
        frequency in the training split), whatever the actions do.""")
    class_step: float = documented(0.25, """
        Minibatch mode: one class action moves the adjustable part of the class shares this far
        toward its target (keep, uniform, balanced, loss-proportional, hardest class).""")
    class_imbalance: float = documented(1.0, """
        Training split only: the classes in rare_classes keep 1/class_imbalance of their
        training samples (validation and test stay as they are, balanced). 1 = off.""")
    rare_classes: tuple[int, ...] = documented((5, 6, 7, 8, 9), """
        The classes class_imbalance thins out.""")
    label_noise: float = documented(0.0, """
        Training split only: this share of the training samples of noisy_classes get a random
        other label (validation and test stay clean). 0 = off.""")
    noisy_classes: tuple[int, ...] = documented((0, 1, 2), """
        The classes whose training labels label_noise corrupts.""")

    reward: str = documented("log_loss", """
        log_loss: -(log L_t - log L_{t-1}) on training loss | val_loss: same on validation loss |
        time_to_target: -1/steps per step until val accuracy >= target_accuracy | final_val: 0 per
        step, log L_val_0 - log L_val_T at the episode's end | final_acc: 0 per step, (acc_T -
        acc_0) / 0.9 at the end (use gamma = 1 or close with the final_* rewards).""")
    reward_scale: float = documented(1.0, """
        Multiplies every reward (not the divergence penalty).""")
    target_accuracy: float = documented(0.95, """
        Validation accuracy that ends a time_to_target episode (and is reported by evaluate).""")
    divergence_factor: float = documented(10.0, """
        Loss above divergence_factor x the first loss (or NaN/inf) ends the episode.""")
    divergence_penalty: float = documented(5.0, """
        Reward given on divergence is -divergence_penalty.""")
    chance_penalty: float | None = documented(None, """
        Subtracted on the last step of a run whose final val accuracy is still within 2 points
        of chance (0.1 for 10 classes), whatever the reward: None = divergence_penalty / 2, 0
        = off.""")
    chance_step_penalty: float = documented(0.1, """
        Subtracted at every step (after the first) whose val accuracy is within 2 points of
        chance, so that a controller learns to leave a dead or stalled state early.""")
    guard: bool = documented(True, """
        The rescue guard: a dying run (NaN/inf, a loss 2% above its initial value, or val
        accuracy back at chance after it had learned; qan_ray.episode) is rolled back to its last
        good weights and optimizer state and its LR is cut by rescue_factor. --no-guard turns
        it off (an ablation): a diverged episode then ends with -divergence_penalty.""")
    rescue_factor: float = documented(0.1, """
        A rescue multiplies the LR (with lr_schedule cosine: the correction) by this.""")
    rescue_penalty: float = documented(1.0, """
        Reward given on each rescue is -rescue_penalty.""")
    max_rescues: int = documented(4, """
        Rescues per run at most; after them the guard leaves the run alone.""")

    mm_coef: float = documented(0.0, """
        Meta-momentum pull W <- W + c (W* - W) after each step (0 = off; paper 0.001-0.01).""")
    mm_active_fraction: float = documented(0.5, """
        Meta-momentum is active during this first fraction of every episode.""")
    mm_reference: str = documented("final", """
        W*: 'final' weights of a reference run, or its weights at the same 'trajectory' step.""")

    weight_features: bool = documented(True, """
        Observe the weight statistics (the paper's state); False = training signals only (an
        ablation that asks how much the weights tell the controller).""")
    monitored_layers: tuple[str, ...] = documented((), """
        Names of Linear/Conv modules whose weights are observed (empty = every one).""")
    val_max_samples: int = documented(5000, """
        Validation samples used at each control point (all if fewer).""")

    seed: int = documented(0, """
        Seed of episode 0's init and batch order; episode e uses seed + e unless reset(seed=).""")
    device: str = documented("auto", """
        auto (cuda when torch.cuda.is_available(), else cpu) | cpu | cuda | cuda:N.""")

    # --- derived helpers -------------------------------------------------------------------
    @property
    def chance_penalty_value(self) -> float:
        """The penalty a run ending at chance pays (chance_penalty, or divergence_penalty / 2)."""
        if self.chance_penalty is None:
            return self.divergence_penalty / 2
        return float(self.chance_penalty)

    @property
    def num_actions(self) -> int:
        if self.action_mode == "minibatch":
            return len(CLASS_ACTIONS)
        return len(self.lr_factors) + (1 if self.restart_lr is not None else 0)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> QANConfig:
        return from_dict({**self.to_dict(), **changes})

    def validate(self) -> QANConfig:  # noqa: C901 - a flat list of rules reads best
        def bad(name: str, value: Any, rule: str, fix: str) -> ValueError:
            return ValueError(f"`{name}` is {value!r}; {rule}. {fix}")

        user_task = is_user_task(self.task)
        if not user_task and self.task not in TASK_PRESETS:
            raise _bad_task(self.task)
        for name in ("dataset", "model"):
            value = getattr(self, name)
            if user_task and value != USER:
                raise bad(name, value, f"task {self.task!r} supplies its own {name}, so it "
                          f"must be {USER!r}", f"Leave --{name} unset with a module:function "
                          "task.")
            if not user_task and value == USER:
                raise bad(name, value, f"{USER!r} is the {name} of a module:function task, but "
                          f"task is the preset {self.task!r}",
                          "Pass --task my_pkg.my_module:make_task (docs/user_tasks.md), or "
                          f"another --{name}.")
        if self.dataset not in DATASETS:
            raise bad("dataset", self.dataset, f"it must be one of {DATASETS}",
                      "Pick one of those, or use --task digits-mlp for the embedded default.")
        if self.model not in MODELS:
            raise bad("model", self.model, f"it must be one of {MODELS}", "Try --model mlp.")
        if self.optimizer not in OPTIMIZERS:
            raise bad("optimizer", self.optimizer, f"it must be one of {OPTIMIZERS}",
                      "Try --optimizer sgd.")
        if self.action_mode not in ACTION_MODES:
            raise bad("action_mode", self.action_mode, f"it must be one of {ACTION_MODES}",
                      "Try --action-mode lr.")
        if self.lr_schedule not in LR_SCHEDULES:
            raise bad("lr_schedule", self.lr_schedule, f"it must be one of {LR_SCHEDULES}",
                      "Try --lr-schedule cosine (actions correct a cosine decay) or constant.")
        if self.reward not in REWARDS:
            raise bad("reward", self.reward, f"it must be one of {REWARDS}",
                      "Try --reward log_loss.")
        if self.mm_reference not in MM_REFERENCES:
            raise bad("mm_reference", self.mm_reference, f"it must be one of {MM_REFERENCES}",
                      "Try --mm-reference final.")
        if self.dataset not in (*EMBEDDED_DATASETS, USER) and not self.data_root:
            raise bad("data_root", self.data_root, f"dataset {self.dataset!r} is read from disk",
                      "Pass --data-root DIR (add --download to let torchvision fetch it).")
        if self.model == "wrn" and (self.wrn_depth < 10 or (self.wrn_depth - 4) % 6):
            raise bad("wrn_depth", self.wrn_depth, "it must be 6n+4 with n >= 1",
                      "Try 10, 16, 28 or 40.")
        if self.model == "lenet" and self.dataset in ("digits", "mnist1d", "cifar10"):
            raise bad("model", self.model, "the paper's LeNet expects 28x28 grey images",
                      "Use mnist/fashion-mnist, or --model mlp / wrn.")
        if self.model == "wrn" and self.dataset == "mnist1d":
            raise bad("model", self.model, "WideResNet needs (C, H, W) images and mnist1d gives "
                      "1-D signals of shape (1, 40)", "Use --model cnn1d or mlp.")
        if self.model in ("cnn2d", "resnet") and self.dataset == "mnist1d":
            kind = "CNN" if self.model == "cnn2d" else "residual CNN"
            raise bad("model", self.model, f"the 2-D {kind} needs (C, H, W) images and mnist1d "
                      "gives 1-D signals of shape (1, 40)", "Use --model cnn1d, resnet1d or mlp.")
        if self.model == "resnet1d" and self.dataset not in ("mnist1d", USER):
            raise bad("model", self.model, f"the 1-D residual CNN needs 1-D signals, but "
                      f"dataset {self.dataset!r} gives images", "Use --dataset mnist1d, or "
                      "--model resnet for images.")
        if self.model == "cnn1d" and self.dataset != "mnist1d":
            raise bad("model", self.model, f"the 1-D CNN needs 1-D signals, but dataset "
                      f"{self.dataset!r} gives images", "Use --dataset mnist1d (or --task "
                      "mnist1d-cnn), or another --model.")
        if self.augment and self.dataset == "mnist1d":
            raise bad("augment", self.augment, "flip + crop augmentation is for images, and "
                      "mnist1d gives 1-D signals", "Pass --no-augment.")
        for name in ("control_interval", "batch_size", "wrn_width", "val_max_samples"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                hint = 50 if name == "control_interval" else 32
                raise bad(name, value, "it must be an integer >= 1",
                          f"Try --{name.replace('_', '-')} {hint}.")
        if any(h < 1 for h in self.hidden):
            raise bad("hidden", self.hidden, "every width must be >= 1", "Try --hidden 64.")
        if not (self.epochs_per_episode > 0 and math.isfinite(self.epochs_per_episode)):
            raise bad("epochs_per_episode", self.epochs_per_episode, "it must be > 0",
                      "Try --epochs-per-episode 8.")
        if not (0 < self.val_fraction < 1):
            raise bad("val_fraction", self.val_fraction, "it must lie in (0, 1)", "Try 0.2.")
        if not (self.lr_min > 0 and self.lr_max > 0):
            raise bad("lr_min/lr_max", (self.lr_min, self.lr_max), "both must be > 0",
                      "Try --lr-min 1e-5 --lr-max 1.")
        if self.lr_min > self.lr_max:
            raise bad("lr_min/lr_max", (self.lr_min, self.lr_max),
                      "lr_min must not exceed lr_max (the bounds are reversed)",
                      f"Swap them: --lr-min {self.lr_max} --lr-max {self.lr_min}.")
        if not (self.lr_min <= self.lr <= self.lr_max):
            raise bad("lr", self.lr, f"it must lie in [lr_min, lr_max] = [{self.lr_min}, "
                      f"{self.lr_max}]", "Change --lr or the bounds.")
        if self.lr_init_range is not None and not (
                len(self.lr_init_range) == 2
                and self.lr_min <= self.lr_init_range[0] <= self.lr_init_range[1] <= self.lr_max):
            raise bad("lr_init_range", self.lr_init_range, "it must be LOW,HIGH with lr_min <= "
                      "LOW <= HIGH <= lr_max", "Try --lr-init-range 0.001,1, or leave it unset.")
        if not 0 < self.rescue_factor < 1:
            raise bad("rescue_factor", self.rescue_factor, "it must lie in (0, 1)",
                      "Try --rescue-factor 0.1.")
        for name in ("rescue_penalty", "chance_step_penalty"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise bad(name, value, "it must be a finite number >= 0",
                          f"Try --{name.replace('_', '-')} 1, or 0 to switch it off.")
        if not isinstance(self.max_rescues, int) or self.max_rescues < 0:
            raise bad("max_rescues", self.max_rescues, "it must be an integer >= 0",
                      "Try --max-rescues 4.")
        if self.restart_lr is not None and not (self.lr_min <= self.restart_lr <= self.lr_max):
            raise bad("restart_lr", self.restart_lr, "it must lie in [lr_min, lr_max]",
                      "Change --restart-lr or the bounds.")
        if not self.lr_factors or any(not (f > 0) for f in self.lr_factors):
            raise bad("lr_factors", self.lr_factors,
                      "they must be a non-empty list of factors > 0", "Try 0.5,0.9,1,1.1,2.")
        if self.momentum < 0 or (self.nesterov and self.momentum == 0):
            raise bad("momentum", self.momentum, "it must be >= 0 (> 0 with nesterov)",
                      "Try --momentum 0.9.")
        if not (0 < self.focus_share < 1):
            raise bad("focus_share", self.focus_share, "it must lie in (0, 1)", "Try 0.15625.")
        if not (0 <= self.class_floor < 1):
            raise bad("class_floor", self.class_floor, "it must lie in [0, 1)", "Try 0.5.")
        if not (0 < self.class_step <= 1):
            raise bad("class_step", self.class_step, "it must lie in (0, 1]", "Try 0.25.")
        if not (self.class_imbalance >= 1 and math.isfinite(self.class_imbalance)):
            raise bad("class_imbalance", self.class_imbalance, "it must be a finite ratio >= 1",
                      "Try --class-imbalance 8 (or 1 for the data as it is).")
        if not (0 <= self.label_noise < 1):
            raise bad("label_noise", self.label_noise, "it must lie in [0, 1)", "Try 0.4.")
        for name in ("rare_classes", "noisy_classes"):
            value = getattr(self, name)
            if any(not 0 <= int(c) < 10 for c in value) or len(set(value)) != len(value):
                raise bad(name, value, "they must be distinct class labels in 0..9",
                          f"Try --{name.replace('_', '-')} 5,6,7,8,9.")
        if (self.class_imbalance > 1 or self.label_noise > 0) and self.dataset == USER:
            raise bad("class_imbalance/label_noise", (self.class_imbalance, self.label_noise),
                      "they reshape the built-in datasets' training split; a task of your own "
                      "brings its own data", "Imbalance or corrupt the tensors your task "
                      "returns instead.")
        if not (0 <= self.mm_coef < 1):
            raise bad("mm_coef", self.mm_coef, "it must lie in [0, 1)",
                      "Try --mm-coef 0.005, or 0 to switch meta-momentum off.")
        if not (0 <= self.mm_active_fraction <= 1):
            raise bad("mm_active_fraction", self.mm_active_fraction, "it must lie in [0, 1]",
                      "Try 0.5.")
        if not (0 < self.target_accuracy <= 1):
            raise bad("target_accuracy", self.target_accuracy, "it must lie in (0, 1]",
                      "Try 0.95.")
        if self.divergence_penalty < 0 or not math.isfinite(self.divergence_penalty):
            raise bad("divergence_penalty", self.divergence_penalty, "it must be a finite "
                      "number >= 0 (it is subtracted)", "Try --divergence-penalty 5.")
        if self.chance_penalty is not None and not (
                self.chance_penalty >= 0 and math.isfinite(self.chance_penalty)):
            raise bad("chance_penalty", self.chance_penalty, "it must be a finite number >= 0 "
                      "(it is subtracted), or unset for divergence_penalty / 2",
                      "Try --chance-penalty 2.5, or 0 to switch it off.")
        if self.divergence_factor <= 1:
            raise bad("divergence_factor", self.divergence_factor, "it must be > 1", "Try 10.")
        if self.device not in ("auto", "cpu") and not self.device.startswith("cuda"):
            raise bad("device", self.device, "it must be auto, cpu, cuda or cuda:N",
                      "Try --device auto.")
        # tasks/holdout: the rules on the values; the members' own (names, families, LR
        # ranges) are checked where they are loaded (qan_ray.distribution.check_distribution)
        if self.holdout and not self.tasks:
            raise ValueError(f"`holdout` is {self.holdout!r}, but `tasks` is empty; a holdout "
                             "leaves families out of a task distribution. Pass --tasks "
                             "generalist too, or drop --holdout.")
        if self.tasks and self.mm_coef > 0:
            raise ValueError(f"`mm_coef` is {self.mm_coef}, but `tasks` is set; meta-momentum "
                             "pulls towards the weights of a reference run of one task, and a "
                             "distribution changes the task every episode. Pass --mm-coef 0, or "
                             "drop --tasks.")
        return self


_FIELDS = {f.name: f for f in dataclasses.fields(QANConfig)}


def given_values(values: dict[str, Any] | None = None, **overrides: Any) -> dict[str, Any]:
    """The fields given: `values` then `overrides`, without the keys whose value is None ("not
    given") except for the fields whose default is None. Unknown keys raise (a typo would
    otherwise be silently ignored)."""
    given = {**(values or {}), **overrides}
    unknown = sorted(set(given) - set(_FIELDS))
    if unknown:
        raise ValueError(f"unknown config key(s) {unknown}; valid keys are {sorted(_FIELDS)}. "
                         "Check the spelling (use underscores, e.g. control_interval).")
    return {k: v for k, v in given.items() if v is not None or _FIELDS[k].default is None}


def from_dict(values: dict[str, Any] | None = None, **overrides: Any) -> QANConfig:
    """Build a validated config: preset of `task` first, then the given values (`given_values`).

    A task of your own ("module:function") has no preset here: its defaults are its
    `UserTask.config`, which `qan_ray.distribution.load_config` reads by loading the task and
    passes in with dataset and model "user". A dict that names a user task without its dataset
    (e.g. {"task": "my_tasks:make_task"}) raises, pointing there; a saved config (`to_dict()`)
    gives every field and builds as is.
    """
    given = given_values(values, **overrides)
    task = given.get("task") or QANConfig.task
    if is_user_task(task):
        if "dataset" not in given:
            raise ValueError(
                f"`task` is {task!r}, a task of your own, but its config was not loaded: its "
                "defaults (UserTask.config) come from importing and calling the task, which "
                "qan_ray.config does not do. Build the config with "
                "qan_ray.distribution.load_config(...) (what the CLI, the environments and the "
                "trainables use), or pass a saved config (QANConfig.to_dict()).")
        merged: dict[str, Any] = {"dataset": USER, "model": USER}
    elif task in TASK_PRESETS:
        merged = dict(TASK_PRESETS[task])
    else:
        raise _bad_task(task)
    merged.update(given)
    merged["task"] = task
    for key in ("tasks", "holdout"):  # "generalist" or "a,b" means those names, not letters
        if isinstance(merged.get(key), str):
            merged[key] = tuple(t.strip() for t in merged[key].split(",") if t.strip())
    for key in ("hidden", "lr_factors", "monitored_layers", "lr_init_range", "tasks", "holdout",
                "rare_classes", "noisy_classes"):
        if merged.get(key) is not None and not isinstance(merged[key], tuple):
            merged[key] = tuple(merged[key])
    return QANConfig(**merged).validate()


def is_user_task(task: Any) -> bool:
    """True for a task of your own, "module:function" (no preset name contains a colon)."""
    return isinstance(task, str) and ":" in task


def _bad_task(task: Any) -> ValueError:
    hint = ""
    if isinstance(task, str) and "." in task and task.replace(".", "").replace("_", "").isalnum():
        hint = f" For a task of your own, name the function too: --task {task}:make_task."
    return ValueError(f"`task` is {task!r}; it must be one of {sorted(TASK_PRESETS)} or a task "
                      "of your own written module:function (e.g. my_pkg.my_module:make_task, "
                      f"docs/user_tasks.md).{hint} Try --task digits-mlp (the embedded "
                      "default, no download).")


def add_dataclass_arguments(parser, cls, title: str, skip: tuple[str, ...] = (),
                            dest_prefix: str = "", flags: dict[str, str] | None = None,
                            choices: dict[str, list] | None = None,
                            helps: dict[str, str] | None = None,
                            metavars: dict[str, str] | None = None) -> None:
    """One --flag per field of dataclass `cls`, help = the field's `documented` text (metadata
    "help"). Every flag defaults to None ("not given"), so the dataclass (or a preset) supplies
    the default. Tuples are comma-separated; bools get --x / --no-x; `flags` renames a field's
    flag; `helps` and `metavars` replace a field's help text and metavar."""
    import argparse

    group = parser.add_argument_group(title)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        kind = str(f.type)
        kwargs: dict[str, Any] = {"dest": dest_prefix + f.name, "default": None,
                                  "help": (helps or {}).get(f.name, f.metadata.get("help", ""))}
        if kind == "bool":
            kwargs["action"] = argparse.BooleanOptionalAction
        elif kind.startswith("tuple"):
            item = {"int": int, "float": float}.get(kind[6:kind.index(",")], str)
            kwargs["type"], kwargs["metavar"] = _csv(item), "A,B,..."
        else:
            kwargs["type"] = {"int": int, "float": float}.get(kind.split(" |")[0], str)
        if choices and f.name in choices:
            kwargs["choices"] = choices[f.name]
        if metavars and f.name in metavars:
            kwargs["metavar"] = metavars[f.name]
        flag = (flags or {}).get(f.name, "--" + f.name.replace("_", "-"))
        group.add_argument(flag, **kwargs)


def add_config_arguments(parser, skip: tuple[str, ...] = ()) -> None:
    """The task flags: QANConfig 1:1; unset flags fall back to the --task preset."""
    task_help = ("a preset: " + ", ".join(TASK_PRESETS) + " (default digits-mlp); or your own "
                 "task as module:function, a function returning qan_ray.tasks.UserTask (model "
                 "factory, data, optimizer settings; see docs/user_tasks.md). The module must "
                 "be importable on every Ray node. Unset flags fall back to the task.")
    add_dataclass_arguments(parser, QANConfig,
                            "task and control (QANConfig; unset = the --task preset)", skip,
                            helps={"task": task_help},
                            metavars={"task": "PRESET|MODULE:FUNCTION"})


def _csv(item):
    def parse(text: str) -> tuple:
        return tuple(item(t) for t in text.split(",") if t.strip())
    parse.__name__ = f"comma-separated {item.__name__}s"
    return parse


def args_values(args) -> dict[str, Any]:
    """The QANConfig fields given as flags in parsed CLI args (unset flags left out); the CLI
    loads them with `qan_ray.distribution.config_from_args`."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(QANConfig)
            if getattr(args, f.name, None) is not None}
