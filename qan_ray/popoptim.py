"""Optimizer updates over stacked parameters: K population members, one LR per member.

torch.optim does not do this. Its functional API (`torch.optim.sgd.sgd`, `torch.optim.adam.adam`,
the `_multi_tensor_*` foreach kernels) takes one LR per call: a float, or a 1-element tensor
(`Adam` raises "Tensor lr must be 1-element"; SGD's foreach path passes it as the scalar `alpha`).
Looping over members with a per-member call would be K x (layers) small ops. Here each update is
a fixed handful of `torch._foreach_*` ops over the stacked tensors (leading dim K), with the LR
broadcast as a (K, 1, ...) view; with the population's parameters in one flat (K, P) buffer
(qan_ray.population) that is a handful of ops per step in total, whatever the layer count.

The arithmetic is torch.optim's, op for op (tests/test_popoptim.py checks member i against a
single-network `torch.optim.SGD` / `Adam` / `AdamW` step with LR i):
- SGD: d = g + wd * p; buf = momentum * buf + d (a fresh buffer is 0, so the first step gives
  buf = d as torch.optim does with dampening 0); update = d + momentum * buf (Nesterov) or buf;
  p -= lr * update.
- Adam (amsgrad off): d = g + wd * p; m = lerp(m, d, 1 - beta1); v = beta2 * v + (1 - beta2) d^2;
  p -= lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps), with a per-member step t
  (a member reset mid-run starts at t = 0) and the bias corrections in float64 (torch.optim
  computes them as Python floats).
- AdamW (decoupled weight decay, Loshchilov & Hutter): p *= 1 - lr * wd first, then Adam's
  update of the plain gradient (no wd * p in it). Its state is Adam's (`kind` is "adam",
  `decoupled` True).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

KINDS = ("sgd", "adam", "adamw")


def lr_views(lr: torch.Tensor, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """`lr` (K,) as a (K, 1, ..., 1) view matching each stacked tensor's rank."""
    return [lr.view(-1, *([1] * (p.dim() - 1))) for p in params]


def sgd_step(params: list[torch.Tensor], grads: list[torch.Tensor],
             bufs: list[torch.Tensor] | None, lr: torch.Tensor, *, momentum: float = 0.0,
             nesterov: bool = False, weight_decay: float = 0.0) -> None:
    """One SGD step of every member, in place. `bufs` (zeros at the start) is needed when
    momentum > 0."""
    if weight_decay != 0:
        grads = torch._foreach_add(grads, params, alpha=weight_decay)
    update = grads
    if momentum != 0:
        if bufs is None:
            raise ValueError("sgd_step: momentum is > 0 but no momentum buffers were given; "
                             "pass zero tensors shaped like the parameters.")
        torch._foreach_mul_(bufs, momentum)
        torch._foreach_add_(bufs, grads)
        update = torch._foreach_add(grads, bufs, alpha=momentum) if nesterov else bufs
    torch._foreach_addcmul_(params, update, lr_views(lr, params), value=-1.0)


def adam_step(params: list[torch.Tensor], grads: list[torch.Tensor],
              exp_avgs: list[torch.Tensor], exp_avg_sqs: list[torch.Tensor],
              step: torch.Tensor, lr: torch.Tensor, *, betas: tuple[float, float] = (0.9, 0.999),
              eps: float = 1e-8, weight_decay: float = 0.0, decoupled: bool = False) -> None:
    """One Adam step of every member, in place. `step` (K,) float64 counts each member's steps
    (incremented here). `decoupled`: AdamW's weight decay (the parameters shrink by
    1 - lr * weight_decay before the update) instead of Adam's L2 term in the gradient."""
    beta1, beta2 = betas
    if weight_decay != 0 and decoupled:
        shrink = (1 - lr.double() * weight_decay).to(params[0].dtype)
        torch._foreach_mul_(params, lr_views(shrink, params))
    elif weight_decay != 0:
        grads = torch._foreach_add(grads, params, alpha=weight_decay)
    step += 1
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
    dtype = params[0].dtype
    step_size = (lr.double() / (1 - beta1 ** step)).to(dtype)
    bc2_sqrt = (1 - beta2 ** step).sqrt().to(dtype)
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, lr_views(bc2_sqrt, params))
    torch._foreach_add_(denom, eps)
    ratio = torch._foreach_div(exp_avgs, denom)
    torch._foreach_addcmul_(params, ratio, lr_views(step_size, params), value=-1.0)


