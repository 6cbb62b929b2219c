"""A task of your own, as docs/user_tasks.md shows it: `--task user_task_example:make_task`.

A 2-conv CNN (not a preset model) on scikit-learn's embedded 8x8 digits as (N, 1, 8, 8) tensors,
so it runs without downloads. The tests put this folder on PYTHONPATH.
"""

from __future__ import annotations

# --- docs/user_tasks.md: begin
import torch
from sklearn.datasets import load_digits
from torch import nn

from qan_ray import UserTask


def small_cnn() -> nn.Module:  # called once per episode: a fresh, seeded init
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 8 -> 4
                         nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 4 -> 2
                         nn.Flatten(), nn.Linear(16 * 2 * 2, 10))


def make_task() -> UserTask:
    digits = load_digits()  # 1,797 images, shipped inside scikit-learn
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N, 1, 8, 8)
    y = torch.tensor(digits.target)  # class indices 0..9
    i = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))  # the file is
    x, y = x[i], y[i]  # ordered, not random: shuffle (seeded) before splitting
    return UserTask(model=small_cnn, train=(x[:1400], y[:1400]), test=(x[1400:], y[1400:]),
                    config={"optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "batch_size": 32,
                            "epochs_per_episode": 4.0, "control_interval": 35})
# --- docs/user_tasks.md: end


def not_a_task() -> dict:
    """Returns the wrong type (for the error-message tests)."""
    return {"model": small_cnn}


NOT_CALLABLE = 42
