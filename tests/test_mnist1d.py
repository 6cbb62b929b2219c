"""MNIST-1D (the `mnist1d` package's generator): shapes, determinism, global-RNG isolation, the
two presets and one TargetTrainer step."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from qan_ray.config import from_dict
from qan_ray.data import load_data, mnist1d_arrays
from qan_ray.models import CNN1D, build_model
from qan_ray.trainer import TargetTrainer


def test_generator_gives_4000_train_1000_test_signals_of_length_40_and_10_classes():
    x_tr, y_tr, x_te, y_te = mnist1d_arrays()
    assert x_tr.shape == (4000, 1, 40) and x_te.shape == (1000, 1, 40)
    assert x_tr.dtype == np.float32 and y_tr.dtype == np.int64
    assert sorted(set(y_tr.tolist())) == list(range(10)) == sorted(set(y_te.tolist()))


def test_generator_is_deterministic_across_builds():
    a = mnist1d_arrays()
    mnist1d_arrays.cache_clear()
    b = mnist1d_arrays()
    for u, v in zip(a, b):
        assert np.array_equal(u, v)


def test_building_the_data_leaves_the_global_rngs_unchanged():
    mnist1d_arrays.cache_clear()  # really run the generator (it calls set_seed(42))
    random.seed(7)
    np.random.seed(7)
    torch.manual_seed(7)
    py, npy, tt = random.getstate(), np.random.get_state(), torch.get_rng_state()
    mnist1d_arrays()
    assert random.getstate() == py
    after = np.random.get_state()
    assert np.array_equal(after[1], npy[1]) and after[2:] == npy[2:]
    assert torch.equal(torch.get_rng_state(), tt)
    # and the streams continue as if nothing happened
    assert np.random.rand() == np.random.RandomState(7).rand()


def test_mnist1d_device_data_split_by_val_fraction_and_data_seed():
    cfg = from_dict(task="mnist1d-mlp", device="cpu")
    d = load_data(cfg, torch.device("cpu"))
    assert d.input_shape == (1, 40) and d.name == "mnist1d"
    assert (d.n_train, len(d.y_val), len(d.y_test)) == (3200, 800, 1000)
    assert abs(float(d.x_train.mean())) < 1e-4  # normalised with the train statistics
    other = load_data(cfg.replace(data_seed=1), torch.device("cpu"))
    assert not torch.equal(d.y_val, other.y_val)
    assert torch.equal(d.y_test, other.y_test)  # the package's test split never moves
    assert torch.equal(d.y_test, torch.from_numpy(mnist1d_arrays()[3]))


def test_cnn1d_is_the_papers_conv_base():
    net = CNN1D()
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv1d)]
    assert [(c.out_channels, c.kernel_size, c.stride, c.padding) for c in convs] == [
        (25, (5,), (2,), (1,)), (25, (3,), (2,), (1,)), (25, (3,), (2,), (1,))]
    assert net.classifier[1].in_features == 125  # 40 -> 19 -> 10 -> 5 positions x 25
    assert net(torch.zeros(4, 1, 40)).shape == (4, 10)


@pytest.mark.parametrize("task, layers", [("mnist1d-mlp", [100, 100, 10]),
                                          ("mnist1d-cnn", [10])])
def test_presets_build_and_take_one_trainer_step(task, layers):
    cfg = from_dict(task=task, device="cpu")
    assert cfg.dataset == "mnist1d" and cfg.data_root is None
    net = build_model(cfg, (1, 40))
    assert [m.out_features for m in net.modules() if isinstance(m, torch.nn.Linear)] == layers
    tr = TargetTrainer(cfg)
    assert tr.batches_per_epoch == cfg.control_interval == 32  # one decision per epoch
    before = [p.detach().clone() for p in tr.model.parameters()]
    loss = tr.train(1)
    assert np.isfinite(loss) and tr.step == 1
    assert any(not torch.equal(a, b) for a, b in zip(before, tr.model.parameters()))


@pytest.mark.parametrize("values, fragment", [
    ({"task": "digits-mlp", "model": "cnn1d"}, "`model` is 'cnn1d'; the 1-D CNN needs 1-D"),
    ({"task": "mnist1d-cnn", "model": "lenet"}, "the paper's LeNet expects 28x28"),
    ({"task": "mnist1d-cnn", "model": "wrn"}, "WideResNet needs (C, H, W) images"),
    ({"task": "mnist1d-mlp", "augment": True}, "`augment` is True; flip + crop"),
])
def test_mnist1d_rejects_models_and_options_for_images(values, fragment):
    with pytest.raises(ValueError) as err:
        from_dict(values)
    assert fragment in str(err.value)


def test_image_models_reject_1d_inputs_and_cnn1d_rejects_images():
    with pytest.raises(ValueError, match=r"`model` is 'cnn1d' but the inputs have shape "
                                         r"\(1, 8, 8\)"):
        build_model(from_dict(task="mnist1d-cnn"), (1, 8, 8))

    class Cfg:
        model, task = "lenet", "x"

    with pytest.raises(ValueError, match=r"`model` is 'lenet' but the inputs have shape "
                                         r"\(1, 40\) per sample; it needs \(C, H, W\)"):
        build_model(Cfg(), (1, 40))