class PopulationOptimizer:
    """SGD, Adam or AdamW over stacked parameters (each tensor's dim 0 is the member) with a
    per-member LR, per-member state, and `reset_member` to restart one member's state alone."""

    def __init__(self, params: Sequence[torch.Tensor], kind: str,
                 lr: torch.Tensor | Sequence[float] | float, *, momentum: float = 0.0,
                 nesterov: bool = False, weight_decay: float = 0.0,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        if kind not in KINDS:
            raise ValueError(f"optimizer {kind!r} is not supported for a population; it must be "
                             f"one of {KINDS}.")
        self.params = list(params)
        if not self.params:
            raise ValueError("PopulationOptimizer needs at least one stacked parameter tensor.")
        self.k = int(self.params[0].shape[0])
        if any(p.shape[0] != self.k for p in self.params):
            raise ValueError("every stacked parameter must have the population size "
                             f"{self.k} as its first dim; got {[tuple(p.shape) for p in params]}.")
        if nesterov and (momentum <= 0):
            raise ValueError("Nesterov momentum requires momentum > 0 (torch.optim's rule); set "
                             "momentum or turn nesterov off.")
        self.name, self.decoupled = kind, kind == "adamw"  # AdamW: Adam, decoupled decay
        kind = "adam" if kind == "adamw" else kind
        self.kind, self.momentum, self.nesterov = kind, float(momentum), bool(nesterov)
        self.weight_decay, self.betas, self.eps = float(weight_decay), tuple(betas), float(eps)
        dev, dtype = self.params[0].device, self.params[0].dtype
        self.lr = torch.zeros(self.k, device=dev, dtype=dtype)
        self._lr_view: torch.Tensor | None = None  # step_flat's view of `lr` (written in place)
        self.set_lr(lr)
        zeros = [torch.zeros_like(p) for p in self.params]
        self.bufs = zeros if kind == "sgd" and self.momentum != 0 else None
        if kind == "adam":
            self.exp_avgs = zeros
            self.exp_avg_sqs = [torch.zeros_like(p) for p in self.params]
            self.steps = torch.zeros(self.k, device=dev, dtype=torch.float64)

    def set_lr(self, lr: torch.Tensor | Sequence[float] | float) -> None:
        """Write every member's LR (in place, so views stay valid); a scalar sets all."""
        lr_t = torch.as_tensor(lr, dtype=self.lr.dtype).to(self.lr.device)
        if lr_t.dim() == 0:
            lr_t = lr_t.expand(self.k)
        if lr_t.shape != (self.k,):
            raise ValueError(f"lr has shape {tuple(lr_t.shape)}; a population of {self.k} "
                             f"needs one LR per member, shape ({self.k},), or one scalar.")
        self.lr.copy_(lr_t)

    def set_hyperparams(self, *, momentum: float | None = None, nesterov: bool | None = None,
                        weight_decay: float | None = None) -> None:
        """Change momentum, Nesterov or weight decay for every member from the next step (PBT
        mutates them). SGD momentum buffers are kept (created at zero when momentum first
        becomes > 0), as torch.optim keeps them when a param group's momentum changes."""
        if momentum is not None:
            self.momentum = float(momentum)
        if nesterov is not None:
            self.nesterov = bool(nesterov)
        if weight_decay is not None:
            self.weight_decay = float(weight_decay)
        if self.nesterov and self.momentum <= 0 and self.kind == "sgd":
            raise ValueError("Nesterov momentum requires momentum > 0 (torch.optim's rule); set "
                             "momentum or turn nesterov off.")
        if self.kind == "sgd" and self.momentum != 0 and self.bufs is None:
            self.bufs = [torch.zeros_like(p) for p in self.params]

    def step_flat(self, grad: torch.Tensor) -> None:
        """`step([grad])` of an optimizer over one tensor (the population's flat (K, P)
        buffer), the K = 1 trainer's per-batch call. SGD runs `sgd_step`'s ops on the tensor
        itself (the ops a one-element foreach list falls back to on the CPU, so the same
        numbers) with the LR view made once: a small network's step is dispatch-bound, and the
        lists and views cost more than the arithmetic there."""
        if self.kind != "sgd" or len(self.params) != 1:
            self.step([grad])
            return
        param = self.params[0]
        if self._lr_view is None:
            self._lr_view = self.lr.view(-1, *([1] * (param.dim() - 1)))
        if self.weight_decay != 0:
            grad = grad.add(param, alpha=self.weight_decay)
        update = grad
        if self.momentum != 0:
            buf = self.bufs[0]  # set_hyperparams makes it when momentum turns > 0
            buf.mul_(self.momentum)
            buf.add_(grad)
            update = grad.add(buf, alpha=self.momentum) if self.nesterov else buf
        param.addcmul_(update, self._lr_view, value=-1.0)

    def step(self, grads: Sequence[torch.Tensor]) -> None:
        grads = list(grads)
        if self.kind == "sgd":
            sgd_step(self.params, grads, self.bufs, self.lr, momentum=self.momentum,
                     nesterov=self.nesterov, weight_decay=self.weight_decay)
        else:
            adam_step(self.params, grads, self.exp_avgs, self.exp_avg_sqs, self.steps, self.lr,
                      betas=self.betas, eps=self.eps, weight_decay=self.weight_decay,
                      decoupled=self.decoupled)

    def _state(self) -> list[torch.Tensor]:
        if self.kind == "adam":
            return [*self.exp_avgs, *self.exp_avg_sqs]
        return list(self.bufs or [])

    def reset_member(self, i: int) -> None:
        """Member i's state as new (zero buffers/moments, step 0); the others are untouched."""
        for t in self._state():
            t[i].zero_()
        if self.kind == "adam":
            self.steps[i] = 0

    def member_state(self, i: int) -> list[torch.Tensor]:
        """Copies of member i's state (momentum buffers, or Adam's moments and step count)."""
        state = [t[i].clone() for t in self._state()]
        if self.kind == "adam":
            state.append(self.steps[i].clone())
        return state

    def load_member_state(self, i: int, state: list[torch.Tensor]) -> None:
        """Member i's state from `member_state`; the others are untouched. A state taken
        before momentum was switched on (no buffers then) restarts the member's buffers."""
        tensors = self._state() + ([self.steps] if self.kind == "adam" else [])
        if len(tensors) != len(state):
            self.reset_member(i)
            return
        for t, saved in zip(tensors, state):
            t[i].copy_(saved)

    def state_dict(self) -> dict:
        state = {"lr": self.lr.clone(), "state": [t.clone() for t in self._state()],
                 "momentum": self.momentum, "nesterov": self.nesterov,
                 "weight_decay": self.weight_decay}
        if self.kind == "adam":
            state["steps"] = self.steps.clone()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.set_hyperparams(momentum=state["momentum"], nesterov=state["nesterov"],
                             weight_decay=state["weight_decay"])
        self.lr.copy_(state["lr"])
        for t, saved in zip(self._state(), state["state"], strict=True):
            t.copy_(saved)
        if self.kind == "adam":
            self.steps.copy_(state["steps"])
