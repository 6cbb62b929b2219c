from __future__ import annotations

import pytest
import torch

from qan_ray.config import from_dict
from qan_ray.data import class_index_matrix, load_data


def test_digits_split_is_fixed_by_seed_and_disjoint():
    a = load_data(from_dict(data_seed=0), torch.device("cpu"))
    b = load_data(from_dict(data_seed=0, lr=0.1), torch.device("cpu"))
    assert a is b  # cached per process: environments share one copy
    assert a.input_shape == (1, 8, 8)
    assert a.n_train + len(a.y_val) + len(a.y_test) == 1797
    c = load_data(from_dict(data_seed=1), torch.device("cpu"))
    assert not torch.equal(a.y_val, c.y_val) and torch.equal(a.y_test, c.y_test)
    for data in (a, c):  # the 1,797 digits images are distinct, so images identify samples
        train, val, test = (_images(x) for x in (data.x_train, data.x_val, data.x_test))
        assert (len(train), len(val), len(test)) == (data.n_train, len(data.y_val),
                                                     len(data.y_test))
        shared = {"train&val": len(train & val), "train&test": len(train & test),
                  "val&test": len(val & test)}
        assert shared == {"train&val": 0, "train&test": 0, "val&test": 0}
        assert len(train | val | test) == 1797  # together: the whole dataset, each image once


def _images(x: torch.Tensor) -> set[bytes]:
    """The distinct images of a split (one split normalises all three alike)."""
    return {row.tobytes() for row in x.reshape(len(x), -1).numpy()}


def test_class_index_rows_hold_only_their_class():
    y = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 3, 3, 0])
    idx, count = class_index_matrix(y)
    assert count.tolist() == [2, 1, 1, 3, 1, 1, 1, 1, 1, 1]
    assert idx.shape == (10, 3)
    for c in range(10):
        assert (y[idx[c]] == c).all()


def test_mnist_loads_through_torchvision_from_idx_files(mnist_root):
    data = load_data(from_dict(task="mnist-mlp", data_root=str(mnist_root)), torch.device("cpu"))
    assert data.input_shape == (1, 28, 28)
    assert data.n_train + len(data.y_val) == 300 and len(data.y_test) == 100
    assert abs(float(data.x_train.mean())) < 1e-3  # normalised with train statistics


def test_fashion_mnist_reads_its_own_folder(tmp_path):
    from qan_ray.formats import write_mnist

    write_mnist(tmp_path, folder="FashionMNIST", n_train=120, n_test=40)
    data = load_data(from_dict(task="fashion-mnist-lenet", data_root=str(tmp_path)),
                     torch.device("cpu"))
    assert len(data.y_test) == 40


def test_cifar10_loads_through_torchvision_from_pickled_batches(cifar_root):
    cfg = from_dict(task="cifar10-wrn", data_root=str(cifar_root), wrn_depth=10, wrn_width=1)
    data = load_data(cfg, torch.device("cpu"))
    assert data.input_shape == (3, 32, 32)
    assert data.n_train + len(data.y_val) == 250 and len(data.y_test) == 50


def test_missing_dataset_error_names_the_path_and_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        load_data(from_dict(task="mnist-mlp", data_root=str(tmp_path)), torch.device("cpu"))
    msg = str(err.value)
    assert str(tmp_path) in msg and "train-images-idx3-ubyte" in msg and "--download" in msg
