from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from qan_ray.contract import ObservationSpec, Observer
from qan_ray.features import (
    STAT_NAMES,
    WEIGHT_FEATURES,
    group_stats,
    layer_view,
    weight_feature_names,
    weight_features,
)
from qan_ray.models import MLP, LeNet, WideResNet


def _reference_stats(v: np.ndarray) -> list[float]:
    """The 12 statistics of STAT_NAMES by numpy/scipy (float64), independently of qan_ray:
    mean, linear quartiles, population std, biased skewness, biased excess kurtosis, E[x^1..5];
    a constant group has skewness and kurtosis 0."""
    from scipy import stats

    v = np.asarray(v, np.float64)
    constant = np.ptp(v) == 0
    return [v.mean(), *np.quantile(v, [0.25, 0.5, 0.75]), v.std(),
            0.0 if constant else stats.skew(v, bias=True),
            0.0 if constant else stats.kurtosis(v, fisher=True, bias=True),
            *stats.moment(v, [1, 2, 3, 4, 5], center=0)]


def test_group_stats_match_numpy_on_known_values():
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0, 10.0]])
    s = group_stats(x)[0].numpy()
    # by hand: mean 4, central moments 10 (var), 36 (3rd), 278.8 (4th)
    assert STAT_NAMES == ("mean", "q25", "q50", "q75", "std", "skew", "kurt", "m1", "m2", "m3",
                          "m4", "m5")
    assert s == pytest.approx([4.0, 2.0, 3.0, 4.0, 10 ** 0.5, 36 / 10 ** 1.5, 2.788 - 3.0,
                               4.0, 26.0, 220.0, 2070.8, 20260.0], rel=1e-6)
    const = group_stats(torch.ones(1, 4))[0]
    assert const.tolist() == [1.0] * 4 + [0.0] * 3 + [1.0] * 5  # no NaN from a zero std


def test_group_stats_equal_scipy_on_every_row():
    """Rows of different shapes (skewed, heavy-tailed, shifted, negative, lengths with
    interpolated quartiles) against the independent numpy/scipy statistics, all 12 of them."""
    g = torch.Generator().manual_seed(0)
    rows = torch.stack([
        torch.randn(37, generator=g),
        torch.rand(37, generator=g).log().neg(),  # exponential: skew ~2, kurtosis ~6
        torch.randn(37, generator=g) ** 3,  # heavy tails
        0.3 + 0.1 * torch.randn(37, generator=g),  # shifted: the moments are not central
        -torch.rand(37, generator=g) ** 2,  # left-skewed, negative
    ])
    got = group_stats(rows).double().numpy()
    for row, s in zip(rows.double().numpy(), got):
        ref = _reference_stats(row)
        assert s == pytest.approx(ref, rel=2e-5, abs=2e-6)
    assert got[1, 5] > 1 and got[4, 5] < 0  # the skewness signs the test data were made for
    for n in (2, 6, 10):  # quartile positions (n - 1) x 0.25 ... that fall between samples
        row = torch.randn(n, generator=g)
        assert group_stats(row[None])[0].double().numpy() == pytest.approx(
            _reference_stats(row.double().numpy()), rel=2e-5, abs=2e-6)


def test_layer_features_equal_the_reference_statistics_of_each_grouping():
    """All 192 numbers of a small Linear and a small Conv layer (no subsampling), symlog-scaled:
    the whole layer's 12, then for each grouping the mean/median/std/max/min over its groups of
    the 12. A one-layer model's first, last and mean pools are that layer's 192."""
    from qan_ray.features import GROUPINGS, PER_LAYER, SUMMARY_NAMES

    torch.manual_seed(1)
    for model in (nn.Sequential(nn.Linear(7, 5)), nn.Sequential(nn.Conv1d(5, 3, 3))):
        weight = model[0].weight.detach()
        w = weight.double().numpy().reshape(weight.shape[0], weight.shape[1], -1)
        out_ch, in_ch, k = w.shape
        groups = {"filter": w.reshape(out_ch, -1),
                  "in_channel": w.transpose(1, 0, 2).reshape(in_ch, -1),
                  "kernel": w.reshape(out_ch * in_ch, k)}
        assert set(groups) == set(GROUPINGS) and len(SUMMARY_NAMES) == 5
        expected = list(_reference_stats(w.ravel()))
        for grouping in GROUPINGS:  # odd group counts: the median is one group's value
            per_group = np.array([_reference_stats(row) for row in groups[grouping]])
            assert len(per_group) % 2 == 1
            expected += [*per_group.mean(0), *np.median(per_group, 0), *per_group.std(0),
                         *per_group.max(0), *per_group.min(0)]
        expected = np.sign(expected) * np.log1p(np.abs(expected))  # symlog
        got = weight_features(model).double().numpy()
        assert got.shape == (3 * PER_LAYER,)
        for pool in range(3):
            assert got[pool * PER_LAYER:(pool + 1) * PER_LAYER] == pytest.approx(
                expected, rel=5e-5, abs=5e-6)


def _permute_hidden(mlp: MLP, perm: torch.Tensor) -> None:
    first, second = mlp.net[1], mlp.net[3]
    with torch.no_grad():
        first.weight.copy_(first.weight[perm])
        first.bias.copy_(first.bias[perm])
        second.weight.copy_(second.weight[:, perm])


def test_weight_features_invariant_to_hidden_unit_permutation():
    torch.manual_seed(0)
    mlp = MLP(64, (32,))
    x = torch.randn(5, 1, 8, 8)
    before_out, before = mlp(x), weight_features(mlp)
    _permute_hidden(mlp, torch.randperm(32))
    assert torch.allclose(mlp(x), before_out, atol=1e-6)  # the same function...
    assert torch.allclose(weight_features(mlp), before, atol=1e-5)  # ...the same features
    assert before.shape == (WEIGHT_FEATURES,)


