"""Mini-batch class selection: a bounded class sampler, its actions and the classic baselines.

Each member of a population has class shares s (length C): the probability that a sample slot
of its next batches holds class c. They are written as

    s = floor * p + (1 - floor) * q

where p is the training split's class frequencies (what uniform batches draw) and q a mix the
actions move. So whatever the actions do, every class keeps at least `floor` (default 1/2) of
its uniform share and no class is starved. A run starts at q = p: s = p, uniform batches.

Actions (`CLASS_ACTIONS`, the same for every task: none names a class index, so the observation
can sort classes by their validation loss and stay permutation-invariant):

- keep: the current mix;
- toward uniform (p), toward balanced (equal shares), toward loss-proportional (shares in
  proportion to each class's validation loss), toward the hardest class (the one of highest
  validation loss): q <- (1 - step) q + step q*, where q* is the target written in q's terms
  (clipped at 0 and renormalised where the floor makes the target unreachable). One action
  moves s by at most (1 - floor) x step in total variation.

Baselines (`baseline_shares`): uniform (p), class-balanced (inverse frequency: equal shares) and
loss-proportional sampling set s exactly, without the floor, through the same sampler.

`ClassSampler` draws the batches on the device with no host sync: per batch one uniform number
per member places B evenly spaced points on the CDF of s (systematic sampling, so each class gets
floor(B s_c) or ceil(B s_c) slots), and the slots of a class walk through a per-member, per-class
permutation of its samples (reshuffled every epoch), so at s = p an epoch sees each sample about
once, as a permutation would. Seeded by the members' generators; `state_dict` resumes it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from qan_ray.config import CLASS_ACTIONS

KEEP = 0
BASELINES = ("uniform", "balanced", "loss-proportional")


def target_shares(action: int, data_shares: np.ndarray, class_loss: np.ndarray | None,
                  current: np.ndarray) -> np.ndarray:
    """The shares action `action` moves toward (keep: `current`)."""
    c = len(data_shares)
    if action == 0:
        return current
    if action == 1:
        return data_shares
    if action == 2:
        return np.full(c, 1.0 / c)
    loss = _finite_losses(class_loss, c)
    if loss is None:  # no per-class losses yet: balanced is the neutral target
        return np.full(c, 1.0 / c)
    if action == 3:
        return loss / loss.sum() if loss.sum() > 0 else np.full(c, 1.0 / c)
    if action == 4:
        return np.eye(c)[int(np.argmax(loss))]
    raise ValueError(f"class action {action} is outside 0..{len(CLASS_ACTIONS) - 1} "
                     f"({', '.join(CLASS_ACTIONS)}).")


def _finite_losses(class_loss: np.ndarray | None, c: int) -> np.ndarray | None:
    if class_loss is None:
        return None
    loss = np.asarray(class_loss, dtype=np.float64).reshape(-1)
    if len(loss) != c or not np.isfinite(loss).any():
        return None
    top = np.nanmax(np.where(np.isfinite(loss), loss, np.nan))
    return np.clip(np.where(np.isfinite(loss), loss, top), 0.0, None)


def to_mix(shares: np.ndarray, data_shares: np.ndarray, floor: float) -> np.ndarray:
    """q with floor * p + (1 - floor) * q as close to `shares` as the floor allows."""
    q = np.clip((np.asarray(shares, dtype=np.float64) - floor * data_shares) / (1 - floor), 0,
                None)
    return q / q.sum() if q.sum() > 0 else np.asarray(data_shares, dtype=np.float64)


def baseline_shares(kind: str, data_shares: np.ndarray,
                    class_loss: np.ndarray | None = None) -> np.ndarray:
    """The shares of a classic sampling baseline: uniform (the data's frequencies), balanced
    (inverse frequency: equal class shares) or loss-proportional (each class's validation loss
    over their sum; balanced until losses are known)."""
    c = len(data_shares)
    if kind == "uniform":
        return np.asarray(data_shares, dtype=np.float64)
    if kind == "balanced":
        return np.full(c, 1.0 / c)
    if kind == "loss-proportional":
        return target_shares(3, data_shares, class_loss, data_shares)
    raise ValueError(f"class sampling baseline {kind!r} must be one of {BASELINES}.")


class ClassSampler:
    """Class-composed batches for K members (module docstring)."""

    def __init__(self, class_index: torch.Tensor, class_count: torch.Tensor, k: int,
                 batch_size: int, gens: Sequence[torch.Generator], floor: float = 0.5,
                 step: float = 0.25, batches_per_epoch: int = 1):
        self.k, self.b, self.gens = int(k), int(batch_size), list(gens)
        self.floor, self.step = float(floor), float(step)
        self.per_epoch = max(1, int(batches_per_epoch))
        self.index, self.count = class_index, class_count
        self.device = class_index.device
        self.c, self.width = class_index.shape
        counts = class_count.double().cpu().numpy()
        self.data_shares = counts / counts.sum()
        self.shares = np.tile(self.data_shares, (self.k, 1))  # s per member, on the host
        self.mix = np.tile(self.data_shares, (self.k, 1))  # q per member
        self.class_loss: list[np.ndarray | None] = [None] * self.k  # last val loss per class
        self._since = np.zeros(self.k, dtype=np.int64)  # batches since the last reshuffle
        self._arange = torch.arange(self.b, device=self.device)
        self._rows = torch.arange(self.k, device=self.device)[:, None]
        self._invalid = (torch.arange(self.width, device=self.device)[None, :]
                         >= class_count[:, None])  # (C, W) padding of class_index
        self._cdf = torch.zeros(self.k, self.c, device=self.device)
        self._cursor = torch.zeros(self.k, self.c, dtype=torch.long, device=self.device)
        self._order = torch.zeros(self.k, self.c, self.width, dtype=torch.long,
                                  device=self.device)
        for i in range(self.k):
            self._write(i)

    # --- shares ----------------------------------------------------------------------------
    def _write(self, i: int) -> None:
        cdf = np.cumsum(self.shares[i])
        cdf[-1] = 1.0
        self._cdf[i] = torch.from_numpy(cdf).to(self._cdf)

    def reset_member(self, i: int) -> None:
        """Member i starts over: uniform batches (s = q = p), fresh class orders from its
        generator (call after seeding it)."""
        self.mix[i] = self.data_shares
        self.shares[i] = self.data_shares
        self.class_loss[i] = None
        self._write(i)
        self._reshuffle(i)

    def act(self, i: int, action: int) -> np.ndarray:
        """Member i's class action (CLASS_ACTIONS); returns its new shares."""
        action = int(action)
        if not 0 <= action < len(CLASS_ACTIONS):
            raise ValueError(f"class action {action} is outside 0..{len(CLASS_ACTIONS) - 1} "
                             f"({', '.join(CLASS_ACTIONS)}).")
        if action == KEEP:
            return self.shares[i].copy()
        target = target_shares(action, self.data_shares, self.class_loss[i], self.shares[i])
        q = (1 - self.step) * self.mix[i] + self.step * to_mix(target, self.data_shares,
                                                               self.floor)
        self.mix[i] = q / q.sum()
        self.shares[i] = self.floor * self.data_shares + (1 - self.floor) * self.mix[i]
        self._write(i)
        return self.shares[i].copy()

    def set_shares(self, i: int, shares: Sequence[float]) -> np.ndarray:
        """Member i's shares set exactly (a baseline; no floor, no step bound): non-negative,
        normalised here, one per class."""
        s = np.asarray(shares, dtype=np.float64).reshape(-1)
        if len(s) != self.c or not np.isfinite(s).all() or (s < 0).any() or s.sum() <= 0:
            raise ValueError(f"class shares {s.tolist()} must be {self.c} finite numbers >= 0 "
                             "with a positive sum.")
        self.shares[i] = s / s.sum()
        self.mix[i] = to_mix(self.shares[i], self.data_shares, self.floor)
        self._write(i)
        return self.shares[i].copy()

    # --- batches ---------------------------------------------------------------------------
    def _reshuffle(self, i: int) -> None:
        keys = torch.rand(self.c, self.width, device=self.device, generator=self.gens[i])
        self._order[i] = keys.masked_fill(self._invalid, 2.0).argsort(dim=1)
        self._cursor[i] = 0
        self._since[i] = 0

    def next_indices(self) -> torch.Tensor:
        """(K, B) train indices of every member's next batch, drawn on the device."""
        for i in np.flatnonzero(self._since >= self.per_epoch):
            self._reshuffle(int(i))
        self._since += 1
        u = torch.cat([torch.rand(1, device=self.device, generator=g) for g in self.gens])
        points = (u[:, None] + self._arange) / self.b  # (K, B), increasing
        cls = torch.searchsorted(self._cdf, points).clamp_(max=self.c - 1)
        counts = torch.zeros(self.k, self.c, dtype=torch.long, device=self.device)
        counts.scatter_add_(1, cls, torch.ones_like(cls))
        rank = self._arange - (counts.cumsum(1) - counts).gather(1, cls)
        pos = (self._cursor.gather(1, cls) + rank) % self.count[cls]
        self._cursor += counts
        return self.index[cls, self._order[self._rows, cls, pos]]

    def composition(self, i: int) -> list[float]:
        """Expected samples per class in each of member i's batches (B x shares)."""
        return (self.b * self.shares[i]).tolist()

    # --- checkpointing ---------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"shares": torch.from_numpy(self.shares.copy()),
                "mix": torch.from_numpy(self.mix.copy()),
                "class_loss": [None if x is None else torch.from_numpy(np.array(x))
                               for x in self.class_loss],
                "since": torch.from_numpy(self._since.copy()), "cursor": self._cursor.clone(),
                "order": self._order.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.shares = np.array(state["shares"], dtype=np.float64)
        self.mix = np.array(state["mix"], dtype=np.float64)
        self.class_loss = [None if x is None else np.array(x, dtype=np.float64)
                           for x in state["class_loss"]]
        self._since = np.array(state["since"], dtype=np.int64)
        self._cursor.copy_(state["cursor"])
        self._order.copy_(state["order"])
        for i in range(self.k):
            self._write(i)
