"""Permutation-invariant weight statistics + training signals -> one float32 vector.

The paper's final state (Fu et al. 2016, see shared/QAN.md) for one conv layer, generalised to any
set of Linear/Conv layers. For a weight tensor viewed as (out, in, k) (k = kernel positions, 1 for
Linear):
- g(whole layer): 12 statistics,
- for each of three groupings -- per output filter (out groups of in*k), per input channel (in
  groups of out*k), per kernel (out*in groups of k) -- the 12 statistics of every group,
  summarised over the groups by mean/median/std/max/min: 3 x 60.
That is 192 numbers per layer. Reordering hidden units only reorders groups or the members of a
group, so every number is unchanged (tests/test_features.py checks it).

All of it runs on the weights' device; the host receives one small vector per control step. A
signed log transform keeps raw moments of very different magnitudes on one scale, and it is the
same for acting and learning because it happens here, before anyone sees the vector.
"""

from __future__ import annotations

import math

import torch
from torch import nn

STAT_NAMES = ("mean", "q25", "q50", "q75", "std", "skew", "kurt", "m1", "m2", "m3", "m4", "m5")
SUMMARY_NAMES = ("mean", "median", "std", "max", "min")
GROUPINGS = ("filter", "in_channel", "kernel")
SIGNAL_NAMES = ("log10_lr", "log_train_loss", "log_train_loss_vs_initial", "log_val_loss",
                "val_accuracy", "progress", "log_lr_vs_initial", "nonfinite")
PER_LAYER = len(STAT_NAMES) * (1 + len(GROUPINGS) * len(SUMMARY_NAMES))  # 192


def _sorted_quantile(xs: torch.Tensor, q: float) -> torch.Tensor:
    """Linear-interpolation quantile (torch.quantile's default) of rows already sorted along
    dim 1. Positions come from the shape (host metadata): no device sync."""
    pos = q * (xs.shape[1] - 1)
    lo = int(pos)
    hi = min(lo + 1, xs.shape[1] - 1)
    return xs[:, lo] + (xs[:, hi] - xs[:, lo]) * (pos - lo)


def group_stats(x: torch.Tensor) -> torch.Tensor:
    """The paper's g(x) for each row of x (G, n) -> (G, 12), computed in float32."""
    x = x.float()
    xs = torch.sort(x, dim=1).values
    mean = x.mean(dim=1)
    centred = x - mean[:, None]
    c2 = centred * centred
    var = c2.mean(dim=1)
    std = var.sqrt()
    safe = std > 1e-12
    denom = torch.where(safe, var, torch.ones_like(var))
    skew = torch.where(safe, (c2 * centred).mean(dim=1) / (denom * denom.sqrt()),
                       torch.zeros_like(std))
    kurt = torch.where(safe, (c2 * c2).mean(dim=1) / (denom * denom) - 3.0, torch.zeros_like(std))
    x2 = x * x
    x3 = x2 * x
    moments = [mean, x2.mean(dim=1), x3.mean(dim=1), (x2 * x2).mean(dim=1),
               (x3 * x2).mean(dim=1)]
    quartiles = [_sorted_quantile(xs, q) for q in (0.25, 0.5, 0.75)]
    return torch.stack([mean, *quartiles, std, skew, kurt, *moments], dim=1)


def _single_stats(x: torch.Tensor) -> torch.Tensor:
    """group_stats of one-element groups (a Linear layer's 'kernels'), in closed form."""
    zero = torch.zeros_like(x)
    x2 = x * x
    return torch.stack([x, x, x, x, zero, zero, zero, x, x2, x2 * x, x2 * x2, x2 * x2 * x], dim=1)


def _summarise(stats: torch.Tensor) -> torch.Tensor:
    """(G, 12) per-group statistics -> (60,) mean/median/std/max/min over the groups."""
    s = stats.T.contiguous()  # (12, G): reductions along contiguous rows (a selection for the
    # median, not a sort: 8x faster for the G = out*in per-kernel groups of a Linear layer)
    return torch.cat([
        s.mean(dim=1), s.median(dim=1).values, s.std(dim=1, correction=0), s.amax(dim=1),
        s.amin(dim=1),
    ])


