"""TargetTrainer: one training run of a target network on one device. No Ray in here.

It is the K = 1 view of `qan_ray.population.PopulationTrainer`, the project's only training
loop: the QAN environment, the Ray trainer actors, the Tune trainables and the adaptive
baselines call this view, the population vector env and `qan evaluate`'s baseline grid call the
population directly, so a comparison between a controller and a baseline differs only in who
sets the hyperparameter. This class only turns the population's (K,) arrays into scalars.

Invariants (the population's):
- data, model, optimizer and batch order live on one device; a mini-batch is an index slice of an
  on-device permutation (or, in minibatch mode, a class-composed index vector built on the device);
- nothing is read back to the host inside `train(k)`: losses accumulate on the device and are read
  once at the end (the control point);
- `set_lr` writes the optimizer's LR, so the very next mini-batch uses it (the original QAN's
  MNIST bug was an LR that never reached the optimizer);
- optimizer state (momentum buffers, Adam moments) persists across actions and is part of
  `state_dict()`.
"""

from __future__ import annotations

import functools
import json

import torch

from qan_ray.config import QANConfig
from qan_ray.constants import REFERENCE_SEED_OFFSET
from qan_ray.data import DeviceData
from qan_ray.population import PopulationTrainer


class TargetTrainer:
    """One training run (population member 0 of a population of one)."""

    def __init__(self, cfg: QANConfig, data: DeviceData | None = None,
                 device: torch.device | str | None = None):
        self.population = PopulationTrainer(cfg, seeds=[cfg.seed], data=data, device=device)
        pop = self.population
        self.device, self.data = pop.device, pop.data
        self.batch_size, self.batches_per_epoch = pop.batch_size, pop.batches_per_epoch
        self.total_batches, self.use_amp = pop.total_batches, pop.use_amp
        self.episode = 0  # resets so far: an adaptive baseline restarts its rule on a new one

    @property
    def cfg(self) -> QANConfig:
        return self.population.cfg

    @cfg.setter
    def cfg(self, cfg: QANConfig) -> None:
        self.population.cfg = cfg

    # --- episode lifecycle -------------------------------------------------------------------
    def reset(self, seed: int) -> None:
        """Fresh init (seeded), fresh optimizer state, fresh batch order, the config's LR: the
        start of an episode."""
        self.population.reset_member(0, int(seed))
        self.episode += 1

    @property
    def seed(self) -> int:
        return self.population.seeds[0]

    @property
    def model(self) -> torch.nn.Module:
        """The network, an nn.Module whose parameters are views of the trainer's weights."""
        return self.population.member_model(0)

    @property
    def initial_loss(self) -> float:
        return float(self.population.initial_loss[0])

    @property
    def step(self) -> int:
        return int(self.population.steps[0])

    @property
    def lr(self) -> float:
        return self.population.lr[0]

    def set_lr(self, lr: float) -> float:
        """Clamp to [lr_min, lr_max] and write it now. Returns the LR set."""
        return self.population.set_lr(float(lr))[0]

    def set_hyperparams(self, *, momentum: float | None = None,
                        weight_decay: float | None = None) -> None:
        """Momentum / weight decay from the next mini-batch on (PBT's mutations)."""
        self.population.optimizer.set_hyperparams(momentum=momentum, weight_decay=weight_decay)

    def class_action(self, action: int) -> list[float]:
        """Minibatch action (qan_ray.class_sampling.CLASS_ACTIONS): keep, or a bounded step of
        the class shares, effective at the next mini-batch. Returns the new shares."""
        return self.population.class_action(0, action)

    def set_class_shares(self, shares) -> list[float]:
        """The class shares set exactly (a sampling baseline)."""
        return self.population.set_class_shares(0, shares)

    @property
    def class_shares(self) -> list[float]:
        """Minibatch mode: the probability of each class per sample slot of the next batches."""
        return self.population.class_shares(0)

    def batch_composition(self) -> list[float]:
        """Expected samples per class (length 10) in each batch under the current shares."""
        return self.population.batch_composition(0)

    def evaluate_classes(self, split: str = "val") -> dict[str, float | list[float]]:
        """Per-class evaluation (PopulationTrainer.evaluate_classes): loss, accuracy and
        balanced_accuracy as floats, class_loss and class_accuracy as lists of 10."""
        out = self.population.evaluate_classes(split)
        return {k: (float(v[0]) if v.dim() == 1 else v[0].tolist()) for k, v in out.items()}

    def set_reference(self, snapshots: list[list[torch.Tensor]] | None) -> None:
        """W* for meta-momentum: one snapshot (final weights) or one per control step
        (trajectory), each a list of tensors matching the monitored weights."""
        self.population.set_reference(snapshots)

    def monitored_weights(self) -> list[torch.Tensor]:
        return self.population.monitored_weights(0)

    # --- training and evaluation ---------------------------------------------------------------
    def train(self, num_batches: int) -> float:
        """Train `num_batches` mini-batches at the current hyperparameters; return their mean
        loss (the one host read of this call). NaN/inf is returned, never raised."""
        return float(self.population.train(num_batches)[0])

    def evaluate(self, split: str = "val") -> tuple[float, float]:
        """(mean loss, accuracy) on 'val' (first val_max_samples) or 'test'."""
        loss, acc = self.population.evaluate(split)
        return float(loss[0]), float(acc[0])

    def probe_loss(self) -> float:
        """Loss of the current model on the first 1,024 training samples (L_0 at reset)."""
        return self.population._probe_member(0)

    def diverged(self, loss: float) -> bool:
        """The one divergence rule: NaN/inf, or more than divergence_factor x L_0."""
        return bool(self.population.diverged([loss])[0])

    @property
    def progress(self) -> float:
        return float(self.population.progress[0])

    @property
    def done(self) -> bool:
        return bool(self.population.done[0])

    # --- checkpointing -----------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything needed to resume bit-identically (PopulationTrainer.state_dict)."""
        return {**self.population.state_dict(), "episode": self.episode}

    def load_state_dict(self, state: dict) -> None:
        self.population.load_state_dict(state)
        self.episode = int(state.get("episode", self.episode))


def reference_run(cfg: QANConfig, device: torch.device | str | None = None
                  ) -> list[list[torch.Tensor]]:
    """W* for meta-momentum: train one reference run (fixed LR cfg.lr, seed cfg.seed +
    constants.REFERENCE_SEED_OFFSET, meta-momentum off) and keep the monitored weights at every
    control point plus the end. The same W* serves every episode (cached per process)."""
    key = json.dumps({**cfg.to_dict(), "mm_coef": 0.0}, sort_keys=True, default=list)
    return _reference_run(key, str(device) if device is not None else None)


@functools.lru_cache(maxsize=4)
def _reference_run(cfg_json: str, device: str | None) -> list[list[torch.Tensor]]:
    from qan_ray.config import from_dict

    cfg = from_dict(json.loads(cfg_json))
    ref = TargetTrainer(cfg.replace(seed=cfg.seed + REFERENCE_SEED_OFFSET), device=device)

    def snap() -> list[torch.Tensor]:
        return [p.detach().clone() for p in ref.monitored_weights()]

    snaps = [snap()]
    while not ref.done:
        ref.train(min(cfg.control_interval, ref.total_batches - ref.step))
        snaps.append(snap())
    return snaps
