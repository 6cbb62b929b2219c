"""Layers rewritten for the population's vmapped forward: convolutions as one matrix product
each, eval-mode BatchNorm as its affine map.

Under `torch.func.vmap` a convolution whose weight differs per member becomes one grouped
convolution (groups = K) over the members' stacked channels; on a CPU, for the MNIST-1D CNN's
strided 1-D convolutions, that cost about as much as K separate ones, so its population gained
little over K plain loops.
Written as im2col + matmul, the same convolution is a gather of the input patches (channels
last, so the K x B patch rows are contiguous) and one batched matrix product per layer, which
vmap turns into a single `bmm` over the members, and which torch.compile fuses well.

`use_matmul_convs(module)` switches every plain Conv1d/Conv2d of a module (groups 1, zero
padding, integer padding, no dilation) to this form in place (`strided_1d_only`: only Conv1d
layers with a stride above 1); other convolutions keep torch's kernel. Which wins depends on the
layer: on a 2-core CPU at K = 32 (per mini-batch, CPU time) the MNIST-1D CNN's stride-2 1-D
convolutions ran 1.2-1.6x faster as matmuls, while the 3x3 2-D convolutions of the small CNN and
the residual CNNs and the stride-1 1-D convolutions of resnet1d ran 0.5-0.9x; so a population's
default (`PopulationTrainer(conv="auto")`) switches the strided 1-D ones only. The numbers are
the convolution's to float rounding (tests/test_popconv.py compares a member of a population with
its single-network run, which uses torch's convolution).

`use_affine_batchnorm_eval(module)`: in eval mode a BatchNorm layer is the affine map
(x - running_mean) / sqrt(running_var + eps) * weight + bias, written out here because vmap has
no batching rule for eval-mode batch_norm and would run it member by member (3x the cost of K
separate evaluations at K = 32 on the residual CNN). Train mode keeps torch's kernel.
"""

from __future__ import annotations

import types

import torch
from torch import nn
from torch.nn import functional as F


def patch_index(size: tuple[int, ...], kernel: tuple[int, ...], stride: tuple[int, ...],
                device: torch.device) -> torch.Tensor:
    """Flat indices into a (padded) input of spatial `size` of every output position's kernel
    patch, row-major over (output positions, kernel offsets): shape (prod(out) * prod(kernel),)."""
    d = len(size)
    index = torch.zeros((1,) * 2 * d, dtype=torch.long, device=device)
    step = 1
    for i in reversed(range(d)):  # offset (o, j) along dim i: (o * stride + j) * step
        out = (size[i] - kernel[i]) // stride[i] + 1
        shape_o, shape_j = [1] * 2 * d, [1] * 2 * d
        shape_o[i], shape_j[d + i] = out, kernel[i]
        index = (index + (torch.arange(out, device=device) * stride[i] * step).view(shape_o)
                 + (torch.arange(kernel[i], device=device) * step).view(shape_j))
        step *= size[i]
    return index.reshape(-1)


def matmul_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                stride: tuple[int, ...], padding: tuple[int, ...],
                cache: dict | None = None) -> torch.Tensor:
    """F.conv1d / F.conv2d (groups 1, zero padding) as im2col + one matmul. x: (B, C, *S)."""
    d = x.dim() - 2
    kernel = tuple(weight.shape[2:])
    last = x.movedim(1, -1)  # (B, *S, C): patch rows contiguous in C
    if any(padding):
        pads = [0, 0]
        for p in reversed(padding):
            pads += [p, p]
        last = F.pad(last, pads)
    size = tuple(last.shape[1:1 + d])
    out_size = tuple((n - k) // s + 1 for n, k, s in zip(size, kernel, stride))
    if cache is None or torch.compiler.is_compiling():  # a traced index is a constant there
        index = patch_index(size, kernel, stride, x.device)
    else:
        key = (size, kernel, stride, x.device)
        index = cache.get(key)
        if index is None:
            index = cache[key] = patch_index(size, kernel, stride, x.device)
    batch, channels = last.shape[0], last.shape[-1]
    positions, taps = 1, 1
    for n in out_size:
        positions *= n
    for k in kernel:
        taps *= k
    cols = last.reshape(batch, -1, channels).index_select(1, index)  # (B, P * T, C)
    cols = cols.reshape(batch * positions, taps * channels)
    w = weight.movedim(1, -1).reshape(weight.shape[0], taps * channels)  # (O, T * C)
    out = cols @ w.t()
    if bias is not None:
        out = out + bias
    return out.reshape(batch, *out_size, -1).movedim(-1, 1)  # (B, O, *S'), channels last


def _forward(self, input: torch.Tensor, weight: torch.Tensor,
             bias: torch.Tensor | None) -> torch.Tensor:
    return matmul_conv(input, weight, bias, self.stride, self.padding, self._patch_cache)


def convertible(m: nn.Module) -> bool:
    """A Conv1d/Conv2d that `matmul_conv` computes exactly as torch does."""
    return (isinstance(m, (nn.Conv1d, nn.Conv2d)) and m.groups == 1
            and m.padding_mode == "zeros" and not isinstance(m.padding, str)
            and all(d == 1 for d in m.dilation))


def use_matmul_convs(module: nn.Module, strided_1d_only: bool = False) -> int:
    """Switch the module's convertible convolutions (`strided_1d_only`: those that are Conv1d with
    a stride above 1) to `matmul_conv` in place; returns how many."""
    count = 0
    for m in module.modules():
        if convertible(m) and (not strided_1d_only
                               or (isinstance(m, nn.Conv1d) and m.stride[0] > 1)):
            m._patch_cache = {}
            m._conv_forward = types.MethodType(_forward, m)
            count += 1
    return count


def switched(module: nn.Module) -> int:
    """How many of the module's convolutions compute by `matmul_conv`."""
    return sum(hasattr(m, "_patch_cache") for m in module.modules())


def _affine_batchnorm(self, x: torch.Tensor) -> torch.Tensor:
    if self.training or self.running_mean is None or self.running_var is None:
        return type(self).forward(self, x)
    shape = (1, -1) + (1,) * (x.dim() - 2)
    scale = torch.rsqrt(self.running_var + self.eps)
    if self.weight is not None:
        scale = scale * self.weight
    y = (x - self.running_mean.view(shape)) * scale.view(shape)
    return y if self.bias is None else y + self.bias.view(shape)


def use_affine_batchnorm_eval(module: nn.Module) -> int:
    """Switch the module's BatchNorm layers to `_affine_batchnorm` in eval mode, in place;
    returns how many."""
    count = 0
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.forward = types.MethodType(_affine_batchnorm, m)
            count += 1
    return count
