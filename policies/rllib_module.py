"""RLlib DQN module whose Q-network is `policies.qnet.plain_qnet` (imports RLlib; the rest of
`policies` does not)."""

from __future__ import annotations

from ray.rllib.algorithms.dqn.torch.default_dqn_torch_rl_module import DefaultDQNTorchRLModule
from ray.rllib.core.columns import Columns
from ray.rllib.core.models.base import ENCODER_OUT
from ray.rllib.utils.schedules.scheduler import Scheduler
from torch import nn

from policies.qnet import DEFAULT_HIDDEN, plain_qnet


class _Encoder(nn.Module):
    """All hidden layers of the Q-MLP (each followed by ReLU)."""

    def __init__(self, obs_size: int, hidden: tuple[int, ...]):
        super().__init__()
        self.mlp = plain_qnet(obs_size, hidden[:-1], hidden[-1])
        self.act = nn.ReLU()

    def forward(self, batch):
        return {ENCODER_OUT: self.act(self.mlp(batch[Columns.OBS]))}


class QMLPModule(DefaultDQNTorchRLModule):
    """RLlib's DQN module with the plain Q-MLP (no dueling, no distributional head); model_config
    key `qan_hidden` sets the hidden widths."""

    def setup(self):
        cfg = self.model_config
        self.uses_dueling, self.num_atoms = False, 1
        self.uses_double_q = cfg["double_q"]
        self.epsilon_schedule = Scheduler(cfg["epsilon"], framework="torch")
        hidden = tuple(cfg.get("qan_hidden", DEFAULT_HIDDEN))
        self.encoder = _Encoder(self.observation_space.shape[0], hidden)
        self.af = nn.Linear(hidden[-1], self.action_space.n)