def test_subsampled_large_layer_is_still_permutation_invariant():
    """A 512-unit hidden layer is reduced to a 32 x 32 block before the statistics: the block is
    chosen by row/column norm ranks, so permuting the hidden units selects the same weights."""
    torch.manual_seed(1)
    mlp = MLP(300, (512,))
    assert layer_view(mlp.net[1].weight[None]).shape == (1, 32, 32, 1)
    before = weight_features(mlp)
    _permute_hidden(mlp, torch.randperm(512))
    assert torch.allclose(weight_features(mlp), before, atol=1e-5)


def test_conv_features_invariant_to_filter_permutation():
    torch.manual_seed(0)
    net = LeNet()
    before = weight_features(net)
    perm = torch.randperm(32)
    c1, c2 = net.features[0], net.features[3]
    with torch.no_grad():
        c1.weight.copy_(c1.weight[perm])
        c2.weight.copy_(c2.weight[:, perm])
    assert torch.allclose(weight_features(net), before, atol=1e-5)


class _Conv1dNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv1d(1, 16, 5), nn.ReLU(), nn.Conv1d(16, 32, 3),
                                  nn.ReLU(), nn.AdaptiveAvgPool1d(1), nn.Flatten(),
                                  nn.Linear(32, 10))

    def forward(self, x):
        return self.body(x)


@pytest.mark.parametrize("model", [
    MLP(64, (64,)),                       # the digits MLP (2 layers)
    MLP(64, (128, 96, 64, 48, 32)),       # a 6-layer MLP
    LeNet(),                              # the paper's MNIST CNN
    _Conv1dNet(),                         # a 1-D CNN
    WideResNet(depth=10, width=1),        # WRN-10-1 (BatchNorm, 1x1 shortcuts)
], ids=["digits-mlp", "mlp-6", "lenet", "cnn-1d", "wrn-10-1"])
def test_observation_has_the_same_length_for_every_architecture(model):
    spec = ObservationSpec()
    obs = Observer(spec, 0.1).observe(model, lr=0.1, train_loss=2.0, val_loss=2.1,
                                      val_accuracy=0.3, progress=0.1)
    assert obs.shape == (spec.size,) == (WEIGHT_FEATURES + 13,)
    assert obs.dtype == np.float32 and np.isfinite(obs).all() and obs[-1] == 0
    assert len(spec.feature_names) == spec.size and spec.feature_names[0] == "w.first.all.mean"
    assert weight_feature_names()[-1] == "w.mean.kernel.min.m5"


def test_mean_pool_averages_the_layers_and_first_last_are_the_ends():
    from qan_ray.features import PER_LAYER, layer_features, symlog

    mlp = MLP(64, (32, 16))
    layers = [mlp.net[1], mlp.net[3], mlp.net[5]]
    feats = weight_features(mlp)
    per = [symlog(layer_features(m.weight[None])[0]) for m in layers]
    assert torch.allclose(feats[:PER_LAYER], per[0])
    assert torch.allclose(feats[PER_LAYER:2 * PER_LAYER], per[2])
    assert torch.allclose(feats[2 * PER_LAYER:], torch.stack(per).mean(0), atol=1e-6)


def test_observation_flags_nonfinite_weights_and_signals():
    mlp = MLP(64, (16,))
    with torch.no_grad():
        mlp.net[1].weight[0, 0] = float("nan")
    obs = Observer(ObservationSpec(), 0.1).observe(mlp, lr=0.1, train_loss=float("inf"),
                                                   val_loss=1.0, val_accuracy=0.5, progress=0.1)
    assert np.isfinite(obs).all() and obs[-1] > 0


def test_monitored_layers_unknown_name_is_a_clear_error():
    with pytest.raises(ValueError, match=r"`monitored_layers` names \['fc9'\].*Valid names"):
        weight_features(nn.Sequential(nn.Linear(3, 2)), ("fc9",))


def test_model_without_linear_or_conv_layers_is_a_clear_error():
    with pytest.raises(ValueError, match="has no Linear/Conv layer.*--no-weight-features"):
        weight_features(nn.Sequential(nn.ReLU()))


def test_single_element_groups_closed_form_matches_group_stats():
    from qan_ray.features import _single_stats

    x = torch.randn(50)
    assert torch.allclose(_single_stats(x), group_stats(x[:, None]), atol=1e-6)


def test_numpy_sorts_and_the_linear_summary_give_the_torch_paths_numbers():
    """The CPU fast paths are exact: NumPy's sort equals torch.sort (NaN last), and the Linear
    layer's per-weight summary equals summarising the 12-column per-weight statistics."""
    from qan_ray import features as fe

    g = torch.Generator().manual_seed(0)
    for shape in ((3, 1, 1024), (3, 40, 17), (2, 5, fe.SORT_NUMPY_MIN - 1)):
        x = torch.randn(shape, generator=g) * 2
        x[0, 0, 3] = float("nan")
        x[1, -1] = 0.0
        assert torch.equal(fe.sorted_rows(x).nan_to_num(9.0),
                           torch.sort(x, dim=-1).values.nan_to_num(9.0))
    x = torch.randn(4, 300, generator=g) * 3
    x[0, 5] = float("nan")
    x[1] = 0.0
    ref = fe._summarise(fe._single_stats(x), fe._single_medians(x))
    assert torch.equal(fe._summarise_single(x).nan_to_num(9.0), ref.nan_to_num(9.0))
