"""The controller's Q-network: the paper's small MLP over the feature vector.

`policies.rllib_module.QMLPModule` is the RLlib module meta-training uses (RLlib's DQN module with
this encoder/head, so DQN's target network, double-Q and epsilon-greedy logic stay RLlib's).
`export_qnet` turns its weights into a plain `nn.Sequential` state dict; `Controller` loads it with
`torch.load(weights_only=True)` (no pickle of arbitrary objects from user paths) and acts greedily.
Both forward passes give identical Q-values (tests/test_meta.py checks it).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

DEFAULT_HIDDEN = (64, 64)
WEIGHTS_FILE = "qnet.pt"
SPEC_FILE = "spec.json"
BUILTIN = Path(__file__).parent / "builtin"


def plain_qnet(obs_size: int, hidden: tuple[int, ...], num_actions: int) -> nn.Sequential:
    """Linear-ReLU stack ending in a linear Q head: indices 0, 2, 4, ... are the Linear layers."""
    dims = [obs_size, *hidden, num_actions]
    layers: list[nn.Module] = []
    for i in range(len(dims) - 1):
        layers.append(nn.Linear(dims[i], dims[i + 1]))
        if i < len(dims) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def export_qnet(module_state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """RLlib QMLPModule state (torch or numpy values) -> `plain_qnet` state dict."""
    keys = [k for k in module_state if not k.startswith("_target") and k.endswith(".weight")]
    enc = sorted((k for k in keys if k.startswith("encoder.mlp.")),
                 key=lambda k: int(k.split(".")[2]))
    out: dict[str, torch.Tensor] = {}
    for i, k in enumerate([*enc, "af.weight"]):
        base = k[: -len(".weight")]
        for part in ("weight", "bias"):
            out[f"{2 * i}.{part}"] = torch.as_tensor(np.asarray(module_state[f"{base}.{part}"]))
    return out


class Controller:
    """A trained controller: Q-network + its spec (feature size, actions, task config)."""

    def __init__(self, net: nn.Sequential, spec: dict[str, Any]):
        self.net = net.eval()
        self.spec = spec

    @property
    def obs_size(self) -> int:
        return int(self.spec["obs_size"])

    @property
    def num_actions(self) -> int:
        return int(self.spec["num_actions"])

    @torch.no_grad()
    def q_values(self, obs: np.ndarray) -> np.ndarray:
        x = torch.as_tensor(np.asarray(obs, dtype=np.float32))
        if x.shape[-1] != self.obs_size:
            raise ValueError(f"observation has {x.shape[-1]} features but this controller expects "
                             f"{self.obs_size} (task {self.spec.get('qan', {}).get('task')!r}, "
                             "monitored layers must match). Use a controller trained on the same "
                             "model architecture, or train one with `qan train`.")
        return self.net(x).numpy()

    def act(self, obs: np.ndarray) -> int:
        """Greedy action (epsilon 0)."""
        return int(np.argmax(self.q_values(obs)))

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(self.net.state_dict(), folder / WEIGHTS_FILE)
        (folder / SPEC_FILE).write_text(json.dumps(self.spec, indent=2, default=str))
        return folder


def load_controller(path: str | Path = "builtin") -> Controller:
    """Load an exported controller folder (qnet.pt + spec.json); "builtin" = the shipped one."""
    folder = BUILTIN if str(path) == "builtin" else Path(path)
    if (folder / "controller").is_dir() and not (folder / SPEC_FILE).exists():
        folder = folder / "controller"  # a `qan train --out` folder
    if not (folder / SPEC_FILE).exists() or not (folder / WEIGHTS_FILE).exists():
        raise FileNotFoundError(f"controller path {str(path)!r} has no {SPEC_FILE} + "
                                f"{WEIGHTS_FILE}. Pass the `controller/` folder written by "
                                "`qan train --out DIR` (or DIR itself), or 'builtin'.")
    spec = json.loads((folder / SPEC_FILE).read_text())
    net = plain_qnet(int(spec["obs_size"]), tuple(spec["hidden"]), int(spec["num_actions"]))
    net.load_state_dict(torch.load(folder / WEIGHTS_FILE, weights_only=True))
    return Controller(net, spec)
