"""Permutation-invariant weight statistics, pooled into one vector whose length fits any model.

Per layer (the paper's final state, Fu et al. 2016, generalised to every Linear/Conv layer): for a
weight tensor viewed as (out, in, k) (k = kernel positions, 1 for Linear),
- g(whole layer): 12 statistics (mean, quartiles, std, skewness, excess kurtosis, E[x^1..5]),
- for each of three groupings -- per output filter, per input channel, per kernel position set --
  the 12 statistics of every group, summarised over the groups by mean/median/std/max/min: 3 x 60.
That is 192 symlog-scaled numbers per layer. Reordering hidden units only reorders groups or the
members of a group, so every number is unchanged (tests/test_features.py checks it).

Across layers the statistics are pooled by relative depth, so the length never depends on the
layer count: the first layer, the last layer and the mean over all layers (3 x 192 = 576). The
first layer sees the data, the last one the classes; the mean summarises the body of any depth.

Bounded cost (one observation of a 1M-parameter network in a few ms on one CPU thread):
- a layer with more output or input channels than its side (sqrt(ELEMENT_BUDGET / k), 8..32) is
  reduced to a stratified subset of its rows, then of its columns: rows sorted by their norm
  and taken at evenly spaced ranks, then columns likewise by their norm over the kept rows. The
  subset depends only on the multiset of rows and columns, so permutation invariance holds (the
  norms are accumulated in float64 up to EXACT_NORM_LIMIT weights: exactly); it is
  deterministic (no RNG) and covers small, typical and large rows alike;
- a model with more than MAX_LAYERS monitored layers contributes the first, the last and
  MAX_LAYERS evenly spaced layers to the mean;
- quantiles come from one sort of each (small) group, the median over groups from a selection.
  On the CPU, rows of SORT_NUMPY_MIN or more weights are sorted by NumPy's vectorised sort
  (`np.sort`, 10-30x torch.sort on rows of 32-1024 float32s here); a sort is exact, so the
  numbers are the same as torch.sort's. The raw moments of long rows are one reduction per power.

Every function takes K networks at once (a leading member dim); one network is the K = 1 case
(`weight_features`), so a population's observation and a single run's are the same code.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

STAT_NAMES = ("mean", "q25", "q50", "q75", "std", "skew", "kurt", "m1", "m2", "m3", "m4", "m5")
SUMMARY_NAMES = ("mean", "median", "std", "max", "min")
GROUPINGS = ("filter", "in_channel", "kernel")
POOLS = ("first", "last", "mean")
PER_LAYER = len(STAT_NAMES) * (1 + len(GROUPINGS) * len(SUMMARY_NAMES))  # 192
WEIGHT_FEATURES = len(POOLS) * PER_LAYER  # 576
ELEMENT_BUDGET = 1024
"""Weights per layer the statistics see at most: side x side x k, side = sqrt(budget / k)."""
MIN_SIDE, MAX_SIDE = 8, 32
"""Bounds of the rows (output channels) and columns (input channels) kept per layer."""
EXACT_NORM_LIMIT = 1 << 18
"""Layers up to this many weights rank their rows by float64 norms (exactly invariant)."""
MAX_LAYERS = 8
"""Layers averaged into the `mean` pool at most (evenly spaced by depth)."""
SORT_NUMPY_MIN = 16
"""Rows at least this long are sorted by NumPy on the CPU (shorter ones: torch.sort is faster)."""


def sorted_rows(x: torch.Tensor) -> torch.Tensor:
    """x sorted along its last dim, ascending, NaN last (torch.sort's values): by `np.sort` for a
    CPU float tensor with rows of SORT_NUMPY_MIN or more, else torch.sort (on a GPU: no host
    round trip)."""
    if x.device.type == "cpu" and x.shape[-1] >= SORT_NUMPY_MIN and not x.requires_grad:
        return torch.from_numpy(np.sort(x.numpy(), axis=-1))
    return torch.sort(x, dim=-1).values


def group_stats(x: torch.Tensor) -> torch.Tensor:
    """The paper's g(x) for each row of x, with any leading dims: (..., G, n) -> (..., G, 12):
    mean, linear-interpolation quartiles (torch.quantile's default), std, skewness, excess
    kurtosis, E[x^1..5]. Computed in float64 from the raw moments in a handful of ops: the rows
    are small (a layer's view has at most ELEMENT_BUDGET weights), so per-op overhead, not
    arithmetic, is what costs here."""
    x = x.float()
    n = x.shape[-1]
    xs = sorted_rows(x).double()
    x = x.double()
    pos = torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64, device=x.device) * (n - 1)
    lo = pos.floor().long()
    hi = torch.clamp(lo + 1, max=n - 1)
    xlo = xs.index_select(-1, lo)
    quartiles = xlo + (xs.index_select(-1, hi) - xlo) * (pos - lo)
    x2 = x * x
    x3 = x2 * x
    powers = (x, x2, x3, x2 * x2, x3 * x2)
    if n >= SORT_NUMPY_MIN:  # long rows: one contiguous reduction per power
        raw = torch.stack([p.mean(dim=-1) for p in powers], dim=-1)  # (..., G, 5)
    else:
        raw = torch.stack(powers, dim=-1).mean(dim=-2)
    m1, m2, m3, m4, _ = raw.unbind(-1)
    var = (m2 - m1 * m1).clamp_min(0.0)
    safe = var > 1e-10 * m2  # a constant group: no NaN from a zero std
    denom = torch.where(safe, var, torch.ones_like(var))
    skew = (m3 - 3 * m1 * m2 + 2 * m1 ** 3) / denom ** 1.5
    kurt = (m4 - 4 * m1 * m3 + 6 * m1 * m1 * m2 - 3 * m1 ** 4) / (denom * denom) - 3.0
    zero = torch.zeros_like(var)
    shape = torch.stack([var.sqrt(), torch.where(safe, skew, zero),
                         torch.where(safe, kurt, zero)], dim=-1)
    return torch.cat([m1[..., None], quartiles, shape, raw], dim=-1).float()


def _single_stats(x: torch.Tensor) -> torch.Tensor:
    """group_stats of one-element groups (a Linear layer's 'kernels'), in closed form:
    (..., n) -> (..., n, 12)."""
    zero = torch.zeros_like(x)
    x2 = x * x
    return torch.stack([x, x, x, x, zero, zero, zero, x, x2, x2 * x, x2 * x2, x2 * x2 * x],
                       dim=-1)


def _single_medians(x: torch.Tensor) -> torch.Tensor:
    """(K, n) -> (K, 12): the medians of `_single_stats(x)` over n from two selections.
    torch.median is the lower middle element, and each statistic is a monotone function of x
    (x, x^3, x^5, as rounded) or of |x| (x^2, x^4), so its median is that function of the
    median of x or |x|: exactly the same number, without materialising the (K, n, 12) stack's
    per-statistic selections."""
    m = x.median(dim=1).values
    a = x.abs().median(dim=1).values
    a2 = a * a
    m2 = m * m
    zero = torch.zeros_like(m)
    return torch.stack([m, m, m, m, zero, zero, zero, m, a2, m2 * m, a2 * a2, m2 * m2 * m],
                       dim=1)


def _summarise_single(x: torch.Tensor) -> torch.Tensor:
    """`_summarise(_single_stats(x), _single_medians(x))` without its repeated columns: of the
    12 per-element statistics only x, x^2..x^5 differ (the quartiles and m1 are x, the std,
    skewness and kurtosis 0), so 5 rows are summarised and placed: the same reductions over the
    same contiguous rows, hence the same numbers, in under half the work."""
    x2 = x * x
    distinct = torch.stack([x, x2, x2 * x, x2 * x2, x2 * x2 * x], dim=1)  # (K, 5, n)
    d = distinct.double()
    m1 = d.mean(dim=2)
    std = (d.square().mean(dim=2) - m1 * m1).clamp_min(0.0).sqrt().float()
    summary = torch.stack([distinct.mean(dim=2), std, distinct.amax(dim=2),
                           distinct.amin(dim=2)], dim=1)  # (K, 4, 5)
    one, zero = summary[..., :1], torch.zeros_like(summary[..., :1])
    placed = torch.cat([one, one, one, one, zero, zero, zero, one, summary[..., 1:]], dim=2)
    mean, std, amax, amin = placed.unbind(1)
    return torch.cat([mean, _single_medians(x), std, amax, amin], dim=1)


def _summarise(stats: torch.Tensor, median: torch.Tensor | None = None) -> torch.Tensor:
    """(K, G, 12) per-group statistics -> (K, 60): mean/median/std/max/min over the groups
    (`median`: the (K, 12) medians when the caller has them already). The median is a
    selection, not a sort; the std comes from the moments in float64 (one fused pass)."""
    s = stats.transpose(1, 2).contiguous()  # (K, 12, G): reductions along contiguous rows
    if median is None:
        median = s.median(dim=2).values
    d = s.double()
    m1 = d.mean(dim=2)
    std = (d.square().mean(dim=2) - m1 * m1).clamp_min(0.0).sqrt().float()
    return torch.cat([s.mean(dim=2), median, std, s.amax(dim=2), s.amin(dim=2)], dim=1)


def _select(keys: torch.Tensor, cap: int) -> torch.Tensor:
    """(K, n) keys -> (K, cap) indices at evenly spaced ranks of each row's order."""
    ranks = torch.linspace(0, keys.shape[1] - 1, cap, device=keys.device).round().long()
    return torch.argsort(keys, dim=1).index_select(1, ranks)


def layer_view(weight: torch.Tensor) -> torch.Tensor:
    """K stacked weights (K, out, in, *k) as float32 (K, o, i, k), each reduced to a
    side x side x k block by the permutation-invariant stratified subsample (see the module
    docstring): rows first, by their norm over the whole layer; then columns, by their norm
    over the rows kept."""
    kk = weight.shape[0]
    w3 = weight.detach().float()
    w3 = w3.reshape(kk, w3.shape[1], w3.shape[2], -1)
    k = w3.shape[3]
    side = max(MIN_SIDE, min(MAX_SIDE, int(math.sqrt(ELEMENT_BUDGET / k))))
    if w3.shape[1] > side:
        # float64 accumulation keeps the row order independent of the column order; above
        # EXACT_NORM_LIMIT weights float32 is used for speed (16x here), and a row swap then
        # needs two rows whose norms agree to float32 rounding (~1e-7 relative).
        dtype = torch.float64 if w3[0].numel() <= EXACT_NORM_LIMIT else torch.float32
        keys = torch.linalg.vector_norm(w3.reshape(kk, w3.shape[1], -1), dim=2, dtype=dtype)
        sel = _select(keys, side)
        w3 = torch.gather(w3, 1, sel[:, :, None, None].expand(-1, -1, w3.shape[2], k))
    if w3.shape[2] > side:
        keys = torch.linalg.vector_norm(w3.transpose(1, 2).reshape(kk, w3.shape[2], -1), dim=2,
                                        dtype=torch.float64)
        sel = _select(keys, side)
        w3 = torch.gather(w3, 2, sel[:, None, :, None].expand(-1, w3.shape[1], -1, k))
    return w3


def layer_features(weight: torch.Tensor) -> torch.Tensor:
    """192 permutation-invariant numbers of each of K stacked Linear (K, out, in) or Conv
    (K, out, in, *k) weights: (K, 192)."""
    w3 = layer_view(weight)
    kk, out_ch, in_ch, k = w3.shape
    flat = w3.reshape(kk, -1)
    parts = [
        group_stats(flat[:, None])[:, 0],
        _summarise(group_stats(w3.reshape(kk, out_ch, -1))),
        _summarise(group_stats(w3.transpose(1, 2).reshape(kk, in_ch, -1))),
        (_summarise_single(flat) if k == 1
         else _summarise(group_stats(w3.reshape(kk, out_ch * in_ch, -1)))),
    ]
    return torch.cat(parts, dim=1)


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


def pooled_layers(count: int) -> list[int]:
    """Indices of the layers that enter the `mean` pool (all, or MAX_LAYERS evenly spaced)."""
    if count <= MAX_LAYERS:
        return list(range(count))
    return sorted({round(i * (count - 1) / (MAX_LAYERS - 1)) for i in range(MAX_LAYERS)})


def pooled_weight_features(weights: Sequence[torch.Tensor], model: str = "the model"
                           ) -> torch.Tensor:
    """(K, WEIGHT_FEATURES) pooled, symlog-scaled statistics of K networks of one architecture
    from their monitored weights, each layer stacked (K, out, in, *k) in monitored order: first
    layer, last layer, mean over the layers (see the module docstring)."""
    if not weights:
        raise ValueError(f"{model} has no Linear/Conv layer to observe. QAN's weight statistics "
                         "need at least one; train a signals-only controller "
                         "(--no-weight-features) for such a model.")
    count = len(weights)
    pooled = pooled_layers(count)
    feats = {i: symlog(layer_features(weights[i])) for i in sorted({0, count - 1, *pooled})}
    mean = torch.stack([feats[i] for i in pooled]).mean(dim=0)
    return torch.cat([feats[0], feats[count - 1], mean], dim=1)


def weight_features(model: nn.Module, names: tuple[str, ...] = ()) -> torch.Tensor:
    """(WEIGHT_FEATURES,) statistics of one network, on the weights' device: the K = 1 case of
    `pooled_weight_features`."""
    weights = [m.weight[None] for _, m in monitored_modules(model, names)]
    return pooled_weight_features(weights, type(model).__name__)[0]


def weight_feature_names() -> list[str]:
    """Name of every entry of `weight_features` (same order)."""
    per = [f"all.{s}" for s in STAT_NAMES]
    for grouping in GROUPINGS:
        per += [f"{grouping}.{summ}.{s}" for summ in SUMMARY_NAMES for s in STAT_NAMES]
    return [f"w.{pool}.{name}" for pool in POOLS for name in per]
