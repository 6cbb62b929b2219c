from __future__ import annotations

import torch

from qan_ray.config import from_dict
from qan_ray.models import CNN2D, LeNet, WideResNet, build_model


def test_wideresnet_10_1_output_shape_and_depth():
    net = WideResNet(depth=10, width=1)
    assert net(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    convs = [m for m in net.modules()
             if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)]
    assert len(convs) == 7  # 1 stem + 3 stages x n=1 block x 2 convs


def test_lenet_matches_the_paper_layers():
    net = LeNet()
    assert net(torch.zeros(3, 1, 28, 28)).shape == (3, 10)
    assert [m.out_channels for m in net.features if isinstance(m, torch.nn.Conv2d)] == [32, 64]
    assert net.classifier[1].in_features == 64 * 4 * 4 and net.classifier[1].out_features == 200


def test_build_model_mlp_from_config():
    net = build_model(from_dict(hidden=(16, 8)), (1, 8, 8))
    widths = [m.out_features for m in net.modules() if isinstance(m, torch.nn.Linear)]
    assert widths == [16, 8, 10]


def test_build_model_of_a_user_task_calls_its_factory_each_time():
    from qan_ray.distribution import load_config

    cfg = load_config(task="user_task_example:make_task")
    a, b = build_model(cfg, (1, 8, 8)), build_model(cfg, (1, 8, 8))
    assert a is not b and isinstance(a, torch.nn.Sequential)
    assert [m.out_channels for m in a.modules() if isinstance(m, torch.nn.Conv2d)] == [8, 16]
    assert a(torch.zeros(3, 1, 8, 8)).shape == (3, 10)


def test_build_model_rejects_an_unknown_model_name():
    import pytest

    class Cfg:
        model, task = "vgg", "digits-mlp"

    with pytest.raises(ValueError, match="`model` is 'vgg'; it must be mlp, lenet, cnn1d, "
                                         "cnn2d, resnet, resnet1d or wrn"):
        build_model(Cfg(), (1, 8, 8))


def test_build_model_mlp_flattens_1d_signals():
    net = build_model(from_dict(task="mnist1d-mlp"), (1, 40))
    assert net.net[1].in_features == 40 and net(torch.zeros(2, 1, 40)).shape == (2, 10)


def test_cnn2d_is_two_3x3_convs_with_pooling_and_a_linear_head_for_8x8_and_28x28():
    digits = build_model(from_dict(task="digits-cnn"), (1, 8, 8))
    assert isinstance(digits, CNN2D) and digits(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
    convs = [m for m in digits.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(m.kernel_size, m.out_channels) for m in convs] == [((3, 3), 16), ((3, 3), 32)]
    assert sum(isinstance(m, torch.nn.MaxPool2d) for m in digits.modules()) == 2
    assert digits.classifier[1].in_features == 32 * 2 * 2  # 8 -> 4 -> 2
    mnist = CNN2D(1, (28, 28))
    assert mnist(torch.zeros(3, 1, 28, 28)).shape == (3, 10)
    assert mnist.classifier[1].in_features == 32 * 7 * 7  # 28 -> 14 -> 7
    assert CNN2D(3, (32, 32))(torch.zeros(1, 3, 32, 32)).shape == (1, 10)


def test_cnn2d_rejects_1d_signals_and_tiny_images():
    import pytest

    cfg = from_dict(task="digits-cnn")
    with pytest.raises(ValueError, match=r"`model` is 'cnn2d' but the inputs have shape "
                       r"\(1, 40\)"):
        build_model(cfg, (1, 40))
    with pytest.raises(ValueError, match="needs images of at least 4x4; got 3x3"):
        CNN2D(1, (3, 3))


def test_resnet_is_a_small_residual_cnn_with_batchnorm_for_images_and_signals():
    import pytest

    from qan_ray.models import ResNet

    for task, model, shape in (("digits-mlp", "resnet", (1, 8, 8)),
                               ("cifar10-wrn", "resnet", (3, 32, 32)),
                               ("mnist1d-cnn", "resnet1d", (1, 40))):
        net = build_model(from_dict(task=task, model=model, data_root="."), shape)
        assert isinstance(net, ResNet) and net(torch.zeros(2, *shape)).shape == (2, 10)
        norms = [m for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._NormBase)]
        assert len(norms) == 6  # stem, 2 per block, the widening block's shortcut
        assert sum(p.numel() for p in net.parameters()) < 25_000
    with pytest.raises(ValueError, match="the 2-D residual CNN needs \\(C, H, W\\) images"):
        from_dict(task="mnist1d-cnn", model="resnet")
    with pytest.raises(ValueError, match="the 1-D residual CNN needs 1-D signals"):
        from_dict(task="digits-mlp", model="resnet1d")
    with pytest.raises(ValueError, match="`model` is 'resnet1d' but the inputs have shape"):
        build_model(from_dict(task="mnist1d-cnn", model="resnet1d"), (1, 8, 8))
