"""Your own model and data as a task: `--task my_pkg.my_module:make_task`.

A user task is a function that takes no arguments and returns a `UserTask`: a model factory, the
data as tensors (or torch/torchvision datasets, turned into tensors by `tensors_from_dataset`) and
optimizer settings. Everywhere a preset name works, "module:function" works too: `qan train`,
`qan evaluate`, `qan tune`/`qan compare`, `qan_ray.distribution.load_config(task=...)`,
`TargetTrainer` and `TargetTrainingEnv`.

The function is imported by name (importlib) and called once per process, in every process that
builds a trainer: the driver, the Ray trainer actors and the Tune trials. Its module must therefore
be importable on every Ray node. It is looked up on sys.path, then in the current directory; Ray
puts the driver's working directory on the path of local workers too. On a cluster ship it with
`ray job submit --working-dir .` or `ray.init(runtime_env={"py_modules": [my_pkg]})`. See
docs/user_tasks.md.

Data rules (checked here, each broken rule raises a ValueError that names the value and the fix):
- `x` is a floating tensor (N, ...) of finite values (cast to float32); `y` an integer tensor (N,)
  of class indices in 0..9 (`qan_ray.constants.NUM_CLASSES`: 10 classes everywhere in the project).
- val/test inputs have the train inputs' shape per sample.
- `val=None`: `val_fraction` of train is held out by `data_seed`, as for the presets.
  `test=None`: a fixed fifth of train is held out first (seed 12345, independent of `data_seed`,
  as for the embedded digits), so the test set never moves.
- The data is used as given: no normalisation (do it in the function).
- `model()` returns a fresh `nn.Module` at every call whose output on a batch is (B, k) logits
  with k > the largest label.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from qan_ray.config import QANConfig, is_user_task  # noqa: F401 - is_user_task re-exported
from qan_ray.constants import NUM_CLASSES

DOCS = "see docs/user_tasks.md"
# QANConfig fields a task may not set: they are what the task itself stands for.
RESERVED_KEYS = ("task", "dataset", "model", "data_root", "download")

Split = tuple[torch.Tensor, torch.Tensor]


@dataclass
class UserTask:
    """What a `module:function` task returns."""

    model: Callable[[], nn.Module]
    """Factory of a fresh network: called once per episode, after the episode's seed is set."""
    train: Any
    """(x, y) tensors (or numpy arrays), or a torch Dataset of (x, y) items."""
    val: Any = None
    """Like train, or None: `val_fraction` of train is held out by `data_seed`."""
    test: Any = None
    """Like train, or None: a fixed fifth of train is held out (seed 12345)."""
    config: dict[str, Any] = field(default_factory=dict)
    """Defaults of QANConfig fields (optimizer, lr, momentum, batch_size, epochs_per_episode,
    control_interval, ...), like a preset's; explicit values win."""


def tensors_from_dataset(dataset: Any, limit: int | None = None) -> Split:
    """(x, y) tensors of every (x, y) item of a torch/torchvision Dataset, in order.

    Items may be tensors, numpy arrays or PIL images (converted like torchvision's ToTensor:
    float in [0, 1], channels first); labels ints or 0-d tensors. `limit` keeps the first items.
    For big datasets this runs once per process; save the tensors (torch.save) if it is slow.
    """
    try:
        n = len(dataset)
    except TypeError as err:
        raise ValueError(f"dataset {type(dataset).__name__} has no len(); tensors_from_dataset "
                         "needs a map-style torch Dataset (ds[i] -> (x, y)). Pass (x, y) tensors "
                         "instead.") from err
    n = n if limit is None else min(n, int(limit))
    if n < 1:
        raise ValueError(f"dataset {type(dataset).__name__} is empty; it must hold >= 1 item.")
    xs, ys = [], []
    for i in range(n):
        item = dataset[i]
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise ValueError(f"item {i} of dataset {type(dataset).__name__} is a "
                             f"{type(item).__name__}; every item must be an (x, y) pair. Wrap "
                             "the dataset so that ds[i] returns (input, label).")
        xs.append(_as_input(item[0], i))
        ys.append(int(item[1]))
    return torch.stack(xs), torch.tensor(ys, dtype=torch.long)


def _as_input(x: Any, i: int) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, np.ndarray):
        return torch.from_numpy(x)
    if type(x).__module__.startswith("PIL."):
        from torchvision.transforms.functional import to_tensor

        return to_tensor(x)
    raise ValueError(f"item {i}'s input is a {type(x).__name__}; it must be a tensor, a numpy "
                     "array or a PIL image. Give the dataset transform=ToTensor().")


