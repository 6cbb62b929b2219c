"""PopulationTrainer: K target networks trained in lockstep on one device, as one computation.

Each member is one training run of the task's model, as `TargetTrainer` runs it: its own init
seed, batch order (an on-device permutation from its own generator), learning rate, optimizer
state and divergence flag. Per mini-batch the whole population costs a fixed number of ops:

- the K parameter sets live in one flat (K, P) buffer (`theta`); the model's parameters are
  views of a row, so `member_model(i)` is a plain nn.Module sharing that row's storage;
- the batch is one (K, B) index tensor gathered from the K permutations, and the inputs one
  advanced-indexing gather (K, B, ...);
- loss and gradients come from `torch.func.vmap(grad_and_value(...))` over
  `torch.func.functional_call`, with the row split into the parameters inside the function, so
  the gradient arrives as one (K, P) tensor;
- the optimizer (qan_ray.popoptim) updates the flat buffer with a per-member LR in a handful of
  ops, whatever the layer count;
- losses accumulate on the device and are read once per `train(k)` call;
- meta-momentum (mm_coef > 0, `set_reference`) pulls each member's monitored weights toward
  W* by its own step: one lerp per monitored layer while the members are in step.

This is the project's one training loop. `qan_ray.trainer.TargetTrainer` is its K = 1 view
(scalars instead of (K,) arrays), and that is what the QAN environment, the Tune trainables and
the adaptive baselines use; the population vector env, `qan evaluate`'s baseline grid and the
benchmarks use K > 1. At K = 1 the gradient comes from a plain forward/backward of member 0's
module (its parameters are views of row 0, its gradients views of one flat (1, P) buffer, so
the optimizer still sees one flat tensor): vmap/functional_call wrapping would cost 2-3x a small
network's step there. Models with buffers (BatchNorm's running statistics) train at any K: the
buffers are stacked (K, *shape) like the weights (`stacked_buffers`), each member module's
buffers are views of its row, and functional_call gets them batched, so each member's running
statistics follow its own batches (train mode) and serve its evaluation (eval mode). Member i
of a population and a K = 1 run of seed i give the same numbers to float tolerance
(tests/test_population.py).

Minibatch mode: each member's batches are composed by its class shares
(qan_ray.class_sampling.ClassSampler: bounded actions that never starve a class, the classic
baselines' exact shares, class-stratified draws on the device from each member's generator);
`evaluate_classes` gives the per-class validation loss and accuracy the actions and the
observation read.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad_and_value, vmap

from qan_ray import features as fe
from qan_ray import popconv
from qan_ray.class_sampling import ClassSampler
from qan_ray.config import LR_FREE_OPTIMIZERS, QANConfig
from qan_ray.constants import NUM_CLASSES, run_seed
from qan_ray.data import DeviceData, augment_batch, load_data, resolve_device
from qan_ray.lrfree import for_population as lr_free_optimizer
from qan_ray.models import build_model
from qan_ray.popoptim import PopulationOptimizer
from qan_ray.rewards import diverged

EVAL_BATCH = 1024


def cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample cross-entropy over the last dim: F.cross_entropy(reduction='none')'s value
    (to float rounding) from elementwise ops and reductions. On the CPU, log_softmax over a
    10-wide last dim is the slowest op of a small MLP's step (about 10x an exp of the same size);
    this costs a fraction of it, forward and backward."""
    z = logits - logits.detach().amax(dim=-1, keepdim=True)
    return z.exp().sum(dim=-1).log() - z.gather(-1, target.unsqueeze(-1)).squeeze(-1)


def _weight(module_name: str) -> str:
    """The parameter name of a module's weight ("weight" for a bare top-level layer)."""
    return f"{module_name}.weight" if module_name else "weight"


