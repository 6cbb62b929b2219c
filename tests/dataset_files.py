"""Write small datasets in the exact on-disk formats torchvision's dataset classes read."""

from __future__ import annotations

import pickle
import struct
from pathlib import Path

import numpy as np


def _idx(path: Path, array: np.ndarray) -> None:
    magic = {3: 0x0803, 1: 0x0801}[array.ndim]
    with open(path, "wb") as f:
        f.write(struct.pack(">I", magic))
        for dim in array.shape:
            f.write(struct.pack(">I", dim))
        f.write(array.astype(np.uint8).tobytes())


def synthetic_images(n: int, side: int, channels: int, seed: int):
    """Class-dependent blobs so a model can learn something; every class present."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 10
    rng.shuffle(y)
    x = rng.integers(0, 60, size=(n, side, side, channels))
    for c in range(10):
        r, col = divmod(c, 4)
        x[y == c, 4 + 4 * r: 10 + 4 * r, 4 + 5 * col: 10 + 5 * col] += 180
    return np.clip(x, 0, 255).astype(np.uint8), y.astype(np.int64)


def write_mnist(root: Path, folder: str = "MNIST", n_train: int = 300, n_test: int = 100) -> Path:
    """IDX files under root/<folder>/raw, as torchvision.datasets.MNIST/FashionMNIST read them."""
    raw = Path(root) / folder / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for prefix, n, seed in (("train", n_train, 0), ("t10k", n_test, 1)):
        x, y = synthetic_images(n, 28, 1, seed)
        _idx(raw / f"{prefix}-images-idx3-ubyte", x[..., 0])
        _idx(raw / f"{prefix}-labels-idx1-ubyte", y)
    return Path(root)


def write_cifar10(root: Path, per_batch: int = 50, n_test: int = 50) -> Path:
    """Pickled batches under root/cifar-10-batches-py, as torchvision's CIFAR10 reads them."""
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for i, name in enumerate(names):
        x, y = synthetic_images(n_test if name == "test_batch" else per_batch, 32, 3, seed=i)
        flat = x.transpose(0, 3, 1, 2).reshape(len(y), -1)  # CIFAR stores planar RGB rows
        with open(folder / name, "wb") as f:
            pickle.dump({"data": flat, "labels": y.tolist()}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)
    return Path(root)
