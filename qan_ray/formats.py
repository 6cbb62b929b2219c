"""Write image-classification arrays in the exact on-disk formats torchvision's dataset classes
read: IDX files for MNIST / Fashion-MNIST, pickled batches for CIFAR-10.

Uses: tests exercise the real torchvision loading path with no network; users convert their own
arrays into a `--data-root` qan-ray can read; benchmarks build a labelled *synthetic* MNIST-format
set where real MNIST is not available (it is never passed off as MNIST).
"""

from __future__ import annotations

import pickle
import struct
from pathlib import Path

import numpy as np


def _idx(path: Path, array: np.ndarray) -> None:
    magic = {3: 0x0803, 1: 0x0801}[array.ndim]  # unsigned byte data, 3-D images or 1-D labels
    with open(path, "wb") as f:
        f.write(struct.pack(">I", magic))
        for dim in array.shape:
            f.write(struct.pack(">I", dim))
        f.write(array.astype(np.uint8).tobytes())


IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
             "t10k-labels-idx1-ubyte")


def idx_problem(path: str | Path) -> str | None:
    """Why the IDX file at `path` is unreadable (magic, dimensions, size), or None if it is a
    well-formed unsigned-byte IDX file."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        return f"{path} cannot be read ({err.strerror or err})"
    if len(data) < 4:
        return f"{path} holds {len(data)} bytes; an IDX file starts with a 4-byte magic number"
    zero, dtype, ndim = data[0] * 256 + data[1], data[2], data[3]
    if zero != 0 or dtype != 0x08 or ndim not in (1, 3):
        return (f"{path} has magic {data[:4].hex()}; an MNIST IDX file starts with 00000801 "
                "(labels) or 00000803 (images)")
    if len(data) < 4 + 4 * ndim:
        return f"{path} is truncated inside its header ({len(data)} bytes)"
    dims = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    expected = 4 + 4 * ndim + int(np.prod(dims))
    if len(data) != expected:
        return (f"{path} holds {len(data)} bytes but its header {list(dims)} needs {expected}; "
                "it is truncated or padded")
    return None


def check_idx_folder(raw: str | Path) -> None:
    """ValueError naming the first corrupt IDX file of an MNIST-format raw/ folder (value, rule,
    fix); nothing if every file present is well formed."""
    for name in IDX_FILES:
        path = Path(raw) / name
        why = idx_problem(path) if path.exists() else None
        if why is not None:
            raise ValueError(f"{why}. Replace the file with an intact copy (or delete it and "
                             "pass --download to let torchvision fetch it), or write your own "
                             "arrays with qan_ray.formats.write_mnist.")


def synthetic_images(n: int, side: int, channels: int, seed: int, contrast: int = 180,
                     jitter: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Uniform noise plus a class-dependent bright square (every class present). `contrast`
    sets the square's brightness over the noise and `jitter` its random shift in pixels: lower
    contrast and more jitter make the task harder."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 10
    rng.shuffle(y)
    x = rng.integers(0, 255 - contrast, size=(n, side, side, channels))
    shifts = rng.integers(-jitter, jitter + 1, size=(n, 2)) if jitter else np.zeros((n, 2), int)
    for i in range(n):
        r, col = divmod(int(y[i]), 4)
        top = int(np.clip(4 + 4 * r + shifts[i, 0], 0, side - 6))
        left = int(np.clip(4 + 5 * col + shifts[i, 1], 0, side - 6))
        x[i, top:top + 6, left:left + 6] += contrast
    return np.clip(x, 0, 255).astype(np.uint8), y.astype(np.int64)


def write_mnist(root: str | Path, folder: str = "MNIST", n_train: int = 300, n_test: int = 100,
                contrast: int = 180, jitter: int = 0) -> Path:
    """Synthetic IDX files under root/<folder>/raw, as torchvision's MNIST/FashionMNIST read."""
    raw = Path(root) / folder / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for prefix, n, seed in (("train", n_train, 0), ("t10k", n_test, 1)):
        x, y = synthetic_images(n, 28, 1, seed, contrast, jitter)
        _idx(raw / f"{prefix}-images-idx3-ubyte", x[..., 0])
        _idx(raw / f"{prefix}-labels-idx1-ubyte", y)
    return Path(root)


def write_cifar10(root: str | Path, per_batch: int = 50, n_test: int = 50) -> Path:
    """Synthetic pickled batches under root/cifar-10-batches-py, as torchvision's CIFAR10 reads."""
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
