from __future__ import annotations

import math

import pytest
import torch

from qan_ray.config import from_dict
from qan_ray.contract import action_spec
from qan_ray.control import apply_action
from qan_ray.schedules import baseline_schedule
from qan_ray.trainer import TargetTrainer


def _params(tr: TargetTrainer) -> list[torch.Tensor]:
    return [p.detach().clone() for p in tr.model.parameters()]


def _delta(tr: TargetTrainer, state: dict, lr: float) -> list[torch.Tensor]:
    tr.load_state_dict(state)
    tr.set_lr(lr)
    before = _params(tr)
    tr.train(1)
    return [a - b for a, b in zip(_params(tr), before)]


def test_lr_action_reaches_the_optimizer_on_the_next_minibatch():
    # The original QAN bug: the chosen LR never reached SGD. With momentum 0, one step moves the
    # weights by -lr * grad, so doubling the LR through the action must double the step.
    tr = TargetTrainer(from_dict(momentum=0.0, lr=0.05))
    state = tr.state_dict()
    apply_action(tr, 4)  # x2
    assert float(tr.population.optimizer.lr[0]) == pytest.approx(0.1)  # what the step uses
    before = _params(tr)
    tr.train(1)
    doubled = [a - b for a, b in zip(_params(tr), before)]
    base = _delta(tr, state, 0.05)
    for d2, d1 in zip(doubled, base):
        assert torch.allclose(d2, 2 * d1, rtol=1e-4, atol=1e-7)


def test_lr_actions_clamp_and_restart():
    cfg = from_dict(lr=0.5, lr_max=0.8, restart_lr=0.05)
    rule = action_spec(cfg)
    assert rule.next_lr(0.5, 4) == 0.8  # x2 clamped to lr_max
    assert rule.next_lr(2e-5, 0) == 1e-5  # x0.5 clamped to lr_min
    assert rule.next_lr(0.5, 5) == 0.05  # restart
    tr = TargetTrainer(cfg)
    apply_action(tr, 5)
    assert tr.lr == 0.05 and float(tr.population.optimizer.lr[0]) == pytest.approx(0.05)
    with pytest.raises(ValueError, match="action 6 is outside 0..5"):
        apply_action(TargetTrainer(cfg), 6)


def test_minibatch_action_sets_class_composition_of_next_batches():
    tr = TargetTrainer(from_dict(action_mode="minibatch", batch_size=128))
    data = tr.population.data_shares
    assert tr.batch_composition() == pytest.approx([128 * p for p in data])  # uniform first
    tr.evaluate_classes("val")  # the class losses the actions read
    apply_action(tr, 2)  # toward balanced by class_step (0.25) of the way
    expected = [128 * (p + 0.25 * (0.1 - p)) for p in data]
    assert tr.batch_composition() == pytest.approx(expected)
    for _ in range(3):  # each batch: the expected counts, rounded up or down
        labels = tr.data.y_train[tr.population._next_indices()[0]]
        counts = torch.bincount(labels, minlength=10).tolist()
        assert all(math.floor(e) <= n <= math.ceil(e) for n, e in zip(counts, expected))


def test_state_dict_resumes_bit_identical_training():
    tr = TargetTrainer(from_dict(action_mode="minibatch"))
    tr.train(5)
    apply_action(tr, 2)
    state = tr.state_dict()
    tr.train(7)
    first = _params(tr)
    tr.train(3)  # move away, then come back
    tr.load_state_dict(state)
    tr.train(7)
    assert all(torch.equal(a, b) for a, b in zip(first, _params(tr)))
    assert tr.step == 12

    lr_mode = TargetTrainer(from_dict(momentum=0.9))
    lr_mode.train(50)  # crosses an epoch boundary (batch order permutation is part of the state)
    state = lr_mode.state_dict()
    lr_mode.train(40)
    first = _params(lr_mode)
    lr_mode.load_state_dict(state)
    lr_mode.train(40)
    assert all(torch.equal(a, b) for a, b in zip(first, _params(lr_mode)))


def test_meta_momentum_pulls_toward_reference_by_coefficient():
    cfg = from_dict(mm_coef=0.01, mm_active_fraction=1.0)
    tr = TargetTrainer(cfg)
    ref = [torch.zeros_like(p) + 0.5 for p in tr.monitored_weights()]
    state = tr.state_dict()
    tr.set_reference([ref])
    tr.train(1)
    pulled = [p.detach().clone() for p in tr.monitored_weights()]
    tr.set_reference(None)  # same step without the pull
    tr.load_state_dict(state)
    tr.train(1)
    plain = [p.detach().clone() for p in tr.monitored_weights()]
    for a, b, w in zip(pulled, plain, ref):
        assert torch.allclose(a, b + 0.01 * (w - b), atol=1e-7)


def test_meta_momentum_off_when_disabled_or_after_active_fraction():
    for cfg in (from_dict(mm_coef=0.0), from_dict(mm_coef=0.01, mm_active_fraction=0.0)):
        tr = TargetTrainer(cfg)
        tr.set_reference([[torch.zeros_like(p) for p in tr.monitored_weights()]])
        state = tr.state_dict()
        tr.train(2)
        with_ref = _params(tr)
        tr.set_reference(None)
        tr.load_state_dict(state)
        tr.train(2)
        assert all(torch.equal(a, b) for a, b in zip(with_ref, _params(tr)))


def test_reference_with_wrong_shapes_is_rejected():
    tr = TargetTrainer(from_dict())
    with pytest.raises(ValueError, match="do not match the monitored layers"):
        tr.set_reference([[torch.zeros(3)]])


def test_divergence_is_detected_not_raised():
    tr = TargetTrainer(from_dict(lr=50.0, lr_max=100.0, momentum=0.9))
    loss = tr.train(30)
    assert tr.diverged(loss)
    assert not tr.diverged(tr.initial_loss)


def test_train_reduces_loss_and_evaluates_both_splits():
    tr = TargetTrainer(from_dict())
    loss = tr.train(tr.batches_per_epoch * 2)
    val_loss, val_acc = tr.evaluate("val")
    test_loss, test_acc = tr.evaluate("test")
    assert loss < tr.initial_loss and val_acc > 0.8 and test_acc > 0.8


@pytest.mark.parametrize("name, at, expected", [
    ("fixed", 0.9, 0.1), ("step", 0.6, 0.01), ("step", 0.8, 0.001), ("cosine", 0.5, 0.05),
])
def test_baseline_schedules(name, at, expected):
    assert baseline_schedule(name, 0.1)(at) == pytest.approx(expected)


def test_adamw_task_trains_with_decoupled_weight_decay():
    """optimizer "adamw" in a task: the trainer's population optimizer is AdamW (Adam's state,
    decoupled decay: tests/test_popoptim.py checks its arithmetic against torch.optim.AdamW),
    it learns digits, and the task's description names it."""
    from qan_ray.distribution import describe

    cfg = from_dict(optimizer="adamw", lr=0.003, momentum=0.0, weight_decay=0.05)
    tr = TargetTrainer(cfg)
    opt = tr.population.optimizer
    assert (opt.name, opt.kind, opt.decoupled, opt.weight_decay) == ("adamw", "adam", True, 0.05)
    loss = tr.train(tr.batches_per_epoch * 2)
    assert loss < tr.initial_loss and tr.evaluate("val")[1] > 0.8
    assert " adamw " in describe(cfg)
    with pytest.raises(ValueError, match=r"\('sgd', 'adam', 'adamw', 'prodigy'"):
        from_dict(optimizer="adamw2")
