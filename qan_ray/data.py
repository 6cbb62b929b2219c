"""Datasets as tensors on the training device.

A dataset is loaded once, normalised, split by a fixed seed and moved to the device. Batches are
index slices of an on-device permutation (no DataLoader, no host copies per step). Per-class index
tensors, padded into one matrix, serve mini-batch class selection.

Sources: scikit-learn's embedded 8x8 digits (no download), MNIST-1D (Greydanus 2020) built by
the `mnist1d` package's procedural generator (no download), torchvision's MNIST, Fashion-MNIST
and CIFAR-10 dataset classes reading their standard on-disk formats from `data_root`, and the
tensors of a `module:function` user task (qan_ray.tasks).
"""

from __future__ import annotations

import functools
import math
import os
import random
from dataclasses import dataclass

import numpy as np
import torch

from qan_ray.config import is_user_task
from qan_ray.constants import NUM_CLASSES


@dataclass
class DeviceData:
    """Train/validation/test tensors on one device, plus per-class index tensors of train."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    class_index: torch.Tensor
    """(10, max_count) long: row c holds the train indices of class c, padded by repetition."""
    class_count: torch.Tensor
    """(10,) long: how many real entries each row of class_index has."""
    name: str

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    @property
    def n_train(self) -> int:
        return int(self.x_train.shape[0])


def resolve_device(device: str = "auto") -> torch.device:
    """'auto' -> cuda when torch.cuda.is_available() (a declared GPU resource is not enough)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"`device` is {device!r} but torch.cuda.is_available() is False on this "
                         "node. Use --device auto (falls back to the CPU) or run on a GPU node.")
    return torch.device(device)


def _load_digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits  # ships inside scikit-learn: no download

    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0)[:, None]  # (N, 1, 8, 8) in [0, 1]
    y = d.target.astype(np.int64)
    # No official test split: hold out a fixed 20% (seed 12345, independent of data_seed) so the
    # test set never moves when a user changes data_seed.
    perm = np.random.default_rng(12345).permutation(len(y))
    n_test = len(y) // 5
    test, train = perm[:n_test], perm[n_test:]
    return x[train], y[train], x[test], y[test]


