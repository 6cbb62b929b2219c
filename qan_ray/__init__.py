"""qan-ray: QAN (Fu et al. 2016) on Ray -- a learned controller that drives NN training.

The public names are imported lazily (PEP 562 `__getattr__`), so `import qan_ray` stays cheap
and imports neither Ray nor torch; `from qan_ray import QANScheduler` imports Ray Tune then.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = ["QANConfig", "QANScheduler", "TargetTrainer", "TargetTrainingEnv", "UserTask"]

_LAZY = {
    "QANConfig": "qan_ray.config",
    "QANScheduler": "qan_ray.scheduler",
    "TargetTrainer": "qan_ray.trainer",
    "TargetTrainingEnv": "qan_ray.env",
    "UserTask": "qan_ray.tasks",
}

if TYPE_CHECKING:  # for type checkers and IDEs only; never executed
    from qan_ray.config import QANConfig
    from qan_ray.env import TargetTrainingEnv
    from qan_ray.scheduler import QANScheduler
    from qan_ray.tasks import UserTask
    from qan_ray.trainer import TargetTrainer


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # cache: later lookups skip this hook
        return value
    raise AttributeError(f"module 'qan_ray' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
