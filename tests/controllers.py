"""Deterministic controllers for tests: zero weights, and a last-layer bias that makes one action
win for every observation, so the greedy action (and so every LR) is known exactly."""

from __future__ import annotations

import torch

from policies.qnet import Controller, plain_qnet
from qan_ray.config import from_dict
from qan_ray.contract import spec_for

LR_FACTORS = (0.5, 0.9, 1.0, 1.1, 2.0)
LABELS = ["x0.5", "x0.9", "keep", "x1.1", "x2"]


def fixed_action_controller(action: int = 0, lr_min: float = 1e-5, lr_max: float = 1.0,
                            with_weights: bool = True, action_mode: str = "lr",
                            lr_schedule: str = "constant") -> Controller:
    """A controller of the current observation format whose greedy action is always `action`
    (default 0: x0.5)."""
    cfg = from_dict(task="digits-mlp", lr_factors=LR_FACTORS, lr_min=lr_min, lr_max=lr_max,
                    lr=min(max(0.05, lr_min), lr_max), weight_features=with_weights,
                    action_mode=action_mode, lr_schedule=lr_schedule)
    spec = spec_for(cfg, (4,), {"episodes": 0, "command": "tests/controllers.py"})
    net = plain_qnet(spec.obs_size, (4,), spec.num_actions)
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()
        net[-1].bias[action] = 1.0
    return Controller(net, spec)