@functools.lru_cache(maxsize=1)
def mnist1d_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """MNIST-1D with the package's default arguments, built by its generator (never its
    downloader): 4,000 train / 1,000 test signals of length 40, 10 classes, as
    (x_train (N, 1, 40) float32, y_train int64, x_test, y_test). Cached per process.

    The generator calls `mnist1d.utils.set_seed`, which reseeds Python's and NumPy's global RNGs;
    both (and torch's, for safety) are saved before and restored after, so building the data
    never changes a caller's random streams."""
    py_state, np_state, torch_state = random.getstate(), np.random.get_state(), \
        torch.get_rng_state()
    try:
        from mnist1d.data import get_dataset_args, make_dataset

        d = make_dataset(get_dataset_args())
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.set_rng_state(torch_state)

    def prep(x: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(x.astype(np.float32)[:, None])  # (N, 1, 40)

    return prep(d["x"]), d["y"].astype(np.int64), prep(d["x_test"]), d["y_test"].astype(np.int64)


def _missing(name: str, root: str, expected: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"`data_root` is {root!r} but the {name} files were not found there (expected "
        f"{expected}). Point --data-root at the folder that contains them, or add --download "
        "to let torchvision fetch them.")


def _load_mnist_like(kind: str, root: str, download: bool):
    from torchvision import datasets

    cls = {"mnist": datasets.MNIST, "fashion-mnist": datasets.FashionMNIST}[kind]
    try:
        train = cls(root, train=True, download=download)
        test = cls(root, train=False, download=download)
    except (RuntimeError, AssertionError, ValueError, IndexError) as err:
        from qan_ray.formats import check_idx_folder

        check_idx_folder(os.path.join(root, cls.__name__, "raw"))  # a corrupt IDX file: named
        if not isinstance(err, RuntimeError):
            raise
        # torchvision: "Dataset not found. You can use download=True"
        raise _missing(kind, root, f"{os.path.join(root, cls.__name__, 'raw')}/"
                       "train-images-idx3-ubyte etc.") from err
    def prep(ds):
        return (ds.data.numpy().astype(np.float32) / 255.0)[:, None], ds.targets.numpy()
    return (*prep(train), *prep(test))


def _cifar10_class():
    """torchvision's CIFAR10 reader. The md5 checks only apply to downloaded archives; files a user
    placed (or a test wrote) in the standard pickled-batch format are read as they are."""
    from torchvision import datasets

    class LocalCIFAR10(datasets.CIFAR10):
        train_list = [[name, None] for name, _ in datasets.CIFAR10.train_list]
        test_list = [[name, None] for name, _ in datasets.CIFAR10.test_list]
        meta = {**datasets.CIFAR10.meta, "md5": None}

    return datasets.CIFAR10, LocalCIFAR10


def _load_cifar10(root: str, download: bool):
    official, local = _cifar10_class()
    cls = official if download else local
    try:
        train = cls(root, train=True, download=download)
        test = cls(root, train=False, download=download)
    except RuntimeError as err:
        raise _missing("cifar10", root, f"{os.path.join(root, 'cifar-10-batches-py')}/"
                       "data_batch_1..5, test_batch, batches.meta") from err
    def prep(ds):
        x = ds.data.astype(np.float32).transpose(0, 3, 1, 2) / 255.0  # NHWC uint8 -> NCHW
        return x, np.asarray(ds.targets, dtype=np.int64)
    return (*prep(train), *prep(test))


@functools.lru_cache(maxsize=8)
def _load_numpy(dataset: str, data_root: str | None, download: bool):
    if dataset == "digits":
        return _load_digits()
    if dataset == "mnist1d":
        return mnist1d_arrays()
    if not data_root:
        raise ValueError(f"`data_root` is None; dataset {dataset!r} is read from disk. "
                         "Pass --data-root DIR (add --download to fetch it).")
    if not os.path.isdir(data_root) and not download:
        raise _missing(dataset, data_root, "an existing folder")
    if dataset in ("mnist", "fashion-mnist"):
        return _load_mnist_like(dataset, data_root, download)
    if dataset == "cifar10":
        return _load_cifar10(data_root, download)
    raise ValueError(f"`dataset` is {dataset!r}; it must be digits, mnist1d, mnist, "
                     "fashion-mnist or cifar10.")


def class_index_matrix(y: torch.Tensor, num_classes: int = NUM_CLASSES,
                       require_all: bool = True):
    """Per-class train indices as one padded (C, max_count) matrix and the true counts (C,).

    A class without samples raises when `require_all` (minibatch selection needs every class);
    otherwise its row is zeros with count 0 (a task with fewer classes, trained in lr mode)."""
    rows = [torch.nonzero(y == c).flatten() for c in range(num_classes)]
    counts = torch.tensor([len(r) for r in rows], dtype=torch.long, device=y.device)
    if not require_all and int(counts.max()) > 0:
        rows = [r if len(r) else torch.zeros(1, dtype=torch.long, device=y.device)
                for r in rows]
    elif int(counts.min()) == 0:
        missing = [c for c, r in enumerate(rows) if len(r) == 0]
        raise ValueError(f"classes {missing} have no training samples; minibatch selection "
                         "needs every class. Use more data (--max-train-samples)"
                         " or --action-mode lr.")
    width = int(counts.max())
    padded = torch.stack([r.repeat(width // len(r) + 1)[:width] for r in rows])
    return padded, counts


def skew_training_split(train_idx: np.ndarray, labels: np.ndarray, class_imbalance: float,
                        rare_classes: tuple[int, ...], label_noise: float,
                        noisy_classes: tuple[int, ...], seed: int
                        ) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, their labels) after thinning and corrupting the training split only:
    each class of `rare_classes` keeps the first ceil(n / class_imbalance) of its indices
    (`train_idx` is already a random order), then `label_noise` of the samples of each class of
    `noisy_classes` get a label drawn uniformly from the other nine (seeded by `seed`)."""
    y = labels[train_idx]
    keep = np.ones(len(train_idx), dtype=bool)
    if class_imbalance > 1:
        for c in rare_classes:
            where = np.flatnonzero(y == c)
            keep[where[int(math.ceil(len(where) / class_imbalance)):]] = False
    train_idx, y = train_idx[keep], y[keep].copy()
    if label_noise > 0:
        rng = np.random.default_rng([int(seed), 0x4E015E])
        clean = y.copy()
        for c in noisy_classes:
            where = np.flatnonzero(clean == c)
            flip = where[rng.random(len(where)) < label_noise]
            y[flip] = (c + rng.integers(1, NUM_CLASSES, len(flip))) % NUM_CLASSES
    return train_idx, y


@functools.lru_cache(maxsize=8)
def _load_device_data(dataset: str, data_root: str | None, download: bool, val_fraction: float,
                      data_seed: int, max_train_samples: int | None, device: str,
                      skew: tuple = (1.0, (), 0.0, ())) -> DeviceData:
    x_tr, y_tr, x_te, y_te = _load_numpy(dataset, data_root, download)
    rng = np.random.default_rng(data_seed)
    perm = rng.permutation(len(y_tr))
    n_val = max(1, int(round(len(perm) * val_fraction)))
    val_idx, train_idx = perm[:n_val], perm[n_val:]
    if max_train_samples is not None:
        train_idx = train_idx[:max_train_samples]
    train_idx, train_labels = skew_training_split(train_idx, y_tr, *skew, seed=data_seed)
    # Normalise with the training split's per-channel statistics ((N, C, H, W) images or
    # (N, C, L) signals).
    xt = x_tr[train_idx]
    axes = (0, *range(2, xt.ndim))
    mean = xt.mean(axis=axes, keepdims=True)
    std = xt.std(axis=axes, keepdims=True) + 1e-6
    dev = torch.device(device)

    def put(x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(((x - mean) / std).astype(np.float32)).to(dev)

    y_train = torch.from_numpy(train_labels).to(dev)
    class_index, class_count = class_index_matrix(y_train)
    return DeviceData(
        x_train=put(xt), y_train=y_train,
        x_val=put(x_tr[val_idx]), y_val=torch.from_numpy(y_tr[val_idx]).to(dev),
        x_test=put(x_te), y_test=torch.from_numpy(y_te).to(dev),
        class_index=class_index, class_count=class_count, name=dataset,
    )


@functools.lru_cache(maxsize=8)
def _load_user_device_data(task: str, val_fraction: float, data_seed: int,
                           max_train_samples: int | None, require_all_classes: bool,
                           device: str) -> DeviceData:
    """A `module:function` task's tensors (qan_ray.tasks) split like the presets, not
    normalised (the task gives its data as the model expects it)."""
    from qan_ray.tasks import load_user_task

    ut = load_user_task(task)
    x_tr, y_tr = ut.train
    if ut.test is None:  # a fixed fifth of train, independent of data_seed (as for digits)
        perm = torch.from_numpy(np.random.default_rng(12345).permutation(len(y_tr)))
        n_test = max(1, len(y_tr) // 5)
        (x_te, y_te), keep = (x_tr[perm[:n_test]], y_tr[perm[:n_test]]), perm[n_test:]
        x_tr, y_tr = x_tr[keep], y_tr[keep]
    else:
        x_te, y_te = ut.test
    if ut.val is None:
        perm = torch.from_numpy(np.random.default_rng(data_seed).permutation(len(y_tr)))
        n_val = max(1, int(round(len(perm) * val_fraction)))
        (x_va, y_va), keep = (x_tr[perm[:n_val]], y_tr[perm[:n_val]]), perm[n_val:]
        x_tr, y_tr = x_tr[keep], y_tr[keep]
    else:
        x_va, y_va = ut.val
    if max_train_samples is not None:
        x_tr, y_tr = x_tr[:max_train_samples], y_tr[:max_train_samples]
    if len(y_tr) < 1:
        raise ValueError(f"task {task!r} leaves no training samples after the validation/test "
                         "hold-out; give more train data, or pass val=/test= explicitly.")
    dev = torch.device(device)
    y_train = y_tr.to(dev)
    class_index, class_count = class_index_matrix(y_train, require_all=require_all_classes)
    return DeviceData(
        x_train=x_tr.to(dev), y_train=y_train, x_val=x_va.to(dev), y_val=y_va.to(dev),
        x_test=x_te.to(dev), y_test=y_te.to(dev), class_index=class_index,
        class_count=class_count, name=task,
    )


def load_data(cfg, device: torch.device) -> DeviceData:
    """The dataset of `cfg` on `device`, cached per process (environments share one copy).
    A `module:function` task (qan_ray.tasks) supplies its own tensors."""
    if is_user_task(cfg.task):
        return _load_user_device_data(cfg.task, cfg.val_fraction, cfg.data_seed,
                                      cfg.max_train_samples, cfg.action_mode == "minibatch",
                                      str(device))
    skew = (float(cfg.class_imbalance), tuple(cfg.rare_classes), float(cfg.label_noise),
            tuple(cfg.noisy_classes))
    return _load_device_data(cfg.dataset, cfg.data_root, cfg.download, cfg.val_fraction,
                             cfg.data_seed, cfg.max_train_samples, str(device), skew)


def augment_batch(x: torch.Tensor, gen: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random horizontal flip + pad-`pad` random crop of a batch, batched on its device."""
    n, c, h, w = x.shape
    dev = x.device
    flip = torch.rand(n, device=dev, generator=gen) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    xp = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    oy = torch.randint(0, 2 * pad + 1, (n,), device=dev, generator=gen)
    ox = torch.randint(0, 2 * pad + 1, (n,), device=dev, generator=gen)
    rows = (oy[:, None] + torch.arange(h, device=dev))[:, None, :, None]
    cols = (ox[:, None] + torch.arange(w, device=dev))[:, None, None, :]
    bi = torch.arange(n, device=dev)[:, None, None, None]
    ci = torch.arange(c, device=dev)[None, :, None, None]
    return xp[bi, ci, rows, cols]