def parse_task(task: str) -> tuple[str, str]:
    """("pkg.mod", "fn") of "pkg.mod:fn"; a ValueError naming the value otherwise."""
    module, sep, attr = str(task).partition(":")
    if not sep or not module or not attr or ":" in attr:
        raise ValueError(
            f"`task` is {task!r}; a task of your own must be written 'module:function' (one "
            "colon, e.g. my_pkg.my_module:make_task). Fix the spelling, or use a preset name "
            f"({DOCS}).")
    return module, attr


@functools.lru_cache(maxsize=8)
def load_user_task(task: str) -> UserTask:
    """Import and call the `module:function` task, check what it returns and return it with
    tensor splits ((float32 x, int64 y) on the CPU, val/test None when not given).

    Cached per process: the function runs once per process and task string. The caller's torch
    RNG state is left untouched (the import, the call and the model check run under a forked
    RNG).
    """
    module_name, attr = parse_task(task)
    with torch.random.fork_rng(devices=[]):  # importing or calling may draw random numbers
        return _resolve(task, module_name, attr)


def _resolve(task: str, module_name: str, attr: str) -> UserTask:
    try:
        module = _import(module_name)
    except ImportError as err:
        missing = getattr(err, "name", None)
        if missing and (module_name == missing or module_name.startswith(missing + ".")):
            where = f"module {module_name!r} is not importable here ({err})"
        else:
            where = f"importing module {module_name!r} failed: {err}"
        raise ValueError(
            f"`task` is {task!r}, but {where}. The module must be importable on every Ray node: "
            "put its folder on PYTHONPATH (or pip install it), and on a cluster ship it with "
            "`ray job submit --working-dir .` or ray.init(runtime_env={'py_modules': [...]}) "
            f"({DOCS}).") from err
    if not hasattr(module, attr):
        public = sorted(n for n in vars(module) if not n.startswith("_")
                        and callable(getattr(module, n)))
        raise ValueError(f"`task` is {task!r}, but module {module_name!r} has no attribute "
                         f"{attr!r}. Name one of its functions: {public[:12]}.")
    fn = getattr(module, attr)
    if not callable(fn):
        raise ValueError(f"`task` is {task!r}, but {module_name}.{attr} is a "
                         f"{type(fn).__name__}, not callable. Point the task at a function that "
                         "takes no arguments and returns a qan_ray.tasks.UserTask.")
    returned = fn()
    if not isinstance(returned, UserTask):
        raise ValueError(f"`task` {task!r} returned a {type(returned).__name__}; it must "
                         "return a qan_ray.tasks.UserTask(model=..., train=(x, y), ...) "
                         f"({DOCS}).")
    return _checked(task, returned)


def _import(module_name: str):
    """importlib.import_module, falling back to the current directory (as `python -m` and
    uvicorn's module:app do), so `qan train --task my_tasks:make_task` finds ./my_tasks.py."""
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        top = module_name.split(".")[0]
        cwd = os.getcwd()
        if err.name != top or cwd in sys.path or "" in sys.path:
            raise
        sys.path.append(cwd)  # appended: never shadows an installed package
        importlib.invalidate_caches()
        return importlib.import_module(module_name)


def _checked(task: str, ut: UserTask) -> UserTask:
    train = _split(task, "train", ut.train)
    val = None if ut.val is None else _split(task, "val", ut.val)
    test = None if ut.test is None else _split(task, "test", ut.test)
    shape = tuple(train[0].shape[1:])
    for name, s in (("val", val), ("test", test)):
        if s is not None and tuple(s[0].shape[1:]) != shape:
            raise ValueError(f"task {task!r}: {name} inputs have shape {tuple(s[0].shape[1:])} "
                             f"per sample but train inputs have {shape}; every split must have "
                             "the same input shape. Preprocess the splits alike.")
    if not isinstance(ut.config, dict):
        raise ValueError(f"task {task!r}: UserTask.config is a {type(ut.config).__name__}; it "
                         "must be a dict of QANConfig fields, e.g. {'lr': 0.05}.")
    fields = {f.name for f in dataclasses.fields(QANConfig)}
    reserved = sorted(set(ut.config) & set(RESERVED_KEYS))
    if reserved:
        raise ValueError(f"task {task!r}: UserTask.config sets {reserved}; the task itself "
                         "supplies the model and the data, so these keys are not allowed. "
                         "Remove them from the config dict.")
    unknown = sorted(set(ut.config) - fields)
    if unknown:
        raise ValueError(f"task {task!r}: UserTask.config has unknown key(s) {unknown}; valid "
                         f"keys are the QANConfig fields {sorted(fields - set(RESERVED_KEYS))}. "
                         "Check the spelling (underscores, e.g. control_interval).")
    _check_model(task, ut.model, train)
    return UserTask(model=ut.model, train=train, val=val, test=test, config=dict(ut.config))


