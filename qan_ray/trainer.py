"""TargetTrainer: one training run of a target network on one device. No Ray in here.

This is the only training code in the project: the QAN environment, the Ray actors, the Tune
trainables, the baselines and the benchmarks all call it, so a comparison between a controller and
a baseline differs only in who sets the hyperparameter.

Invariants:
- data, model, optimizer and batch order live on one device; a mini-batch is an index slice of an
  on-device permutation (or, in minibatch mode, a class-composed index vector built on the device);
- nothing is read back to the host inside `train(k)`: losses accumulate on the device and are read
  once at the end (the control point);
- `set_lr` writes the optimizer's param groups, so the very next mini-batch uses the new LR (the
  original QAN's MNIST bug was an LR that never reached the optimizer);
- optimizer state (momentum buffers) persists across actions and is part of `state_dict()`.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import math
from collections import deque

import torch
from torch.nn import functional as F

from qan_ray.config import QANConfig
from qan_ray.data import NUM_CLASSES, DeviceData, augment_batch, load_data, resolve_device
from qan_ray.features import monitored_modules
from qan_ray.models import build_model

EVAL_BATCH = 1024


class TargetTrainer:
    """Owns model, optimizer and data of one training run on one device."""

    def __init__(self, cfg: QANConfig, data: DeviceData | None = None,
                 device: torch.device | str | None = None):
        self.cfg = cfg
        self.device = torch.device(device) if device is not None else resolve_device(cfg.device)
        self.data = data if data is not None else load_data(cfg, self.device)
        self.batch_size = min(cfg.batch_size, self.data.n_train)
        self.batches_per_epoch = max(1, self.data.n_train // self.batch_size)
        self.total_batches = max(1, round(cfg.epochs_per_episode * self.batches_per_epoch))
        self.use_amp = cfg.amp and self.device.type == "cuda"
        images = len(self.data.input_shape) == 3  # (C, H, W); a user task may give any shape
        if cfg.augment and not images:
            raise ValueError(f"`augment` is True but the inputs of task {cfg.task!r} have shape "
                             f"{self.data.input_shape} per sample; flip + crop needs (C, H, W) "
                             "images. Pass --no-augment, or give image tensors.")
        self._channels_last = self.device.type == "cuda" and cfg.model != "mlp" and images
        self._reference: list[list[torch.Tensor]] | None = None
        self.reset(cfg.seed)

    # --- episode lifecycle -------------------------------------------------------------------
    def reset(self, seed: int) -> None:
        """Fresh init (seeded), fresh optimizer, fresh batch order: the start of an episode."""
        cfg = self.cfg
        self.seed = int(seed)
        torch.manual_seed(self.seed)
        model = build_model(cfg, self.data.input_shape, NUM_CLASSES).to(self.device)
        if self._channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self.optimizer = _make_optimizer(cfg, model.parameters())
        self.gen = torch.Generator(device=self.device)
        self.gen.manual_seed(self.seed)
        self.step = 0
        self._perm: torch.Tensor | None = None
        self._pos = 0
        # Minibatch mode: FIFO "roulette" of the last 10 class actions, oldest first.
        self.roulette: deque[int] = deque(range(NUM_CLASSES), maxlen=NUM_CLASSES)
        self._batch_classes = self._compose_classes()
        self._mm_params = [m.weight for _, m in monitored_modules(model, cfg.monitored_layers)]
        self.initial_loss = self.probe_loss()

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def set_lr(self, lr: float) -> float:
        """Clamp to [lr_min, lr_max] and write every param group now. Returns the LR set."""
        from qan_ray.contract import write_lr

        return write_lr(self.optimizer, min(max(lr, self.cfg.lr_min), self.cfg.lr_max))

    def set_focus_class(self, cls: int) -> None:
        """Minibatch action: `cls` becomes the newest roulette entry and gets the focus share."""
        if not 0 <= int(cls) < NUM_CLASSES:
            raise ValueError(f"class action {cls!r} is outside 0..{NUM_CLASSES - 1}.")
        self.roulette.append(int(cls))
        self._batch_classes = self._compose_classes()

    def batch_composition(self) -> list[int]:
        """Samples per class (length 10) in each batch under the current roulette."""
        counts = torch.bincount(self._batch_classes.cpu(), minlength=NUM_CLASSES)
        return counts.tolist()

    def _compose_classes(self) -> torch.Tensor:
        """The class of every sample slot of a batch: the newest roulette entry gets
        round(focus_share * B) slots, the 9 older ones share the rest evenly (the remainder goes to
        the newest). Paper: 20 + 9 x 12 = 128."""
        b = self.batch_size
        older = list(self.roulette)[:-1]
        per_old = (b - round(self.cfg.focus_share * b)) // len(older)
        focus = b - per_old * len(older)
        classes = [self.roulette[-1]] * focus + [c for c in older for _ in range(per_old)]
        return torch.tensor(classes, dtype=torch.long, device=self.device)

    # --- meta-momentum -----------------------------------------------------------------------
    def set_reference(self, snapshots: list[list[torch.Tensor]] | None) -> None:
        """W* for meta-momentum: one snapshot (final weights) or one per control step
        (trajectory), each a list of tensors matching the monitored weights."""
        if snapshots is not None:
            shapes = [tuple(p.shape) for p in self._mm_params]
            for snap in snapshots:
                if [tuple(t.shape) for t in snap] != shapes:
                    raise ValueError("meta-momentum reference weights do not match the monitored "
                                     f"layers' shapes {shapes}; build the reference with the same "
                                     "task/model config.")
            snapshots = [[t.to(self.device) for t in snap] for snap in snapshots]
        self._reference = snapshots

    def _mm_target(self) -> list[torch.Tensor] | None:
        cfg = self.cfg
        if cfg.mm_coef <= 0 or not self._reference:
            return None
        if self.step >= cfg.mm_active_fraction * self.total_batches:
            return None
        i = min(self.step // cfg.control_interval, len(self._reference) - 1)
        return self._reference[i if cfg.mm_reference == "trajectory" else -1]

    # --- training ----------------------------------------------------------------------------
    def _next_indices(self) -> torch.Tensor:
        b = self.batch_size
        if self.cfg.action_mode == "minibatch":
            cls = self._batch_classes
            u = torch.rand(b, device=self.device, generator=self.gen)
            pos = (u * self.data.class_count[cls]).long()
            return self.data.class_index[cls, pos]
        if self._perm is None or self._pos + b > self.data.n_train:
            self._perm = torch.randperm(self.data.n_train, device=self.device, generator=self.gen)
            self._pos = 0
        idx = self._perm[self._pos:self._pos + b]
        self._pos += b
        return idx

    def train(self, num_batches: int) -> float:
        """Train `num_batches` mini-batches at the current hyperparameters; return their mean
        loss (the one host read of this call). NaN/inf is returned, never raised."""
        model, opt, data = self.model, self.optimizer, self.data
        augment, channels_last = self.cfg.augment, self._channels_last
        autocast = self._autocast
        use_mm = self.cfg.mm_coef > 0 and bool(self._reference)
        model.train()
        loss_sum = torch.zeros((), device=self.device)
        for _ in range(num_batches):
            idx = self._next_indices()
            x, y = data.x_train[idx], data.y_train[idx]
            if augment:
                x = augment_batch(x, self.gen)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast():
                loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if use_mm:
                target = self._mm_target()
                if target is not None:
                    with torch.no_grad():
                        torch._foreach_lerp_(self._mm_params, target, self.cfg.mm_coef)
            loss_sum += loss.detach()
            self.step += 1
        return float(loss_sum) / max(1, num_batches)

    def _autocast(self):
        """bf16 autocast on CUDA; no context at all on the CPU (it costs per step there)."""
        if self.use_amp:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @torch.no_grad()
    def _loss_acc(self, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
        self.model.eval()
        loss = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device, dtype=torch.long)
        for i in range(0, len(y), EVAL_BATCH):
            xb, yb = x[i:i + EVAL_BATCH], y[i:i + EVAL_BATCH]
            if self._channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            with self._autocast():
                out = self.model(xb)
            loss += F.cross_entropy(out.float(), yb, reduction="sum")
            correct += (out.argmax(1) == yb).sum()
        n = max(1, len(y))
        return float(loss) / n, float(correct) / n

    def evaluate(self, split: str = "val") -> tuple[float, float]:
        """(mean loss, accuracy) on 'val' (first val_max_samples) or 'test'."""
        d = self.data
        if split == "val":
            n = self.cfg.val_max_samples
            return self._loss_acc(d.x_val[:n], d.y_val[:n])
        if split == "test":
            return self._loss_acc(d.x_test, d.y_test)
        raise ValueError(f"split {split!r} must be 'val' or 'test'.")

    def probe_loss(self) -> float:
        """Loss of the current model on the first 1,024 training samples (L_0 at reset)."""
        n = min(1024, self.data.n_train)
        return self._loss_acc(self.data.x_train[:n], self.data.y_train[:n])[0]

    def diverged(self, loss: float) -> bool:
        return not math.isfinite(loss) or loss > self.cfg.divergence_factor * self.initial_loss

    @property
    def progress(self) -> float:
        return min(1.0, self.step / self.total_batches)

    @property
    def done(self) -> bool:
        return self.step >= self.total_batches

    # --- checkpointing -----------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything needed to resume bit-identically: model, optimizer (momentum buffers),
        batch RNG and permutation, step, roulette, initial loss. A deep copy (a snapshot)."""
        return copy.deepcopy({
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "gen": self.gen.get_state(),
            "torch_rng": torch.get_rng_state(),
            "perm": self._perm,
            "pos": self._pos,
            "step": self.step,
            "seed": self.seed,
            "roulette": list(self.roulette),
            "initial_loss": self.initial_loss,
        })

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.gen.set_state(state["gen"])
        torch.set_rng_state(state["torch_rng"])
        self._perm = None if state["perm"] is None else state["perm"].to(self.device)
        self._pos = int(state["pos"])
        self.step = int(state["step"])
        self.seed = int(state["seed"])
        self.roulette = deque(state["roulette"], maxlen=NUM_CLASSES)
        self._batch_classes = self._compose_classes()
        self.initial_loss = float(state["initial_loss"])


