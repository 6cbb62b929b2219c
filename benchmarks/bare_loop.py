"""The bare PyTorch loop the speed benchmarks compare the project's trainer against: one
`nn.Module`, `torch.optim.SGD`/`Adam` with the task's settings, an on-device permutation per
epoch, `F.cross_entropy`, an on-device running loss read once at the end -- the way a careful
PyTorch loop trains one network."""

from __future__ import annotations

import torch
from torch.nn import functional as F

from qan_ray.data import NUM_CLASSES
from qan_ray.models import build_model


def torch_optimizer(cfg, params) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                           weight_decay=cfg.weight_decay)


def bare_member(cfg, data, device, seed: int):
    """(model, optimizer, generator) of one network, seeded like a trainer member."""
    torch.manual_seed(seed)
    model = build_model(cfg, data.input_shape, NUM_CLASSES).to(device)
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return model, torch_optimizer(cfg, model.parameters()), gen


def bare_train(model, opt, gen, cfg, data, device, batches: int) -> float:
    """`batches` mini-batches of one network; the mean loss (the one host read)."""
    n, b = data.n_train, min(cfg.batch_size, data.n_train)
    perm, pos = torch.randperm(n, device=device, generator=gen), 0
    running = torch.zeros((), device=device)
    model.train()
    for _ in range(batches):
        if pos + b > n:
            perm, pos = torch.randperm(n, device=device, generator=gen), 0
        idx = perm[pos:pos + b]
        pos += b
        loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        running += loss.detach()
    return float(running) / max(1, batches)