def _split(task: str, name: str, value: Any) -> Split:
    if isinstance(value, torch.utils.data.Dataset):
        value = tensors_from_dataset(value)
    if not (isinstance(value, (tuple, list)) and len(value) == 2):
        raise ValueError(f"task {task!r}: {name} is a {type(value).__name__}; it must be an "
                         "(x, y) pair of tensors or a torch Dataset. Return e.g. "
                         f"UserTask(..., {name}=(x, y)).")
    x, y = (torch.as_tensor(v) if isinstance(v, np.ndarray) else v for v in value)
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise ValueError(f"task {task!r}: {name} holds ({type(x).__name__}, "
                         f"{type(y).__name__}); both must be torch tensors (or numpy arrays). "
                         "Use torch.as_tensor, or tensors_from_dataset(ds) for a Dataset.")
    if not x.is_floating_point():
        raise ValueError(f"task {task!r}: {name} inputs have dtype {x.dtype}; they must be "
                         "floating point. Convert them, e.g. x.float() / 255 for uint8 images.")
    if x.ndim < 2 or x.shape[0] < 1:
        raise ValueError(f"task {task!r}: {name} inputs have shape {tuple(x.shape)}; they must "
                         "be (N, ...) with N >= 1 samples and at least one feature dimension. "
                         "Add a feature axis, e.g. x[:, None].")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise ValueError(f"task {task!r}: {name} labels have dtype {y.dtype}; they must be "
                         "integer class indices. Convert them with y.long().")
    if y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise ValueError(f"task {task!r}: {name} labels have shape {tuple(y.shape)} for "
                         f"{x.shape[0]} inputs; they must be (N,), one class index per input. "
                         "Use y.reshape(-1), or argmax one-hot labels.")
    low, high = int(y.min()), int(y.max())
    if low < 0 or high >= NUM_CLASSES:
        raise ValueError(f"task {task!r}: {name} labels span {low}..{high}; they must lie in "
                         f"0..{NUM_CLASSES - 1}, since qan-ray uses {NUM_CLASSES} classes "
                         "everywhere (qan_ray.data.NUM_CLASSES, the minibatch actions pick one "
                         "of them). Map the labels onto 0..9.")
    x = x.detach().to("cpu", torch.float32)
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"task {task!r}: {name} inputs contain NaN or inf; they must be "
                         "finite. Clean or impute them in the task function.")
    return x.contiguous(), y.detach().to("cpu", torch.long).contiguous()


def _check_model(task: str, factory: Any, train: Split) -> None:
    if isinstance(factory, nn.Module) or not callable(factory):
        raise ValueError(f"task {task!r}: UserTask.model is a {type(factory).__name__}; it must "
                         "be a factory that builds a fresh network, e.g. model=lambda: MyNet() "
                         "(every episode starts from a new, seeded init).")
    first, second = factory(), factory()
    for net in (first, second):
        if not isinstance(net, nn.Module):
            raise ValueError(f"task {task!r}: UserTask.model() returned a "
                             f"{type(net).__name__}; it must return a torch.nn.Module.")
    if first is second:
        raise ValueError(f"task {task!r}: UserTask.model() returned the same module twice; it "
                         "must build a new one at every call (e.g. model=lambda: MyNet()).")
    x, y = train
    first.eval()
    try:
        with torch.no_grad():
            out = first(x[:2])
    except Exception as err:  # noqa: BLE001 - any failure here is the user's shape contract
        raise ValueError(f"task {task!r}: the model failed on a batch of train inputs of shape "
                         f"{tuple(x[:2].shape)}: {type(err).__name__}: {err}. Make the model "
                         "accept (batch, *input_shape) inputs.") from err
    need = int(y.max()) + 1
    if not (isinstance(out, torch.Tensor) and out.ndim == 2 and out.shape[1] >= need):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"task {task!r}: the model's output on 2 inputs is {got}; it must be "
                         f"(2, k) class logits with k >= {need} (the labels reach {need - 1}). "
                         f"End the model with nn.Linear(..., {NUM_CLASSES}).")
