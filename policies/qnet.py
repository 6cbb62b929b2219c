"""The controller's Q-network: the paper's small MLP over the feature vector.

`policies.rllib_module.QMLPModule` is the RLlib module meta-training uses (RLlib's DQN module with
this encoder/head, so DQN's target network, double-Q and epsilon-greedy logic stay RLlib's).
`export_qnet` turns its weights into a plain `nn.Sequential` state dict; `Controller` loads it with
`torch.load(weights_only=True)` (no pickle of arbitrary objects from user paths) and acts greedily.
Both forward passes give identical Q-values (tests/test_meta.py checks it).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from qan_ray.contract import ControllerSpec, ObservationSpec, greedy_action

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
    """A trained controller: Q-network + its `ControllerSpec` (observation, actions, origin)."""

    def __init__(self, net: nn.Sequential, spec: ControllerSpec):
        if not isinstance(spec, ControllerSpec):
            raise TypeError(f"spec must be a qan_ray.contract.ControllerSpec, not "
                            f"{type(spec).__name__}; build one with contract.spec_for(cfg, ...).")
        self.net = net.eval()
        self.spec = spec

    @property
    def obs_size(self) -> int:
        return self.spec.obs_size

    @property
    def num_actions(self) -> int:
        return self.spec.num_actions

    @torch.no_grad()
    def q_values(self, obs: np.ndarray) -> np.ndarray:
        x = torch.as_tensor(np.asarray(obs, dtype=np.float32))
        if x.shape[-1] != self.obs_size:
            raise ValueError(f"observation has {x.shape[-1]} features but this controller expects "
                             f"{self.obs_size} (task {self.spec.task.get('task')!r}, format "
                             f"{self.spec.observation.version}). Use a controller of the current "
                             "format ('builtin'), or train one with `qan train`.")
        return self.net(x).numpy()

    def act(self, obs: np.ndarray) -> int:
        """Greedy action (epsilon 0); NaN Q-values are ignored, all-NaN keeps the LR."""
        return greedy_action(self.q_values(obs), self.spec.fallback_action())

    def save(self, folder: str | Path) -> Path:
        """Write qnet.pt and spec.json (each to a temporary name, then renamed)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / (WEIGHTS_FILE + ".tmp")
        torch.save(self.net.state_dict(), tmp)
        os.replace(tmp, folder / WEIGHTS_FILE)
        self.spec.save(folder / (SPEC_FILE + ".tmp"))
        os.replace(folder / (SPEC_FILE + ".tmp"), folder / SPEC_FILE)
        return folder


def load_controller(path: str | Path = "builtin", expect: ObservationSpec | None = None,
                    where: str = "this task") -> Controller:
    """Load an exported controller folder (qnet.pt + spec.json); "builtin" = the shipped one.
    With `expect`, refuse a controller whose observation does not match it (ValueError naming
    both sides and the fix)."""
    folder = BUILTIN if str(path) == "builtin" else Path(path)
    if (folder / "controller").is_dir() and not (folder / SPEC_FILE).exists():
        folder = folder / "controller"  # a `qan train --out` folder
    if not (folder / SPEC_FILE).exists() or not (folder / WEIGHTS_FILE).exists():
        raise FileNotFoundError(f"controller path {str(path)!r} has no {SPEC_FILE} + "
                                f"{WEIGHTS_FILE}. Pass the `controller/` folder written by "
                                "`qan train --out DIR` (or DIR itself), or 'builtin'.")
    spec = ControllerSpec.load(folder / SPEC_FILE)
    if expect is not None:
        spec.check_fits(expect, where)
    net = plain_qnet(spec.obs_size, spec.hidden, spec.num_actions)
    try:
        state = torch.load(folder / WEIGHTS_FILE, weights_only=True)
        inputs = int(state["0.weight"].shape[1])
    except Exception as err:  # noqa: BLE001 - truncated, empty, foreign or garbage file
        raise ValueError(f"{folder / WEIGHTS_FILE} is not a readable controller "
                         f"({type(err).__name__}). It may be truncated or from another run: "
                         "re-export it with `qan train --resume` or restore it from the run "
                         "folder.") from None
    if inputs != spec.obs_size:  # spec.json checked itself on load, so qnet.pt is the odd one
        raise ValueError(f"{folder / WEIGHTS_FILE} takes {inputs} inputs but "
                         f"{folder / SPEC_FILE} describes {spec.obs_size} features: the two files "
                         "are from different controllers. Restore both from the same run "
                         "folder (or re-export with `qan train --resume`).")
    try:
        net.load_state_dict(state)
    except Exception as err:  # noqa: BLE001 - same input width, other hidden/action shapes
        raise ValueError(f"{folder / WEIGHTS_FILE} does not match the network "
                         f"{folder / SPEC_FILE} describes ({type(err).__name__}: the hidden "
                         "widths or the action count differ). Restore both files from the "
                         "same run folder.") from None
    return Controller(net, spec)
