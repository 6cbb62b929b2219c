from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from qan_ray.features import (
    PER_LAYER,
    feature_names,
    group_stats,
    observation,
    observation_size,
    weight_features,
)
from qan_ray.models import MLP, LeNet


def test_group_stats_match_numpy_on_known_values():
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0, 10.0]])
    s = group_stats(x)[0].numpy()
    v = x[0].numpy()
    assert s[0] == pytest.approx(v.mean())
    assert s[1:4] == pytest.approx(np.quantile(v, [0.25, 0.5, 0.75]))
    assert s[4] == pytest.approx(v.std(), rel=1e-5)
    assert s[11] == pytest.approx((v**5).mean(), rel=1e-5)
    assert s[5] > 0  # right-skewed
    const = group_stats(torch.ones(1, 4))[0]
    assert const[4] == 0 and const[5] == 0 and const[6] == 0  # no NaN from a zero std


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
    assert before.shape == (2 * PER_LAYER,)


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


def test_observation_fixed_length_float32_and_flags_nonfinite():
    mlp = MLP(64, (16,))
    n = observation_size(mlp)
    assert n == len(feature_names(mlp)) == 2 * 192 + 8
    obs = observation(mlp, [0.0] * 8)
    assert obs.dtype == np.float32 and obs.shape == (n,) and obs[-1] == 0
    with torch.no_grad():
        mlp.net[1].weight[0, 0] = float("nan")
    obs = observation(mlp, [0.0, float("inf")] + [0.0] * 6)
    assert np.isfinite(obs).all() and obs[-1] > 0


def test_monitored_layers_unknown_name_is_a_clear_error():
    with pytest.raises(ValueError, match=r"`monitored_layers` names \['fc9'\].*Valid names"):
        weight_features(nn.Sequential(nn.Linear(3, 2)), ("fc9",))


def test_single_element_groups_closed_form_matches_group_stats():
    from qan_ray.features import _single_stats

    x = torch.randn(50)
    assert torch.allclose(_single_stats(x), group_stats(x[:, None]), atol=1e-6)