class PopulationTrainer:
    """K members of one task config trained in lockstep (K = len(seeds))."""

    def __init__(self, cfg: QANConfig, k: int | None = None, seeds: Sequence[int] | None = None,
                 data: DeviceData | None = None, device: torch.device | str | None = None,
                 compile: bool = False, conv: str = "auto"):
        """compile: wrap the vmapped loss-and-gradient in torch.compile (inductor), K > 1 only.
        Measured on a busy 2-core CPU at K = 32 (benchmarks/population_speed.py --compile):
        about 2x per mini-batch on digits-mlp and on mnist1d-cnn (with matmul convolutions),
        after a first call that compiles (about a minute cold, seconds from inductor's cache);
        off by default.
        conv: how K > 1 computes the model's convolutions: "matmul" (im2col + one batched
        matrix product per layer, qan_ray.popconv), "native" (torch's kernel, which vmap turns
        into one grouped convolution), or "auto" (on the CPU the strided 1-D convolutions as
        matmuls, where they measured 1.2-1.6x the grouped convolution's speed on mnist1d-cnn
        at K = 32, the others native; native off the CPU)."""
        if seeds is None:
            if k is None:
                k = 1
            seeds = [run_seed(cfg.seed, i) for i in range(int(k))]
        seeds = [int(s) for s in seeds]
        if k is not None and int(k) != len(seeds):
            raise ValueError(f"population size k={k} but {len(seeds)} seeds were given; pass "
                             "one seed per member (or only k).")
        if not seeds:
            raise ValueError("a population needs k >= 1 members; got 0 seeds.")
        self._cfg = cfg
        self.k = len(seeds)
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
        # K = 1 on CUDA: channels_last inputs for conv models (the weights stay views of the
        # flat buffer, so they keep the default layout).
        self._channels_last = self.device.type == "cuda" and cfg.model != "mlp" and images
        self.direct = self.k == 1  # plain forward/backward of member 0 (module docstring)

        models = [self._fresh_model(s) for s in seeds]
        template = models[0]
        self._names = [n for n, _ in template.named_parameters()]
        self._shapes = [tuple(p.shape) for _, p in template.named_parameters()]
        self._sizes = [math.prod(s) for s in self._shapes]
        self._offsets = np.cumsum([0, *self._sizes]).tolist()
        self.num_params = self._offsets[-1]
        dtype = next(template.parameters()).dtype
        self.theta = torch.empty(self.k, self.num_params, device=self.device, dtype=dtype)
        self._template = copy.deepcopy(template)
        if conv not in ("auto", "matmul", "native"):
            raise ValueError(f"conv is {conv!r}; it must be 'auto', 'matmul' or 'native'.")
        if conv == "auto" and self.device.type != "cpu":
            conv = "native"
        self.conv = "native" if self.direct else conv  # K = 1 runs the member module itself
        if self.conv != "native":  # member modules keep torch's kernel
            popconv.use_matmul_convs(self._template, strided_1d_only=self.conv == "auto")
        if not self.direct:  # vmap runs eval-mode batch_norm member by member
            popconv.use_affine_batchnorm_eval(self._template)
        # Buffers (BatchNorm's running statistics, its batch counter): one (K, *shape) tensor
        # each; a member module's buffers are views of its row, and the vmapped forward passes
        # them batched to functional_call, where each member updates its own row in place.
        self.stacked_buffers: dict[str, torch.Tensor] = {
            n: torch.stack([dict(m.named_buffers())[n].detach() for m in models])
            for n, _ in template.named_buffers()}
        self._models: list[nn.Module] = models
        for i, m in enumerate(models):
            self._bind(i, m)
        if self.direct:  # member 0's gradients accumulate into views of one flat buffer
            self._grad_flat = torch.zeros_like(self.theta)
            views = self._views(self._grad_flat[0])
            for name, p in template.named_parameters():
                p.grad = views[name]
        if cfg.optimizer in LR_FREE_OPTIMIZERS:  # a torch.optim optimizer of member 0 (K = 1)
            self.optimizer = lr_free_optimizer(cfg, self.k, models[0], self.total_batches)
        else:
            self.optimizer = PopulationOptimizer(
                [self.theta], cfg.optimizer, cfg.lr, momentum=cfg.momentum,
                nesterov=cfg.nesterov, weight_decay=cfg.weight_decay)
        self._lr_host = np.full(self.k, float(cfg.lr))
        self._frozen = np.zeros(self.k, dtype=bool)
        if not self.direct:
            self._grad_fn = vmap(grad_and_value(self._loss), randomness="different")
            if compile:
                self._grad_fn = torch.compile(self._grad_fn)
            self._forward = vmap(self._logits, in_dims=(0, 0, None), randomness="different")
        self.gens = [torch.Generator(device=self.device) for _ in range(self.k)]
        n = self.data.n_train
        minibatch = cfg.action_mode == "minibatch"
        self._perm = None if minibatch else torch.zeros(self.k, n, dtype=torch.long,
                                                        device=self.device)
        self._pos = np.full(self.k, n)  # n: a fresh permutation before the first batch
        self._arange_b = torch.arange(self.batch_size, device=self.device)
        self._rows = torch.arange(self.k, device=self.device)[:, None]
        # Minibatch mode: per member class shares and class-stratified batches.
        self.sampler = ClassSampler(self.data.class_index, self.data.class_count, self.k,
                                    self.batch_size, self.gens, cfg.class_floor, cfg.class_step,
                                    self.batches_per_epoch) if minibatch else None
        self.steps = np.zeros(self.k, dtype=np.int64)
        self.seeds = list(seeds)
        self.initial_loss = np.zeros(self.k)
        self._saved: list[tuple | None] = [None] * self.k  # snapshot(): last good states
        stacked = self.stacked_params
        self._mm_names = [n for n, _ in fe.monitored_modules(self._template,
                                                             tuple(cfg.monitored_layers))]
        self._mm_params = [stacked[_weight(n)] for n in self._mm_names]  # (K, ...) views
        self._reference: list[torch.Tensor] | None = None  # per layer (R, ...) snapshots
        for i, s in enumerate(seeds):
            self._start_member(i, s)

    @property
    def cfg(self) -> QANConfig:
        return self._cfg

    @cfg.setter
    def cfg(self, cfg: QANConfig) -> None:
        """A new config for the next resets (a task-distribution env reuses a trainer for a
        task that differs only in LR and seed); the optimizer follows its hyperparameters."""
        self._cfg = cfg
        self.optimizer.set_hyperparams(momentum=cfg.momentum, nesterov=cfg.nesterov,
                                       weight_decay=cfg.weight_decay)

    # --- members ---------------------------------------------------------------------------
    def _fresh_model(self, seed: int) -> nn.Module:
        torch.manual_seed(int(seed))  # a member's init is a function of its seed alone
        return build_model(self.cfg, self.data.input_shape, NUM_CLASSES).to(self.device)

    def _views(self, row: torch.Tensor) -> dict[str, torch.Tensor]:
        parts = torch.split(row, self._sizes)
        return {n: t.view(s) for n, t, s in zip(self._names, parts, self._shapes)}

    def _bind(self, i: int, model: nn.Module) -> None:
        """Copy `model`'s parameters into row i and make them views of it."""
        views = self._views(self.theta[i])
        with torch.no_grad():
            for name, p in model.named_parameters():
                views[name].copy_(p)
                p.data = views[name]
        for name, stacked in self.stacked_buffers.items():  # its buffers: views of row i
            owner, _, attr = name.rpartition(".")
            model.get_submodule(owner)._buffers[attr] = stacked[i]

    def _start_member(self, i: int, seed: int) -> None:
        self.seeds[i] = int(seed)
        self.gens[i].manual_seed(int(seed))
        self._pos[i] = self.data.n_train
        self.steps[i] = 0
        self.optimizer.reset_member(i)
        if self.sampler is not None:
            self.sampler.reset_member(i)
        self.initial_loss[i] = self._probe_member(i)
        self.snapshot([i])  # the fallback of a rescue before any good state

    def reset(self, seeds: Sequence[int] | None = None) -> None:
        """Every member from a fresh init (seeds: one per member; default cfg.seed + i)."""
        seeds = (list(seeds) if seeds is not None
                 else [run_seed(self.cfg.seed, i) for i in range(self.k)])
        if len(seeds) != self.k:
            raise ValueError(f"reset got {len(seeds)} seeds for a population of {self.k}.")
        for i, s in enumerate(seeds):
            self.reset_member(i, s)

    def reset_member(self, i: int, seed: int) -> None:
        """Member i alone from a fresh init, optimizer state, batch order and the config's LR;
        the other members are untouched."""
        if not 0 <= int(i) < self.k:
            raise ValueError(f"member {i} is outside 0..{self.k - 1}.")
        fresh = self._fresh_model(seed)
        with torch.no_grad():
            self.theta[i].copy_(torch.cat([p.reshape(-1) for p in fresh.parameters()]))
            for b, fb in zip(self._models[i].buffers(), fresh.buffers()):  # K = 1: BatchNorm
                b.copy_(fb)
        lr = self._lr_host.copy()
        lr[i] = self.cfg.lr
        self._frozen[i] = False
        self._write_lr(lr)
        self._start_member(i, seed)

    def member_model(self, i: int) -> nn.Module:
        """Member i as an nn.Module whose parameters are views of its row (no copy)."""
        return self._models[i]

    def monitored_weights(self, i: int) -> list[torch.Tensor]:
        """Member i's monitored weights (views), in monitored order."""
        return [p[i] for p in self._mm_params]

    def weight_features(self, names: tuple[str, ...] | None = None) -> torch.Tensor:
        """(K, WEIGHT_FEATURES): `features.weight_features(member_model(i), names)` of every
        member in one batched computation (no per-member loop)."""
        names = tuple(self.cfg.monitored_layers) if names is None else tuple(names)
        modules = fe.monitored_modules(self._template, names)
        stacked = self.stacked_params
        return fe.pooled_weight_features([stacked[_weight(n)] for n, _ in modules],
                                         type(self._template).__name__)

    @property
    def stacked_params(self) -> dict[str, torch.Tensor]:
        """Every parameter as a (K, *shape) view of the flat buffer."""
        return {n: self.theta[:, a:b].view(self.k, *s) for n, s, a, b in
                zip(self._names, self._shapes, self._offsets, self._offsets[1:])}

    # --- hyperparameters -------------------------------------------------------------------
    @property
    def lr(self) -> list[float]:
        return self._lr_host.tolist()

    def set_lr(self, lr: Sequence[float] | torch.Tensor | float) -> list[float]:
        """Clamp each member's LR to [lr_min, lr_max] and write it now (a scalar sets all), so
        the very next mini-batch uses it. Returns the LRs set."""
        values = np.asarray(torch.as_tensor(lr, dtype=torch.float64).cpu(), dtype=np.float64)
        values = np.broadcast_to(values, (self.k,)) if values.ndim == 0 else values
        if values.shape != (self.k,):
            raise ValueError(f"set_lr got {values.shape[0]} LRs for a population of {self.k}; "
                             "pass one per member or one scalar.")
        self._write_lr(np.clip(values, self.cfg.lr_min, self.cfg.lr_max))
        return self.lr

    def _write_lr(self, values: np.ndarray) -> None:
        self._lr_host = np.array(values, dtype=np.float64)
        self.optimizer.set_lr(torch.from_numpy(np.where(self._frozen, 0.0, self._lr_host)))

    def snapshot(self, members: Sequence[int]) -> None:
        """Keep the members' current weights, buffers and optimizer state in memory,
        on the device: the state `rollback` returns to (the rescue guard's last good state).
        Steps, batch order and LR are not part of it: time moves on."""
        with torch.no_grad():
            for i in members:
                i = int(i)
                buffers = [b.clone() for b in self._models[i].buffers()]
                self._saved[i] = (self.theta[i].clone(), self.optimizer.member_state(i), buffers)

    def rollback(self, members: Sequence[int]) -> None:
        """Put the members' weights and optimizer state back to their last `snapshot` (taken at
        every reset, so a member always has one)."""
        with torch.no_grad():
            for i in members:
                theta, state, buffers = self._saved[int(i)]
                self.theta[int(i)].copy_(theta)
                self.optimizer.load_member_state(int(i), state)
                for b, saved in zip(self._models[int(i)].buffers(), buffers):
                    b.copy_(saved)

    def freeze(self, i: int) -> None:
        """Member i stops moving (its update uses LR 0) until `reset_member(i)`: a finished or
        diverged member keeps its final weights while the others train on."""
        self._frozen[i] = True
        self._write_lr(self._lr_host)

    def _sampler(self) -> ClassSampler:
        if self.sampler is None:
            raise ValueError(f"class selection needs action_mode 'minibatch', but task "
                             f"{self.cfg.task!r} runs in action_mode {self.cfg.action_mode!r}. "
                             "Pass --action-mode minibatch.")
        return self.sampler

    def class_action(self, i: int, action: int) -> list[float]:
        """Minibatch action of member i (class_sampling.CLASS_ACTIONS: keep, or a bounded step
        of its class shares toward uniform, balanced, loss-proportional or the hardest class,
        by the per-class val losses of its last `evaluate_classes`), effective at the next
        mini-batch. Returns the new shares."""
        return self._sampler().act(int(i), action).tolist()

    def set_class_shares(self, i: int, shares: Sequence[float]) -> list[float]:
        """Member i's class shares set exactly (a sampling baseline), effective at once."""
        return self._sampler().set_shares(int(i), shares).tolist()

    def class_shares(self, i: int) -> list[float]:
        """Member i's class shares: the probability of each class per sample slot."""
        return self._sampler().shares[int(i)].tolist()

    @property
    def data_shares(self) -> list[float]:
        """The training split's class frequencies (the shares of uniform batches)."""
        counts = self.data.class_count.double()
        return (counts / counts.sum()).tolist()

    def batch_composition(self, i: int) -> list[float]:
        """Expected samples per class (length 10) in each of member i's batches."""
        return self._sampler().composition(int(i))

    @torch.no_grad()
    def evaluate_classes(self, split: str = "val") -> dict[str, torch.Tensor]:
        """Per-class evaluation of every member in one batched pass: "loss" and "accuracy" (K,)
        as `evaluate` gives them, "class_loss" and "class_accuracy" (K, 10) (NaN for a class
        without samples in the split) and "balanced_accuracy" (K,) (their mean over the classes
        present). In minibatch mode the val losses per class feed the class actions."""
        d = self.data
        if split == "val":
            n = self.cfg.val_max_samples
            x, y = d.x_val[:n], d.y_val[:n]
        elif split == "test":
            x, y = d.x_test, d.y_test
        else:
            raise ValueError(f"split {split!r} must be 'val' or 'test'.")
        evaluating = getattr(self.optimizer, "evaluating", contextlib.nullcontext)
        with evaluating():
            return self._class_loss_acc(x, y, split)

    def _class_loss_acc(self, x: torch.Tensor, y: torch.Tensor,
                        split: str) -> dict[str, torch.Tensor]:
        c = NUM_CLASSES
        buffers = dict(self.stacked_buffers)
        loss = torch.zeros(self.k, c, device=self.device, dtype=torch.float64)
        correct = torch.zeros(self.k, c, device=self.device, dtype=torch.float64)
        model = self._models[0] if self.direct else self._template
        model.eval()
        for s in range(0, len(y), EVAL_BATCH):
            xb, yb = x[s:s + EVAL_BATCH], y[s:s + EVAL_BATCH]
            with self._autocast():
                if self.direct:
                    if self._channels_last:
                        xb = xb.contiguous(memory_format=torch.channels_last)
                    out = model(xb)[None]
                else:
                    out = self._forward(self.theta, buffers, xb)
            out = out.float()
            per = cross_entropy(out, yb.expand(out.shape[0], -1)).double()
            hit = (out.argmax(2) == yb).double()
            cols = yb.expand(out.shape[0], -1)
            loss.scatter_add_(1, cols, per)
            correct.scatter_add_(1, cols, hit)
        n_c = torch.bincount(y, minlength=c).double().to(self.device)
        both = torch.stack([loss.sum(1) / max(1, len(y)), correct.sum(1) / max(1, len(y))])
        cls = torch.stack([loss / n_c, correct / n_c])  # NaN where a class is absent
        out_host = torch.cat([both.reshape(-1), cls.reshape(-1)]).cpu()  # one host read
        both_h, cls_h = out_host[:2 * self.k].view(2, self.k), out_host[2 * self.k:].view(
            2, self.k, c)
        present = n_c.cpu() > 0
        result = {"loss": both_h[0], "accuracy": both_h[1], "class_loss": cls_h[0],
                  "class_accuracy": cls_h[1],
                  "balanced_accuracy": cls_h[1][:, present].mean(dim=1)}
        if split == "val" and self.sampler is not None:
            for i in range(self.k):
                self.sampler.class_loss[i] = cls_h[0][i].numpy().copy()
        return result

    # --- meta-momentum -----------------------------------------------------------------------
    def set_reference(self, snapshots: list[list[torch.Tensor]] | None) -> None:
        """W* for meta-momentum: one snapshot of the monitored weights (final) or one per
        control step (trajectory), each a list of tensors shaped like one member's monitored
        weights; the same reference serves every member."""
        if snapshots is None:
            self._reference = None
            return
        shapes = [tuple(p.shape[1:]) for p in self._mm_params]
        for snap in snapshots:
            if [tuple(t.shape) for t in snap] != shapes:
                raise ValueError("meta-momentum reference weights do not match the monitored "
                                 f"layers' shapes {shapes}; build the reference with the same "
                                 "task/model config.")
        self._reference = [torch.stack([snap[j] for snap in snapshots]).to(self.device)
                           for j in range(len(shapes))] if snapshots else None

    def _meta_momentum(self) -> None:
        """Pull each member's monitored weights toward W* (the paper's rule
        W <- W + c (W* - W), one fused lerp per layer): the member's step picks the snapshot and
        whether the pull is still active (the first mm_active_fraction of the episode)."""
        cfg, ref = self.cfg, self._reference
        count = ref[0].shape[0]
        active = (self.steps < cfg.mm_active_fraction * self.total_batches) & ~self._frozen
        if not active.any():
            return
        if cfg.mm_reference == "trajectory":
            idx = np.minimum(self.steps // cfg.control_interval, count - 1)
        else:
            idx = np.full(self.k, count - 1)
        with torch.no_grad():
            if active.all() and (idx == idx[0]).all():  # members in step: one target
                torch._foreach_lerp_(self._mm_params, [r[int(idx[0])] for r in ref],
                                     cfg.mm_coef)
                return
            rows = torch.from_numpy(idx).to(self.device)
            coef = torch.from_numpy(np.where(active, cfg.mm_coef, 0.0)).to(self.device,
                                                                             self.theta.dtype)
            for p, r in zip(self._mm_params, ref):
                p.lerp_(r.index_select(0, rows), coef.view(-1, *([1] * (p.dim() - 1))))

    # --- training ----------------------------------------------------------------------------
    def _logits(self, row: torch.Tensor, buffers: dict[str, torch.Tensor],
                x: torch.Tensor) -> torch.Tensor:
        return functional_call(self._template, (self._views(row), buffers), (x,))

    def _loss(self, row: torch.Tensor, buffers: dict[str, torch.Tensor], x: torch.Tensor,
              y: torch.Tensor) -> torch.Tensor:
        return cross_entropy(self._logits(row, buffers, x).float(), y).mean()

    def _next_indices(self) -> torch.Tensor:
        """(K, B) train indices: the next slice of each member's permutation, or in minibatch
        mode a class-composed draw per member."""
        b, n = self.batch_size, self.data.n_train
        if self.sampler is not None:  # minibatch mode
            return self.sampler.next_indices()
        for i in np.flatnonzero(self._pos + b > n):  # only members starting a new epoch
            self._perm[i] = torch.randperm(n, device=self.device, generator=self.gens[i])
            self._pos[i] = 0
        start = int(self._pos[0])
        self._pos += b
        if (self._pos == self._pos[0]).all():
            return self._perm[:, start:start + b]
        pos = torch.from_numpy(self._pos - b).to(self.device)
        return self._perm[self._rows, pos[:, None] + self._arange_b]

    def _autocast(self):
        """bf16 autocast on CUDA; no context at all on the CPU (it costs per step there)."""
        if self.use_amp:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _direct_step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """K = 1: member 0's plain forward/backward; the gradient lands in the flat buffer.
        Returns the detached scalar loss."""
        if self._channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        self._grad_flat.zero_()
        if self.use_amp:
            with self._autocast():
                loss = cross_entropy(self._models[0](x).float(), y).mean()
        else:
            loss = cross_entropy(self._models[0](x).float(), y).mean()
        loss.backward()
        return loss.detach()

    def _train_direct(self, num_batches: int) -> torch.Tensor:
        """K = 1's `train`: the same ops per mini-batch as the population loop gives member 0
        (hence the same numbers), minus its (K,) bookkeeping: a 1-D slice of the one
        permutation (no (1, B) gather), the position and step as host ints written back once,
        a scalar running loss."""
        data, cfg, b, n = self.data, self.cfg, self.batch_size, self.data.n_train
        use_mm = cfg.mm_coef > 0 and self._reference is not None
        x_all, y_all, augment = data.x_train, data.y_train, cfg.augment
        gen, step, grad = self.gens[0], self.optimizer.step_flat, self._grad_flat
        perm = None if self._perm is None else self._perm[0]  # None: minibatch mode
        pos, start = int(self._pos[0]), int(self.steps[0])
        loss_sum = torch.zeros((), device=self.device)
        self._models[0].train()
        done = 0
        try:
            for done in range(num_batches):
                if perm is None:
                    idx = self._next_indices()[0]
                else:
                    if pos + b > n:
                        perm.copy_(torch.randperm(n, device=self.device, generator=gen))
                        pos = 0
                    idx = perm[pos:pos + b]
                    pos += b
                x, y = x_all[idx], y_all[idx]
                if augment:
                    x = augment_batch(x, gen)
                loss_sum += self._direct_step(x, y)
                step(grad)
                if use_mm:
                    self.steps[0] = start + done
                    self._meta_momentum()
            done = num_batches
        finally:
            self._pos[0] = pos
            self.steps[0] = start + done
        return (loss_sum / max(1, num_batches)).reshape(1).cpu()

    def train(self, num_batches: int) -> torch.Tensor:
        """Train every member `num_batches` mini-batches at its current LR; return the (K,)
        mean losses (one host read). NaN/inf is returned, never raised."""
        if self.direct:
            return self._train_direct(num_batches)
        data, cfg = self.data, self.cfg
        loss_sum = torch.zeros(self.k, device=self.device)
        use_mm = cfg.mm_coef > 0 and self._reference is not None
        self._template.train()
        for _ in range(num_batches):
            idx = self._next_indices()
            x, y = data.x_train[idx], data.y_train[idx]
            if cfg.augment:
                shape = x.shape
                x = augment_batch(x.reshape(-1, *shape[2:]), self.gens[0]).reshape(shape)
            with self._autocast():
                grads, loss = self._grad_fn(self.theta, self.stacked_buffers, x, y)
            self.optimizer.step([grads])
            if use_mm:
                self._meta_momentum()
            loss_sum += loss.detach()
            self.steps += 1
        return (loss_sum / max(1, num_batches)).cpu()

    def diverged(self, losses: torch.Tensor | Sequence[float]) -> np.ndarray:
        """(K,) bool, the one divergence rule: NaN/inf or > divergence_factor x L_0."""
        losses = np.asarray(torch.as_tensor(losses, dtype=torch.float64))
        return diverged(losses, self.initial_loss, self.cfg.divergence_factor)

    # --- evaluation --------------------------------------------------------------------------
    @torch.no_grad()
    def _loss_acc(self, x: torch.Tensor, y: torch.Tensor,
                  members: slice = slice(None)) -> tuple[torch.Tensor, torch.Tensor]:
        theta = self.theta[members]
        buffers = {n: b[members] for n, b in self.stacked_buffers.items()}
        loss = torch.zeros(theta.shape[0], device=self.device)
        correct = torch.zeros(theta.shape[0], device=self.device, dtype=torch.long)
        model = self._models[0] if self.direct else self._template
        model.eval()
        for i in range(0, len(y), EVAL_BATCH):
            xb, yb = x[i:i + EVAL_BATCH], y[i:i + EVAL_BATCH]
            with self._autocast():
                if self.direct:
                    if self._channels_last:
                        xb = xb.contiguous(memory_format=torch.channels_last)
                    out = model(xb)[None]
                else:
                    out = self._forward(theta, buffers, xb)
            out = out.float()  # (K, n, C)
            loss += cross_entropy(out, yb.expand(out.shape[0], -1)).sum(dim=1)
            correct += (out.argmax(2) == yb).sum(dim=1)
        n = max(1, len(y))
        both = torch.stack([loss.double() / n, correct.double() / n]).cpu()  # one host read
        return both[0], both[1]

    def evaluate(self, split: str = "val") -> tuple[torch.Tensor, torch.Tensor]:
        """(K,) mean losses and (K,) accuracies on 'val' (first val_max_samples) or 'test',
        every member in one batched pass. An LR-free Schedule-Free optimizer is evaluated at
        its averaged weights (qan_ray.lrfree.TorchOptimizer.evaluating)."""
        d = self.data
        evaluating = getattr(self.optimizer, "evaluating", contextlib.nullcontext)
        if split == "val":
            n = self.cfg.val_max_samples
            with evaluating():
                return self._loss_acc(d.x_val[:n], d.y_val[:n])
        if split == "test":
            with evaluating():
                return self._loss_acc(d.x_test, d.y_test)
        raise ValueError(f"split {split!r} must be 'val' or 'test'.")

    def _probe_member(self, i: int) -> float:
        """L_0: member i's loss on the first 1,024 training samples."""
        n = min(1024, self.data.n_train)
        losses, _ = self._loss_acc(self.data.x_train[:n], self.data.y_train[:n],
                                   slice(i, i + 1))
        return float(losses[0])

    @property
    def progress(self) -> np.ndarray:
        return np.minimum(1.0, self.steps / self.total_batches)

    @property
    def done(self) -> np.ndarray:
        return self.steps >= self.total_batches

    # --- checkpointing -----------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything needed to resume bit-identically: weights and buffers, optimizer
        state (momentum buffers, Adam moments) and LRs, generators, permutations, positions,
        class shares and orders, steps, seeds, initial losses, torch's global RNG (dropout). A
        copy made of tensors and plain Python values only, so `torch.load(weights_only=True)`
        reads it."""
        def arr(a: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.array(a, copy=True))

        return {"theta": self.theta.clone(), "optimizer": self.optimizer.state_dict(),
                "buffers": [{n: b.clone() for n, b in m.named_buffers()} for m in self._models],
                "lr": arr(self._lr_host), "frozen": arr(self._frozen),
                "gens": [g.get_state() for g in self.gens], "torch_rng": torch.get_rng_state(),
                "perm": None if self._perm is None else self._perm.clone(),
                "pos": arr(self._pos), "steps": arr(self.steps),
                "class_sampler": None if self.sampler is None else self.sampler.state_dict(),
                "seeds": list(self.seeds), "initial_loss": arr(self.initial_loss)}

    def load_state_dict(self, state: dict) -> None:
        if tuple(state["theta"].shape) != tuple(self.theta.shape):
            raise ValueError(f"the state holds weights of shape {tuple(state['theta'].shape)} "
                             f"but this population has {tuple(self.theta.shape)}; load it into "
                             "a PopulationTrainer of the same config and size.")
        with torch.no_grad():
            self.theta.copy_(state["theta"])
            for m, bufs in zip(self._models, state["buffers"], strict=True):
                for n, b in m.named_buffers():
                    b.copy_(bufs[n])
        self.optimizer.load_state_dict(state["optimizer"])
        self._lr_host = np.array(state["lr"], dtype=np.float64)
        self._frozen = np.array(state["frozen"], dtype=bool)
        for g, s in zip(self.gens, state["gens"], strict=True):
            g.set_state(s)
        torch.set_rng_state(state["torch_rng"])
        if self._perm is not None:
            self._perm.copy_(state["perm"])
        self._pos = np.array(state["pos"], dtype=np.int64)
        self.steps = np.array(state["steps"], dtype=np.int64)
        if self.sampler is not None:
            self.sampler.load_state_dict(state["class_sampler"])
        self.seeds = list(state["seeds"])
        self.initial_loss = np.array(state["initial_loss"], dtype=np.float64)
        self.snapshot(range(self.k))  # a rescue returns to the loaded state at worst
