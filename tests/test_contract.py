"""The controller contract: one observation for training and Tune, specs checked on load."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from policies.qnet import BUILTIN, Controller, load_controller, plain_qnet
from qan_ray.config import from_dict
from qan_ray.contract import (
    OBS_VERSION,
    SIGNAL_NAMES,
    ActionSpec,
    ControllerSpec,
    ObservationSpec,
    Observer,
    clean,
    greedy_action,
    spec_for,
    write_lr,
)
from qan_ray.env import TargetTrainingEnv
from qan_ray.tune import QANReporter


def test_env_and_tune_reporter_build_the_same_vector_element_by_element():
    """The environment (meta-training) and a Tune-style reporter over the same model state, the
    same losses and the same LR history give identical observations at every control point."""
    env = TargetTrainingEnv(from_dict(task="digits-mlp", device="cpu", epochs_per_episode=2.0))
    obs, info = env.reset(seed=7)
    reporter = QANReporter({"lr": env.cfg.lr}, channel=None, features=True)
    reporter.start(train_loss=info["train_loss"], val_loss=info["val_loss"],
                   val_accuracy=info["val_accuracy"], lr=info["lr"])
    for action in (4, 4, 2, 0, 1, 3):  # x2, x2, keep, x0.5, x0.9, x1.1
        obs, _, done, _, info = env.step(action)
        out = reporter.metrics(env.trainer.model, train_loss=info["train_loss"],
                               val_loss=info["val_loss"], val_accuracy=info["val_accuracy"],
                               progress=env.trainer.progress, lr=info["lr"])
        assert np.array_equal(np.asarray(out["qan_obs"], np.float32), obs)
        assert not done
    names = env.observer.spec.feature_names
    assert obs[names.index("signal.last_log_lr_change")] == pytest.approx(math.log(1.1))


def test_observer_signals_do_not_depend_on_the_loss_scale():
    """Slope, noise and the train/val gap are log ratios: scaling every loss by 7 leaves them."""
    def run(scale):
        obs = Observer(ObservationSpec(with_weights=False), 0.1)
        rows = [obs.signals(lr=0.1 * (2 ** i), train_loss=scale * l, val_loss=scale * 1.2 * l,
                            val_accuracy=0.5, progress=i / 4)
                for i, l in enumerate([2.3, 1.5, 1.2, 0.9, 0.85])]
        return rows[-1]
    a, b = run(1.0), run(7.0)
    for name in ("loss_slope", "loss_noise", "train_val_gap", "log_lr_vs_initial",
                 "last_log_lr_change", "since_lr_change"):
        i = SIGNAL_NAMES.index(name)
        assert a[i] == pytest.approx(b[i]), name
    assert a[SIGNAL_NAMES.index("log_lr_vs_initial")] == pytest.approx(4 * math.log(2))
    assert a[SIGNAL_NAMES.index("loss_slope")] == pytest.approx(
        (math.log(0.85) - math.log(1.5)) / 3)


def test_observer_state_survives_a_checkpoint():
    a = Observer(ObservationSpec(with_weights=False), 0.2)
    for i, l in enumerate([2.0, 1.0, 0.8]):
        a.signals(lr=0.2, train_loss=l, val_loss=l, val_accuracy=0.4, progress=i / 5)
    b = Observer(ObservationSpec(with_weights=False), 1.0)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    kw = dict(lr=0.1, train_loss=0.7, val_loss=0.9, val_accuracy=0.6, progress=0.6)
    assert a.signals(**kw) == b.signals(**kw)


def _legacy_spec(tmp_path, obs_size=392):
    """A controller folder as qan-ray wrote it before the contract (per-layer observation)."""
    folder = tmp_path / "legacy"
    folder.mkdir()
    torch.save(plain_qnet(obs_size, (8,), 5).state_dict(), folder / "qnet.pt")
    (folder / "spec.json").write_text(json.dumps({
        "obs_size": obs_size, "num_actions": 5, "hidden": [8], "action_mode": "lr",
        "qan": {"task": "digits-mlp", "lr_factors": [0.5, 0.9, 1.0, 1.1, 2.0]},
        "feature_names": [f"net.1.all.s{i}" for i in range(obs_size)]}))
    return folder


def test_loading_an_old_format_controller_names_both_sides_and_the_fix(tmp_path):
    folder = _legacy_spec(tmp_path)
    legacy = load_controller(folder)  # readable ...
    assert legacy.spec.observation.version == 1 and legacy.obs_size == 392
    with pytest.raises(ValueError) as err:  # ... but refused where an observation is checked
        load_controller(folder, expect=ObservationSpec(), where="task 'digits-mlp'")
    text = str(err.value)
    assert f"observation format 1 vs {OBS_VERSION}" in text
    assert "392 features" in text and "qan train --task digits-mlp" in text


def test_feature_names_are_compared_not_only_the_length():
    mine = ObservationSpec()
    renamed = ObservationSpec(names=tuple(n.replace("w.first", "w.last")
                                          for n in mine.feature_names))
    why = renamed.mismatch(mine)
    assert why is not None and "first difference at #0" in why and "'w.last.all.mean'" in why
    assert mine.mismatch(ObservationSpec()) is None
    assert "with_weights True vs False" in mine.mismatch(ObservationSpec(with_weights=False))


def test_controller_spec_round_trips_and_reads_action_mode(tmp_path):
    cfg = from_dict(task="digits-mlp", action_mode="minibatch")
    spec = spec_for(cfg, (16, 16), {"episodes": 3})
    ctrl = Controller(plain_qnet(spec.obs_size, spec.hidden, spec.num_actions), spec)
    loaded = load_controller(ctrl.save(tmp_path / "c"))
    assert loaded.spec.to_dict() == json.loads(json.dumps(spec.to_dict()))
    assert loaded.spec.action.mode == "minibatch" and loaded.num_actions == 5
    assert loaded.spec.observation.class_signals
    assert loaded.spec.provenance["episodes"] == 3 and loaded.spec.task["task"] == "digits-mlp"


def test_builtin_controller_is_of_the_current_format():
    spec = ControllerSpec.load(BUILTIN / "spec.json")
    assert spec.observation.mismatch(ObservationSpec()) is None


@pytest.mark.parametrize("content, needle", [
    (b"", "is not a readable controller"),
    (b"garbage bytes", "is not a readable controller"),
])
def test_corrupt_weights_name_the_file_and_never_suggest_weights_only_false(tmp_path, content,
                                                                            needle):
    spec = spec_for(from_dict(task="digits-mlp"), (8,))
    folder = Controller(plain_qnet(spec.obs_size, (8,), 5), spec).save(tmp_path / "c")
    (folder / "qnet.pt").write_bytes(content)
    with pytest.raises(ValueError, match=needle) as err:
        load_controller(folder)
    assert "qnet.pt" in str(err.value) and "weights_only" not in str(err.value)


def test_bad_spec_json_names_the_file(tmp_path):
    (tmp_path / "spec.json").write_text('{"format": 2, "observation": ')
    (tmp_path / "qnet.pt").write_bytes(b"")
    with pytest.raises(ValueError, match=r"spec.json is not a valid controller spec"):
        load_controller(tmp_path)


def _copy_builtin(tmp_path):
    import shutil

    folder = tmp_path / "c"
    shutil.copytree(BUILTIN, folder)
    return folder, json.loads((folder / "spec.json").read_text())


def test_a_spec_whose_size_and_names_disagree_is_refused_naming_spec_json(tmp_path):
    folder, spec = _copy_builtin(tmp_path)
    spec["observation"]["size"] = 600  # beside its 589 names
    (folder / "spec.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match=r"spec.json is not a valid controller spec: its "
                                         r"observation declares size 600 but lists 589"):
        load_controller(folder)


def test_a_spec_with_too_few_features_blames_spec_json_not_qnet_pt(tmp_path):
    folder, spec = _copy_builtin(tmp_path)
    names = spec["observation"]["feature_names"][:100]
    spec["observation"].update(feature_names=names, size=100)
    (folder / "spec.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match=r"spec.json is not a valid controller spec: .*lists "
                                         r"100 feature names where the format has 589") as err:
        load_controller(folder)
    assert "truncated" not in str(err.value)


def test_weights_of_another_controller_are_named_as_such(tmp_path):
    folder, spec = _copy_builtin(tmp_path)
    torch.save(plain_qnet(13, (8,), 5).state_dict(), folder / "qnet.pt")  # signals-only width
    with pytest.raises(ValueError, match=r"qnet.pt takes 13 inputs but .*spec.json describes "
                                         r"589 features: the two files are from different"):
        load_controller(folder)
    torch.save(plain_qnet(589, (8,), 5).state_dict(), folder / "qnet.pt")  # other hidden width
    with pytest.raises(ValueError, match=r"qnet.pt does not match the network .*spec.json"):
        load_controller(folder)


def test_action_spec_is_the_one_lr_rule():
    a = ActionSpec(lr_factors=(0.5, 1.0, 2.0), restart_lr=0.05, lr_min=1e-3, lr_max=0.8)
    assert a.labels == ["x0.5", "keep", "x2", "restart 0.05"] and a.keep == 1
    assert a.next_lr(0.5, 2) == 0.8 and a.next_lr(2e-3, 0) == 1e-3 and a.next_lr(0.5, 3) == 0.05
    assert ActionSpec(lr_factors=(0.97, 1.2)).keep is None
    with pytest.raises(ValueError, match="action 4 is outside 0..3"):
        a.next_lr(0.1, 4)
    with pytest.raises(ValueError, match="factors must be > 0"):
        ActionSpec(lr_factors=(0.0,)).validate()


def test_greedy_action_ignores_nan_and_inf():
    assert greedy_action([0.1, 0.7, -1.0], fallback=2) == 1
    assert greedy_action([float("nan"), 0.3, 0.2], fallback=2) == 1
    assert greedy_action([float("nan"), float("nan")], fallback=1) == 1
    assert greedy_action([float("inf"), float("nan")], fallback=0) == 0
    ctrl = Controller(plain_qnet(len(SIGNAL_NAMES), (2,), 5), spec_for(
        from_dict(task="digits-mlp", weight_features=False), (2,)))
    with torch.no_grad():
        ctrl.net[-1].bias.fill_(float("nan"))
    assert ctrl.act(np.zeros(ctrl.obs_size, np.float32)) == 2  # all NaN: keep the LR


def test_write_lr_sets_every_param_group_and_clean_counts_nonfinite():
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD([{"params": [model.weight]}, {"params": [model.bias]}], lr=1.0)
    assert write_lr(opt, 0.25) == 0.25
    assert [g["lr"] for g in opt.param_groups] == [0.25, 0.25]
    obs = clean([1.0, float("nan"), float("inf"), 0.0], 4)
    assert obs.tolist() == [1.0, 0.0, 0.0, 2.0]
    with pytest.raises(ValueError, match="has 3 values but the controller expects 392"):
        clean([0.0] * 3, 392)


def test_cosine_schedule_keep_is_plain_cosine_and_actions_correct_it():
    a = ActionSpec(schedule="cosine", lr_min=1e-5, lr_max=1.0)
    assert a.scheduled_lr(0.2, 1.0, 0.0) == pytest.approx(0.2)
    assert a.scheduled_lr(0.2, 1.0, 0.5) == pytest.approx(0.1)
    assert a.scheduled_lr(0.2, 1.0, 1.0) == 1e-5  # clamped at lr_min
    c = a.next_correction(1.0, 4, 0.2)  # x2
    assert c == 2.0 and a.scheduled_lr(0.2, c, 0.5) == pytest.approx(0.2)
    assert a.next_correction(1.0, 2, 0.2) == 1.0  # keep
    with pytest.raises(ValueError, match="LR schedule 'linear'"):
        ActionSpec(schedule="linear").validate()


def test_env_with_a_cosine_schedule_and_keep_actions_follows_cosine_exactly():
    cfg = from_dict(task="digits-mlp", device="cpu", epochs_per_episode=1.0, lr=0.2,
                    lr_schedule="cosine")
    env = TargetTrainingEnv(cfg)
    env.reset(seed=0)
    lrs, expected, done = [], [], False
    while not done:
        expected.append(0.2 * 0.5 * (1 + math.cos(math.pi * env.trainer.progress)))
        _, _, done, _, info = env.step(2)  # keep
        lrs.append(info["lr"])
    assert lrs == pytest.approx(expected)
    env.reset(seed=0)
    env.step(4)  # the first decision is keep, whatever the action
    assert env.trainer.lr == pytest.approx(0.2) and env.episodes.correction[0] == 1.0
    progress = env.trainer.progress
    env.step(4)  # x2 on the schedule
    assert env.trainer.lr == pytest.approx(0.4 * 0.5 * (1 + math.cos(math.pi * progress)))
    assert env.episodes.correction[0] == 2.0
