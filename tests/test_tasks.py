"""A task of your own (`--task module:function`): resolution, checks, data, training, Ray, CLI."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

from qan_ray.config import from_dict
from qan_ray.data import NUM_CLASSES, load_data
from qan_ray.distribution import load_config
from qan_ray.tasks import UserTask, load_user_task, tensors_from_dataset

TASK = "user_task_example:make_task"
TESTS = Path(__file__).parent
HEADER = """
import torch
from torch import nn
from qan_ray.tasks import UserTask
from user_task_example import small_cnn

x = torch.rand(100, 1, 8, 8)
y = torch.arange(100) % 10
"""


def _module(tmp_path: Path, monkeypatch, body: str) -> str:
    """A fresh module `ut_<random>` holding HEADER + `body`, importable; its name."""
    name = f"ut_{uuid.uuid4().hex[:10]}"
    (tmp_path / f"{name}.py").write_text(HEADER + body)
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


def _task(tmp_path, monkeypatch, returned: str) -> str:
    """A task whose function returns the expression `returned`."""
    return _module(tmp_path, monkeypatch, f"\ndef make_task():\n    return {returned}\n") + (
        ":make_task")


# --- resolving "module:function" -------------------------------------------------------------
@pytest.mark.parametrize("task, fragments", [
    ("my_pkg.my_module", ["`task` is 'my_pkg.my_module'", "module:function",
                          "--task my_pkg.my_module:make_task", "digits-mlp"]),
    ("digitz", ["`task` is 'digitz'", "'mnist-lenet'", "module:function"]),
    ("no_such_module_q8:make_task", ["'no_such_module_q8' is not importable here",
                                     "importable on every Ray node", "PYTHONPATH",
                                     "ray job submit --working-dir .", "py_modules"]),
    ("user_task_example:make_tsk", ["module 'user_task_example' has no attribute 'make_tsk'",
                                    "'make_task'"]),
    ("user_task_example:NOT_CALLABLE", ["user_task_example.NOT_CALLABLE is a int, not callable",
                                        "returns a qan_ray.tasks.UserTask"]),
    ("user_task_example:not_a_task", ["returned a dict; it must return a qan_ray.tasks.UserTask"]),
    (":make_task", ["written 'module:function'"]),
    ("a:b:c", ["one colon"]),
])
def test_task_resolution_errors_name_the_value_the_rule_and_the_fix(task, fragments):
    with pytest.raises(ValueError) as err:
        load_config(task=task)
    for fragment in fragments:
        assert fragment in str(err.value)


def test_a_module_that_fails_to_import_says_so(tmp_path, monkeypatch):
    name = _module(tmp_path, monkeypatch, "import not_installed_dependency_q8\n")
    with pytest.raises(ValueError, match=rf"importing module '{name}' failed: No module named "
                                         "'not_installed_dependency_q8'.*every Ray node"):
        load_user_task(f"{name}:make_task")


BAD = [
    ("UserTask(model=small_cnn, train=((x * 255).long(), y))",
     "train inputs have dtype torch.int64; they must be floating point"),
    ("UserTask(model=small_cnn, train=(x, y.float()))",
     "train labels have dtype torch.float32; they must be integer class indices"),
    ("UserTask(model=small_cnn, train=(x, y[:-1]))",
     "train labels have shape (99,) for 100 inputs; they must be (N,)"),
    ("UserTask(model=small_cnn, train=(x.reshape(-1), y))",
     "train inputs have shape (6400,); they must be (N, ...)"),
    ("UserTask(model=small_cnn, train=(x, y + 1))",
     "train labels span 1..10; they must lie in 0..9, since qan-ray uses 10 classes everywhere "
     "(qan_ray.data.NUM_CLASSES"),
    ("UserTask(model=small_cnn, train=(x, y), val=(x, y - 1))", "val labels span -1..8"),
    ("UserTask(model=small_cnn, train=(x, y), test=(x[:, :, :4], y))",
     "test inputs have shape (1, 4, 8) per sample but train inputs have (1, 8, 8)"),
    ("UserTask(model=small_cnn, train=(x / 0 - x / 0, y))", "train inputs contain NaN or inf"),
    ("UserTask(model=small_cnn, train='train.csv')",
     "train is a str; it must be an (x, y) pair of tensors or a torch Dataset"),
    ("UserTask(model=small_cnn, train=([1.0], y))", "train holds (list, Tensor); both must be"),
    ("UserTask(model=small_cnn(), train=(x, y))",
     "UserTask.model is a Sequential; it must be a factory"),
    ("UserTask(model=lambda: 3, train=(x, y))",
     "UserTask.model() returned a int; it must return a torch.nn.Module"),
    ("UserTask(model=(lambda net: lambda: net)(small_cnn()), train=(x, y))",
     "returned the same module twice"),
    ("UserTask(model=lambda: nn.Linear(64, 10), train=(x, y))",
     "the model failed on a batch of train inputs of shape (2, 1, 8, 8)"),
    ("UserTask(model=lambda: nn.Sequential(nn.Flatten(), nn.Linear(64, 5)), train=(x, y))",
     "the model's output on 2 inputs is (2, 5); it must be (2, k) class logits with k >= 10"),
    ("UserTask(model=small_cnn, train=(x, y), config={'dataset': 'digits'})",
     "UserTask.config sets ['dataset']; the task itself supplies the model and the data"),
    ("UserTask(model=small_cnn, train=(x, y), config={'lrr': 0.1})",
     "UserTask.config has unknown key(s) ['lrr']"),
    ("UserTask(model=small_cnn, train=(x, y), config=[('lr', 0.1)])",
     "UserTask.config is a list; it must be a dict"),
]


@pytest.mark.parametrize("returned, fragment", BAD, ids=[f[:40] for _, f in BAD])
def test_bad_user_task_contents_raise_a_clear_value_error(tmp_path, monkeypatch, returned,
                                                          fragment):
    task = _task(tmp_path, monkeypatch, returned)
    with pytest.raises(ValueError) as err:
        load_config(task=task)
    assert fragment in str(err.value) and task in str(err.value)


def test_a_bad_value_from_the_task_config_is_validated_like_any_other(tmp_path, monkeypatch):
    task = _task(tmp_path, monkeypatch,
                 "UserTask(model=small_cnn, train=(x, y), config={'control_interval': 0})")
    with pytest.raises(ValueError, match="`control_interval` is 0; it must be an integer >= 1"):
        load_config(task=task)


def test_a_module_in_the_current_directory_is_found(tmp_path, monkeypatch):
    name = f"ut_{uuid.uuid4().hex[:10]}"
    (tmp_path / f"{name}.py").write_text(
        HEADER + "\ndef make_task():\n    return UserTask(model=small_cnn, train=(x, y))\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    assert load_user_task(f"{name}:make_task").train[0].shape == (100, 1, 8, 8)
    assert sys.path[-1] == str(tmp_path)  # appended, never ahead of installed packages


def test_the_task_leaves_the_callers_rng_alone(tmp_path, monkeypatch):
    task = _task(tmp_path, monkeypatch, "UserTask(model=small_cnn, train=(torch.rand(50, 1, 8, "
                                        "8), torch.arange(50) % 10))")
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    load_user_task(task)  # runs the function and builds the model twice
    assert torch.equal(torch.rand(3), expected)


# --- config ----------------------------------------------------------------------------------
def test_load_config_takes_the_task_config_as_defaults_and_explicit_values_win():
    cfg = load_config(task=TASK)
    assert (cfg.task, cfg.dataset, cfg.model) == (TASK, "user", "user")
    assert (cfg.lr, cfg.momentum, cfg.batch_size, cfg.control_interval,
            cfg.epochs_per_episode) == (0.05, 0.9, 32, 35, 4.0)
    assert load_config(task=TASK, lr=0.2, control_interval=7).lr == 0.2
    assert load_config(task=TASK, control_interval=7).control_interval == 7
    assert from_dict(cfg.to_dict()) == cfg  # what the actors and `qan evaluate` rebuild
    assert cfg.replace(seed=3).seed == 3 and cfg.replace(seed=3).lr == 0.05
    assert load_config(cfg.to_dict()) == cfg


def test_config_from_dict_never_loads_a_user_task():
    # qan_ray.config checks values only: a task of your own is loaded by load_config
    with pytest.raises(ValueError, match="`task` is 'user_task_example:make_task', a task of "
                                         "your own, but its config was not loaded.*load_config"):
        from_dict(task=TASK)
    saved = {**from_dict().to_dict(), "task": "no_such_module_q8:make_task", "dataset": "user",
             "model": "user"}
    assert from_dict(saved).task == "no_such_module_q8:make_task"  # a saved config: no import


def test_dataset_and_model_must_agree_with_the_kind_of_task():
    with pytest.raises(ValueError, match="`dataset` is 'digits'; task 'user_task_example:"
                                         "make_task' supplies its own dataset"):
        load_config(task=TASK, dataset="digits")
    with pytest.raises(ValueError, match="`model` is 'mlp'.*Leave --model unset"):
        load_config(task=TASK, model="mlp")
    with pytest.raises(ValueError, match="`model` is 'user'; 'user' is the model of a "
                                         "module:function task, but task is the preset"):
        load_config(task="digits-mlp", model="user")


# --- data --------------------------------------------------------------------------------------
def test_user_data_is_split_like_a_preset_and_lives_on_the_device():
    a = load_data(load_config(task=TASK), torch.device("cpu"))
    assert a is load_data(load_config(task=TASK, lr=0.2), torch.device("cpu"))  # cached
    assert a.input_shape == (1, 8, 8) and a.name == TASK
    assert (a.n_train, len(a.y_val), len(a.y_test)) == (1120, 280, 397)  # val 20% of 1,400
    assert a.x_train.dtype == torch.float32 and a.y_train.dtype == torch.long
    ut = load_user_task(TASK)
    assert torch.equal(a.x_test, ut.test[0])  # the given test split, as given (not normalised)
    b = load_data(load_config(task=TASK, data_seed=1), torch.device("cpu"))
    assert not torch.equal(a.y_val, b.y_val) and torch.equal(a.y_test, b.y_test)
    small = load_data(load_config(task=TASK, max_train_samples=100), torch.device("cpu"))
    assert small.n_train == 100 and torch.equal(small.y_val, a.y_val)


def test_missing_test_split_is_a_fixed_fifth_of_train(tmp_path, monkeypatch):
    # Sample i is the constant image i / 100: the splits tell which samples they hold.
    task = _task(tmp_path, monkeypatch, "UserTask(model=small_cnn, train=((torch.arange(100) / "
                                        "100).reshape(100, 1, 1, 1).expand(100, 1, 8, 8), y))")
    a = load_data(load_config(task=task), torch.device("cpu"))
    assert (a.n_train, len(a.y_val), len(a.y_test)) == (64, 16, 20)

    def ids(x: torch.Tensor) -> set[int]:
        return {round(float(v) * 100) for v in x[:, 0, 0, 0]}

    assert ids(a.x_train) | ids(a.x_val) | ids(a.x_test) == set(range(100))  # a partition
    assert len(ids(a.x_train)) + len(ids(a.x_val)) + len(ids(a.x_test)) == 100
    assert all(int(label) == i % 10 for i, label in zip(sorted(ids(a.x_test)),
                                                        a.y_test[a.x_test[:, 0, 0, 0].argsort()]))
    b = load_data(load_config(task=task, data_seed=3), torch.device("cpu"))
    assert torch.equal(a.x_test, b.x_test) and not torch.equal(a.x_val, b.x_val)


def test_minibatch_mode_gets_class_index_tensors_and_needs_every_class(tmp_path, monkeypatch):
    data = load_data(load_config(task=TASK, action_mode="minibatch"), torch.device("cpu"))
    assert data.class_index.shape[0] == NUM_CLASSES and int(data.class_count.sum()) == 1120
    for c in range(NUM_CLASSES):
        assert (data.y_train[data.class_index[c]] == c).all()
    five = _task(tmp_path, monkeypatch, "UserTask(model=small_cnn, train=(x, y % 5))")
    assert load_data(load_config(task=five), torch.device("cpu")).class_count[5:].sum() == 0
    with pytest.raises(ValueError, match=r"classes \[5, 6, 7, 8, 9\] have no training samples"):
        load_data(load_config(task=five, action_mode="minibatch"), torch.device("cpu"))


def test_tensors_from_a_torchvision_dataset():
    from torchvision.datasets import FakeData
    from torchvision.transforms import ToTensor

    x, y = tensors_from_dataset(FakeData(size=12, image_size=(1, 8, 8), num_classes=10))  # PIL
    assert x.shape == (12, 1, 8, 8) and x.dtype == torch.float32 and 0 <= x.min() <= x.max() <= 1
    assert y.dtype == torch.long and y.shape == (12,) and int(y.max()) < 10
    xt, yt = tensors_from_dataset(FakeData(size=12, image_size=(1, 8, 8), transform=ToTensor()),
                                  limit=5)
    assert torch.equal(xt, x[:5]) and torch.equal(yt, y[:5])
    tds = torch.utils.data.TensorDataset(torch.zeros(4, 3), torch.tensor([0, 1, 2, 3]))
    assert tensors_from_dataset(tds)[1].tolist() == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="item 0 of dataset list is a int; every item must be "
                                         "an"):
        tensors_from_dataset([1, 2])
    with pytest.raises(ValueError, match="input is a str; it must be a tensor, a numpy array"):
        tensors_from_dataset([("img", 0)])


def test_a_dataset_and_numpy_arrays_are_accepted_as_splits(tmp_path, monkeypatch):
    task = _task(tmp_path, monkeypatch, "UserTask(model=small_cnn, train=torch.utils.data."
                                        "TensorDataset(x, y), val=(x.numpy(), y.numpy()))")
    ut = load_user_task(task)
    assert ut.train[0].shape == (100, 1, 8, 8) and ut.val[1].dtype == torch.long
    assert isinstance(ut.val[0], torch.Tensor) and isinstance(ut, UserTask)


# --- training ----------------------------------------------------------------------------------
def test_target_trainer_trains_the_user_model_and_the_loss_falls():
    from qan_ray.trainer import TargetTrainer

    tr = TargetTrainer(load_config(task=TASK, epochs_per_episode=2.0, device="cpu"))
    convs = [m for m in tr.model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [8, 16]  # the user's CNN, not a preset model
    first = tr.train(35)
    second = tr.train(35)
    assert tr.initial_loss > 2.0 and first < tr.initial_loss and second < 0.6 * first
    assert tr.evaluate("val")[1] > 0.6
    again = TargetTrainer(load_config(task=TASK, epochs_per_episode=2.0, device="cpu"))
    assert again.train(35) == first  # seeded: the factory runs after torch.manual_seed(seed)


def test_any_input_shape_trains_but_augment_needs_images(tmp_path, monkeypatch):
    from qan_ray.trainer import TargetTrainer

    flat = _task(tmp_path, monkeypatch, "UserTask(model=lambda: nn.Linear(64, 10), "
                                        "train=(x.reshape(100, 64), y))")
    tr = TargetTrainer(load_config(task=flat, device="cpu"))
    assert tr.data.input_shape == (64,) and np.isfinite(tr.train(3))
    with pytest.raises(ValueError, match=r"`augment` is True but the inputs of task .* have "
                                         r"shape \(64,\) per sample; flip \+ crop needs"):
        TargetTrainer(load_config(task=flat, augment=True, device="cpu"))


def test_environment_episode_runs_on_the_user_task():
    from qan_ray.env import TargetTrainingEnv

    env = TargetTrainingEnv({"task": TASK, "epochs_per_episode": 1.0, "control_interval": 10,
                             "device": "cpu"})
    obs, info = env.reset(seed=0)
    assert obs.shape == env.observation_space.shape and np.isfinite(obs).all()
    steps, done = 0, False
    while not done:
        obs, reward, terminated, truncated, info = env.step(env.actions.keep_action)
        steps, done = steps + 1, terminated or truncated
        assert np.isfinite(reward) and obs.shape == env.observation_space.shape
    assert steps == env.total_steps == 4  # ceil(35 batches / 10)
    assert info["val_accuracy"] > 0.2


def test_the_docs_example_is_the_tested_module():
    doc = (TESTS.parent / "docs" / "user_tasks.md").read_text()
    block = re.search(r"```python\n(.*?)```", doc, re.S).group(1)
    source = (TESTS / "user_task_example.py").read_text()
    tested = source.split("# --- docs/user_tasks.md: begin\n")[1].split("# --- docs/")[0]
    assert block == tested
    assert len([line for line in block.splitlines() if line.strip()]) <= 20


# --- Ray: meta-training a controller on the user task -----------------------------------------
@pytest.mark.ray
def test_meta_training_runs_on_the_user_task(ray_session, tmp_path):
    import json

    from policies.qnet import load_controller
    from qan_ray.meta import MetaConfig, MetaTrainer
    from qan_ray.records import read_parts

    qan = load_config(task=TASK, epochs_per_episode=1.0, control_interval=12)  # 3 steps
    meta = MetaConfig(episodes=2, num_actors=1, cpus_per_actor=0.5, learning_starts=2,
                      training_intensity=4.0, hidden=(8,))
    mt = MetaTrainer(qan, meta, tmp_path / "run", log=lambda *_: None)
    try:
        assert mt.steps_per_episode == 3
        mt.train()
    finally:
        mt.stop()
    rows = read_parts(tmp_path / "run" / "steps").to_pylist()
    assert mt.progress["episodes"] >= 2
    assert sorted({r["episode"] for r in rows}) == list(range(mt.progress["episodes"]))
    assert all(r["lr"] > 0 for r in rows if r["action"] >= 0)
    ctrl = load_controller(tmp_path / "run")  # the exported controller acts on this task
    obs = np.zeros(mt.obs_size, np.float32)
    assert 0 <= ctrl.act(obs) < qan.num_actions
    assert f'"{TASK}"' in (tmp_path / "run" / "controller" / "spec.json").read_text()
    saved = json.loads((tmp_path / "run" / "config.json").read_text())["qan"]
    assert saved["task"] == TASK and from_dict(saved) == qan  # what --resume rebuilds


@pytest.mark.ray
def test_a_tune_trial_trains_the_user_task(ray_session, tmp_path):
    from ray import tune

    from trainables.targets import target_trainable

    tuner = tune.Tuner(
        tune.with_resources(target_trainable, {"cpu": 1}),
        param_space={"task": TASK, "lr": tune.grid_search([0.05]), "epochs": 2,
                     "checkpoint_every": 0},
        tune_config=tune.TuneConfig(metric="val_accuracy", mode="max"),
        run_config=tune.RunConfig(name="user", storage_path=str(tmp_path), verbose=0,
                                  failure_config=tune.FailureConfig(max_failures=0)))
    result = tuner.fit().get_best_result()
    assert result.error is None and result.metrics["epoch"] == 2
    df = result.metrics_dataframe
    assert df["epoch"].tolist() == [1, 2] and df["lr"].tolist() == pytest.approx([0.05, 0.05])
    # two epochs of the user's CNN at 0.05 (x86: train loss 2.26 -> 1.28, val 0.89, test 0.79):
    # the margins below are far outside anything float rounding can move
    assert df["train_loss"].iloc[1] < 0.8 * df["train_loss"].iloc[0]
    assert result.metrics["val_accuracy"] > 0.5 and result.metrics["test_accuracy"] > 0.5


# --- end to end: the CLI in a subprocess -------------------------------------------------------
def _qan(*args: str, pythonpath: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    return subprocess.run([sys.executable, "-m", "qan_ray.cli", *args], capture_output=True,
                          text=True, timeout=300, env=env, cwd=TESTS.parent)


@pytest.mark.e2e
def test_cli_episode_runs_the_user_task_and_explains_a_missing_module():
    out = _qan("episode", "--task", TASK, "--episodes", "1", "--epochs-per-episode", "1",
               pythonpath=str(TESTS))
    assert out.returncode == 0, out.stderr
    assert f"task {TASK}: 1 control steps of 35 mini-batches" in out.stdout
    rows = [line.split() for line in out.stdout.splitlines()
            if line.startswith(("fixed", "random"))]
    assert [r[:2] for r in rows] == [["fixed", "0"], ["random", "0"]]
    fixed, random = rows  # controller episode return val-acc test-acc final-lr seconds
    assert float(fixed[5]) == 0.05  # the task config's LR, kept for the one control step
    # the random controller's one action, x2 (index 4 from default_rng(seed 0)), is the
    # episode's first decision, which is replaced by keep (qan_ray.episode): the LR stays
    assert int(np.random.default_rng(0).integers(5)) == 4 and float(random[5]) == 0.05
    # one epoch (35 batches) of the user's CNN at LR 0.05 learns far past chance (0.1):
    # 0.64 val / 0.52 test on x86; 0.3 is out of reach of any float rounding
    assert float(fixed[3]) > 0.3 and float(fixed[4]) > 0.3
    missing = _qan("episode", "--task", TASK, pythonpath=None)
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert ("qan episode: error: `task` is 'user_task_example:make_task', but module "
            "'user_task_example' is not importable here") in missing.stderr
