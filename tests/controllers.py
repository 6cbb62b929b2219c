"""Deterministic controllers for tests: zero weights, and a last-layer bias that makes one action
win for every observation, so the greedy action (and so every LR) is known exactly."""

from __future__ import annotations

import torch

from policies.qnet import Controller, plain_qnet

LR_FACTORS = (0.5, 0.9, 1.0, 1.1, 2.0)
LABELS = ["x0.5", "x0.9", "keep", "x1.1", "x2"]


def fixed_action_controller(obs_size: int, action: int = 0, lr_min: float = 1e-5,
                            lr_max: float = 1.0) -> Controller:
    """A controller whose greedy action is always `action` (default 0: x0.5)."""
    net = plain_qnet(obs_size, (4,), len(LR_FACTORS))
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()
        net[-1].bias[action] = 1.0
    spec = {"obs_size": obs_size, "num_actions": len(LR_FACTORS), "hidden": [4],
            "action_labels": LABELS, "action_mode": "lr",
            "qan": {"lr_factors": list(LR_FACTORS), "restart_lr": None, "lr_min": lr_min,
                    "lr_max": lr_max}}
    return Controller(net, spec)