def _make_optimizer(cfg: QANConfig, params) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                               weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ValueError(f"`optimizer` is {cfg.optimizer!r}; it must be sgd or adam.")


def reference_run(cfg: QANConfig, device: torch.device | str | None = None
                  ) -> list[list[torch.Tensor]]:
    """W* for meta-momentum: train one reference run (fixed LR cfg.lr, seed cfg.seed + 10,000,
    meta-momentum off) and keep the monitored weights at every control point plus the end.
    The same W* serves every episode (cached per process)."""
    key = json.dumps({**cfg.to_dict(), "mm_coef": 0.0}, sort_keys=True, default=list)
    return _reference_run(key, str(device) if device is not None else None)


@functools.lru_cache(maxsize=4)
def _reference_run(cfg_json: str, device: str | None) -> list[list[torch.Tensor]]:
    from qan_ray.config import from_dict

    cfg = from_dict(json.loads(cfg_json))
    ref = TargetTrainer(cfg.replace(seed=cfg.seed + 10_000), device=device)

    def snap() -> list[torch.Tensor]:
        return [p.detach().clone() for p in ref._mm_params]

    snaps = [snap()]
    while not ref.done:
        ref.train(min(cfg.control_interval, ref.total_batches - ref.step))
        snaps.append(snap())
    return snaps