def layer_features(weight: torch.Tensor) -> torch.Tensor:
    """192 permutation-invariant numbers of one Linear (out, in) or Conv (out, in, *k) weight."""
    w = weight.detach().float()
    out_ch, in_ch = w.shape[0], w.shape[1]
    w3 = w.reshape(out_ch, in_ch, -1)
    parts = [
        group_stats(w3.reshape(1, -1))[0],
        _summarise(group_stats(w3.reshape(out_ch, -1))),
        _summarise(group_stats(w3.transpose(0, 1).reshape(in_ch, -1))),
        _summarise(_single_stats(w3.reshape(-1)) if w3.shape[2] == 1
                   else group_stats(w3.reshape(out_ch * in_ch, -1))),
    ]
    return torch.cat(parts)


def monitored_modules(model: nn.Module,
                      names: tuple[str, ...] = ()) -> list[tuple[str, nn.Module]]:
    """The Linear/Conv modules whose weights are observed, in a fixed order."""
    found = [(n, m) for n, m in model.named_modules()
             if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))]
    if not names:
        return found
    by_name = dict(found)
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise ValueError(f"`monitored_layers` names {unknown}, which are not Linear/Conv modules "
                         f"of the model. Valid names: {list(by_name)}.")
    return [(n, by_name[n]) for n in names]


def symlog(x: torch.Tensor) -> torch.Tensor:
    return torch.sign(x) * torch.log1p(x.abs())


def weight_features(model: nn.Module, names: tuple[str, ...] = ()) -> torch.Tensor:
    """Concatenated, symlog-scaled layer features of the monitored modules, on their device."""
    feats = [layer_features(m.weight) for _, m in monitored_modules(model, names)]
    return symlog(torch.cat(feats))


def feature_names(model: nn.Module, names: tuple[str, ...] = (),
                  with_weights: bool = True) -> list[str]:
    """Human-readable name of every entry of the observation vector (same order)."""
    out: list[str] = []
    for layer, _ in monitored_modules(model, names) if with_weights else []:
        out += [f"{layer}.all.{s}" for s in STAT_NAMES]
        for grouping in GROUPINGS:
            out += [f"{layer}.{grouping}.{summ}.{s}" for summ in SUMMARY_NAMES for s in STAT_NAMES]
    return out + [f"signal.{s}" for s in SIGNAL_NAMES]


def _log(x: float) -> float:
    return math.log(x) if x > 0 and math.isfinite(x) else 0.0


def signal_vector(lr: float, initial_lr: float, train_loss: float, initial_loss: float,
                  val_loss: float, val_accuracy: float, progress: float) -> list[float]:
    """Training signals the original lacked (host floats; read once per control step)."""
    return [
        math.log10(lr), _log(train_loss), _log(train_loss) - _log(initial_loss), _log(val_loss),
        val_accuracy if math.isfinite(val_accuracy) else 0.0, progress,
        math.log(lr / initial_lr), 0.0,
    ]


def observation(model: nn.Module, signals: list[float], names: tuple[str, ...] = (),
                with_weights: bool = True):
    """Full observation as a float32 numpy vector. Non-finite entries become 0 and set the
    `nonfinite` flag (last entry) to their count, so the controller can see it happened."""
    sig = torch.tensor(signals, dtype=torch.float32)
    if with_weights:
        w = weight_features(model, names)
        vec = torch.cat([w, sig.to(w.device)])
    else:
        vec = sig
    bad = ~torch.isfinite(vec)
    vec = torch.where(bad, torch.zeros_like(vec), vec)
    vec[-1] = bad.sum().float()
    return vec.cpu().numpy()


def observation_size(model: nn.Module, names: tuple[str, ...] = (),
                     with_weights: bool = True) -> int:
    layers = len(monitored_modules(model, names)) if with_weights else 0
    return PER_LAYER * layers + len(SIGNAL_NAMES)
