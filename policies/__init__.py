"""Controller Q-networks (the RLlib module used in meta-training and its plain-torch export) and
shipped pretrained controllers."""

from policies.qnet import Controller, load_controller

__all__ = ["Controller", "load_controller"]
