"""Target networks: an MLP, the paper's LeNet-style MNIST CNN, the MNIST-1D paper's small 1-D CNN,
a small 2-D CNN for any image size, a small residual CNN with BatchNorm (2-D and 1-D) and
WideResNet WRN-d-k (plus the model factory of a
`module:function` user task, qan_ray.tasks)."""

from __future__ import annotations

import math

import torch
from torch import nn

from qan_ray.constants import NUM_CLASSES


class MLP(nn.Module):
    def __init__(self, in_features: int, hidden: tuple[int, ...], num_classes: int = NUM_CLASSES):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class LeNet(nn.Module):
    """Fu et al. (2016) MNIST net: conv32 5x5 tanh, maxpool, conv64 5x5 tanh, maxpool, FC200 tanh,
    FC10 (28x28 input -> 24 -> 12 -> 8 -> 4)."""

    def __init__(self, in_channels: int = 1, num_classes: int = NUM_CLASSES, image_size: int = 28):
        super().__init__()
        side = ((image_size - 4) // 2 - 4) // 2
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, 5), nn.Tanh(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 5), nn.Tanh(), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(64 * side * side, 200), nn.Tanh(), nn.Linear(200, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class CNN1D(nn.Module):
    """The MNIST-1D benchmark CNN (Greydanus 2020, `ConvBase`): conv 25 k5 s2 p1, conv 25 k3 s2 p1,
    conv 25 k3 s2 p1, each with ReLU, then Linear to the classes (length 40 -> 19 -> 10 -> 5, so
    25 x 5 = 125 features)."""

    def __init__(self, in_channels: int = 1, length: int = 40, num_classes: int = NUM_CLASSES,
                 channels: int = 25):
        super().__init__()
        layers: list[nn.Module] = []
        cin, size = in_channels, length
        for kernel in (5, 3, 3):
            layers += [nn.Conv1d(cin, channels, kernel, stride=2, padding=1), nn.ReLU()]
            cin, size = channels, (size + 2 - kernel) // 2 + 1
        if size < 1:
            raise ValueError(f"the 1-D CNN needs signals of length >= 3; got length {length}. "
                             "Use --model mlp for shorter inputs.")
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(channels * size, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class CNN2D(nn.Module):
    """A small 2-D CNN for images of any size >= 4x4 (8x8 digits, 28x28 MNIST, 32x32 CIFAR):
    conv `channels` 3x3 p1, ReLU, maxpool 2, conv 2 x `channels` 3x3 p1, ReLU, maxpool 2, then
    Linear to the classes (8x8 -> 4 -> 2, so 32 x 2 x 2 = 128 features; 28x28 -> 14 -> 7)."""

    def __init__(self, in_channels: int = 1, image_size: tuple[int, int] = (8, 8),
                 num_classes: int = NUM_CLASSES, channels: int = 16):
        super().__init__()
        h, w = image_size
        if h < 4 or w < 4:
            raise ValueError(f"the 2-D CNN pools twice by 2, so it needs images of at least 4x4; "
                             f"got {h}x{w}. Use --model mlp for smaller inputs.")
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, channels, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(channels, 2 * channels, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(2 * channels * (h // 4) * (w // 4), num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class _ResBlock(nn.Module):
    """A post-activation basic block (He et al. 2016): conv 3 - BN - ReLU - conv 3 - BN, plus the
    input (or its 1x1 conv + BN where the stride or width changes), then ReLU."""

    def __init__(self, dims: int, cin: int, cout: int, stride: int):
        super().__init__()
        conv = nn.Conv1d if dims == 1 else nn.Conv2d
        norm = nn.BatchNorm1d if dims == 1 else nn.BatchNorm2d
        self.conv1 = conv(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = norm(cout)
        self.conv2 = conv(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = norm(cout)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(conv(cin, cout, 1, stride, 0, bias=False), norm(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(y + (self.shortcut(x) if self.shortcut is not None else x))


class ResNet(nn.Module):
    """A small residual CNN with BatchNorm for 2-D images (`dims` 2, model "resnet") or 1-D
    signals (`dims` 1, model "resnet1d"): a 3-wide conv stem of `channels` + BN + ReLU (stride 2
    on signals), a basic block at that width, a basic block at twice the width with stride 2,
    global average pooling, Linear to the classes. About 20k weights at 16 channels (8x8
    digits: 8x8 -> 4x4; MNIST-1D's 40 samples: 20 -> 10)."""

    def __init__(self, dims: int = 2, in_channels: int = 1, num_classes: int = NUM_CLASSES,
                 channels: int = 16):
        super().__init__()
        if dims not in (1, 2):
            raise ValueError(f"ResNet dims is {dims}; it must be 1 (signals) or 2 (images).")
        conv = nn.Conv1d if dims == 1 else nn.Conv2d
        norm = nn.BatchNorm1d if dims == 1 else nn.BatchNorm2d
        self.stem = nn.Sequential(conv(in_channels, channels, 3, 2 if dims == 1 else 1, 1,
                                       bias=False), norm(channels), nn.ReLU())
        self.blocks = nn.Sequential(_ResBlock(dims, channels, channels, 1),
                                    _ResBlock(dims, channels, 2 * channels, 2))
        self.fc = nn.Linear(2 * channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.blocks(self.stem(x))
        return self.fc(y.mean(dim=tuple(range(2, y.dim()))))


class _WideBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Conv2d(cin, cout, 1, stride, 0, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = torch.relu(self.bn1(x))
        y = self.conv1(o)
        y = self.conv2(torch.relu(self.bn2(y)))
        return y + (self.shortcut(o) if self.shortcut is not None else x)


class WideResNet(nn.Module):
    """WRN-depth-k (Zagoruyko & Komodakis 2016), pre-activation blocks; depth = 6n + 4."""

    def __init__(self, depth: int = 16, width: int = 4, in_channels: int = 3,
                 num_classes: int = NUM_CLASSES):
        super().__init__()
        n = (depth - 4) // 6
        widths = [16, 16 * width, 32 * width, 64 * width]
        self.conv = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        blocks: list[nn.Module] = []
        cin = widths[0]
        for stage, cout in enumerate(widths[1:]):
            for i in range(n):
                blocks.append(_WideBlock(cin, cout, 2 if (stage > 0 and i == 0) else 1))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(cin)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn(self.blocks(self.conv(x))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(y, 1), 1))


def build_model(cfg, input_shape: tuple[int, ...], num_classes: int = NUM_CLASSES) -> nn.Module:
    """The target network named by cfg.model for inputs of shape (C, H, W) (images) or (C, L)
    (1-D signals: mlp, cnn1d); for a `module:function` task (model "user"), a fresh network from
    the task's model factory."""
    if cfg.model == "user":
        from qan_ray.tasks import load_user_task

        return load_user_task(cfg.task).model()
    if cfg.model == "mlp":
        return MLP(math.prod(input_shape), tuple(cfg.hidden), num_classes)
    if cfg.model == "cnn1d":
        if len(input_shape) != 2:
            raise ValueError(f"`model` is 'cnn1d' but the inputs have shape {input_shape} per "
                             "sample; the 1-D CNN needs (channels, length) signals such as "
                             "mnist1d's (1, 40). Use --task mnist1d-cnn, or --model mlp.")
        return CNN1D(input_shape[0], input_shape[1], num_classes)
    if cfg.model == "resnet1d":
        if len(input_shape) != 2:
            raise ValueError(f"`model` is 'resnet1d' but the inputs have shape {input_shape} per "
                             "sample; it needs (channels, length) signals such as mnist1d's "
                             "(1, 40). Use --model resnet for images.")
        return ResNet(1, input_shape[0], num_classes)
    if cfg.model not in ("lenet", "cnn2d", "wrn", "resnet"):
        raise ValueError(f"`model` is {cfg.model!r}; it must be mlp, lenet, cnn1d, cnn2d, resnet, "
                         "resnet1d or wrn (or user, with a module:function task). Try --model "
                         "mlp.")
    c, h, w = _image_shape(cfg.model, input_shape)
    if cfg.model == "lenet":
        return LeNet(c, num_classes, h)
    if cfg.model == "cnn2d":
        return CNN2D(c, (h, w), num_classes)
    if cfg.model == "resnet":
        return ResNet(2, c, num_classes)
    return WideResNet(cfg.wrn_depth, cfg.wrn_width, c, num_classes)


def _image_shape(model: str, input_shape: tuple[int, ...]) -> tuple[int, int, int]:
    if len(input_shape) != 3:
        raise ValueError(f"`model` is {model!r} but the inputs have shape {input_shape} per "
                         "sample; it needs (C, H, W) images. Use --model cnn1d or mlp for 1-D "
                         "signals.")
    c, h, w = input_shape
    return c, h, w
