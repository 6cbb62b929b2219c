"""Convolutions as im2col + one matmul (qan_ray.popconv): torch's numbers, per member under vmap,
and in a population against each member's single-network run."""

from __future__ import annotations

import pytest
import torch
from torch.func import vmap
from torch.nn import functional as F

from qan_ray import popconv
from qan_ray.config import from_dict
from qan_ray.data import load_data
from qan_ray.population import PopulationTrainer

CASES = [((4, 3, 40), (5, 3, 5), (2,), (1,)), ((4, 2, 7), (3, 2, 3), (1,), (0,)),
         ((3, 3, 9, 8), (6, 3, 3, 3), (1, 1), (1, 1)),
         ((2, 3, 9, 8), (6, 3, 3, 2), (2, 1), (1, 0)),
         ((2, 4, 8, 8), (6, 4, 1, 1), (2, 2), (0, 0))]


@pytest.mark.parametrize("x_shape,w_shape,stride,padding", CASES)
def test_matmul_conv_gives_torchs_convolution_and_gradients(x_shape, w_shape, stride, padding):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(x_shape, generator=gen, requires_grad=True)
    w = torch.randn(w_shape, generator=gen, requires_grad=True)
    b = torch.randn(w_shape[0], generator=gen, requires_grad=True)
    conv = F.conv1d if len(x_shape) == 3 else F.conv2d
    ref = conv(x, w, b, stride, padding)
    got = popconv.matmul_conv(x, w, b, stride, padding)
    assert got.shape == ref.shape
    assert torch.allclose(got, ref, atol=1e-5)
    g = torch.randn(ref.shape, generator=gen)
    ours, theirs = (torch.autograd.grad(t, (x, w, b), g) for t in (got, ref))
    for a, r in zip(ours, theirs):
        assert torch.allclose(a, r, atol=1e-4)
    # K members' weights under vmap: each member's own convolution
    ws = torch.randn(3, *w_shape, generator=gen)
    xs = torch.randn(3, *x_shape, generator=gen)
    batched = vmap(lambda xi, wi: popconv.matmul_conv(xi, wi, None, stride, padding))(xs, ws)
    for i in range(3):
        assert torch.allclose(batched[i], conv(xs[i], ws[i], None, stride, padding), atol=1e-5)


def test_only_plain_convolutions_are_switched():
    net = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3), torch.nn.Conv2d(4, 4, 3, groups=2),
                              torch.nn.Conv1d(4, 4, 3, dilation=2), torch.nn.Conv1d(4, 4, 3),
                              torch.nn.Conv1d(4, 4, 3, padding="same"),
                              torch.nn.Conv1d(4, 4, 3, padding=1, padding_mode="circular"))
    strided = torch.nn.Sequential(torch.nn.Conv1d(2, 4, 3, stride=2), torch.nn.Conv1d(4, 4, 3),
                                  torch.nn.Conv2d(4, 4, 3, stride=2))
    assert popconv.use_matmul_convs(strided, strided_1d_only=True) == 1
    assert popconv.switched(strided[0]) == 1 and popconv.switched(strided) == 1
    assert popconv.use_matmul_convs(net) == 2 and popconv.switched(net) == 2
    assert [popconv.convertible(m) for m in net] == [True, False, False, True, False, False]
    x = torch.randn(2, 2, 6, 6)
    assert torch.allclose(net[0](x), F.conv2d(x, net[0].weight, net[0].bias), atol=1e-5)


def test_a_cnn1d_population_member_equals_its_single_network_run():
    cfg = from_dict(task="mnist1d-cnn", lr=0.05)
    data = load_data(cfg, torch.device("cpu"))
    pop = PopulationTrainer(cfg, seeds=[3, 4, 5], data=data)  # CPU: matmul convolutions
    native = PopulationTrainer(cfg, seeds=[3, 4, 5], data=data, conv="native")
    one = PopulationTrainer(cfg, seeds=[4], data=data)  # K = 1: torch's convolution
    assert (pop.conv, native.conv, one.conv) == ("auto", "native", "native")
    assert (popconv.switched(pop._template), popconv.switched(native._template)) == (3, 0)
    assert popconv.switched(pop.member_model(1)) == 0  # member modules keep torch's kernel
    ref = [float(one.train(1)[0]) for _ in range(8)]
    got = [pop.train(1) for _ in range(8)]
    assert [float(g[1]) for g in got] == pytest.approx(ref, rel=1e-4, abs=1e-6)
    assert torch.allclose(torch.stack(got), torch.stack([native.train(1) for _ in range(8)]),
                          rtol=1e-4, atol=1e-6)
    assert torch.allclose(pop.theta[1], one.theta[0], rtol=1e-3, atol=1e-5)
    loss, acc = pop.evaluate("val")
    ref_loss, ref_acc = one.evaluate("val")
    assert (float(loss[1]), float(acc[1])) == pytest.approx((float(ref_loss[0]),
                                                             float(ref_acc[0])), rel=1e-4)
    with pytest.raises(ValueError, match="conv is 'fast'; it must be 'auto', 'matmul' or"):
        PopulationTrainer(cfg, k=2, data=data, conv="fast")


def test_eval_mode_batchnorm_is_the_affine_map_per_member_under_vmap():
    from torch.func import functional_call

    gen = torch.Generator().manual_seed(0)
    for bn, shape in ((torch.nn.BatchNorm1d(4), (6, 4, 9)),
                      (torch.nn.BatchNorm2d(4), (6, 4, 5, 5))):
        torch.nn.init.normal_(bn.weight, generator=gen)
        torch.nn.init.normal_(bn.bias, generator=gen)
        ref = torch.nn.Sequential(bn)
        net = torch.nn.Sequential(type(bn)(4))
        net.load_state_dict(ref.state_dict())
        assert popconv.use_affine_batchnorm_eval(net) == 1
        x = torch.randn(shape, generator=gen)
        net.train(), ref.train()
        assert torch.allclose(net(x), ref(x), atol=1e-5)  # train mode: torch's kernel, stats too
        assert torch.allclose(net[0].running_var, ref[0].running_var)
        net.eval(), ref.eval()
        assert torch.allclose(net(x), ref(x), atol=1e-5)
        # 3 members' running statistics, stacked: each member's own eval
        state = {n: torch.stack([t, t * 2, t + 1]) for n, t in net.state_dict().items()
                 if t.is_floating_point()}
        out = vmap(lambda s, xi, m=net: functional_call(m, s, (xi,)), in_dims=(0, None))(state, x)
        for i in range(3):
            ref.load_state_dict({**{n: v[i] for n, v in state.items()},
                                 "0.num_batches_tracked": ref[0].num_batches_tracked})
            assert torch.allclose(out[i], ref(x), atol=1e-5)
    pop = PopulationTrainer(from_dict(task="digits-mlp", model="resnet"), k=2)
    assert sum("forward" in vars(m) for m in pop._template.modules()) == 6  # its BatchNorms
