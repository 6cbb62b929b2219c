"""Mini-batch class selection: the bounded class sampler, its observation, the skewed tasks, the
baselines and the guard in minibatch mode."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from qan_ray.class_sampling import ClassSampler, baseline_shares, target_shares
from qan_ray.config import CLASS_ACTIONS, from_dict
from qan_ray.contract import (
    CLASS_SIGNAL_NAMES,
    ObservationSpec,
    Observer,
    class_signals,
    observation_spec,
    spec_for,
)
from qan_ray.data import load_data
from qan_ray.env import TargetTrainingEnv
from qan_ray.episode import Episodes, prior_val_loss
from qan_ray.population import PopulationTrainer

IMB = from_dict(task="digits-mlp-imbalanced", device="cpu")
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def imb_data():
    return load_data(IMB, CPU)


def _sampler(data, k=2, batch=32, **kw):
    gens = [torch.Generator().manual_seed(s) for s in range(k)]
    s = ClassSampler(data.class_index, data.class_count, k, batch, gens, **kw)
    for i in range(k):
        s.reset_member(i)
    return s


def test_imbalanced_and_noisy_tasks_skew_only_the_training_split():
    base = load_data(from_dict(task="digits-mlp", device="cpu"), CPU)
    imb = load_data(IMB, CPU)
    full = base.class_count.tolist()
    assert imb.class_count.tolist() == [n if c < 5 else math.ceil(n / 8)
                                        for c, n in enumerate(full)]
    for split in ("y_val", "y_test"):  # the same validation and test samples (the inputs
        assert torch.equal(getattr(base, split), getattr(imb, split))  # normalised by train)
    assert torch.allclose(imb.x_val.std(), base.x_val.std(), rtol=0.05)
    noisy = load_data(from_dict(task="digits-mlp-noisy", device="cpu"), CPU)
    assert torch.equal(noisy.x_train, base.x_train) and torch.equal(noisy.y_val, base.y_val)
    changed = noisy.y_train != base.y_train
    assert not changed[base.y_train >= 3].any()  # only classes 0-2 are corrupted
    share = changed[base.y_train < 3].double().mean().item()
    assert 0.3 < share < 0.5  # label_noise 0.4
    assert (noisy.y_train[changed] != base.y_train[changed]).all()  # a different label
    assert from_dict(task="mnist1d-mlp-imbalanced").class_imbalance == 8.0


def test_bad_skew_options_are_refused_naming_the_fix():
    with pytest.raises(ValueError, match="`class_imbalance` is 0.5; it must be a finite ratio"):
        from_dict(task="digits-mlp", class_imbalance=0.5)
    with pytest.raises(ValueError, match="`rare_classes` is \\(3, 12\\); they must be distinct"):
        from_dict(task="digits-mlp", rare_classes=(3, 12))
    with pytest.raises(ValueError, match="`class_step` is 0; it must lie in"):
        from_dict(task="digits-mlp", class_step=0)


def test_actions_never_starve_a_class_and_move_shares_by_a_bounded_step(imb_data):
    s = _sampler(imb_data, k=1)
    p = s.data_shares
    assert np.allclose(s.shares[0], p)  # a run starts with uniform batches
    rng = np.random.default_rng(0)
    bound = (1 - s.floor) * s.step
    for _ in range(200):
        s.class_loss[0] = rng.exponential(size=10)
        before = s.shares[0].copy()
        after = s.act(0, int(rng.integers(len(CLASS_ACTIONS))))
        assert after.sum() == pytest.approx(1.0)
        assert (after >= s.floor * p - 1e-12).all()  # every class keeps half its share
        assert 0.5 * np.abs(after - before).sum() <= bound + 1e-12
    for _ in range(40):  # the hardest class, again and again: still bounded
        s.class_loss[0] = np.eye(10)[3]
        s.act(0, 4)
    assert s.shares[0][3] < 0.5 + s.floor * p[3] + 1e-9
    assert (s.shares[0] >= s.floor * p - 1e-12).all()
    kept = s.shares[0].copy()
    assert np.array_equal(s.act(0, 0), kept)  # keep keeps the mix
    with pytest.raises(ValueError, match="class action 5 is outside 0..4"):
        s.act(0, 5)


def test_toward_balanced_reaches_equal_shares_and_baselines_set_them_exactly(imb_data):
    s = _sampler(imb_data, k=1)
    for _ in range(60):
        s.act(0, 2)
    assert np.allclose(s.shares[0], 0.1, atol=1e-6)  # reachable: no class above 2/C
    p = s.data_shares
    assert np.allclose(baseline_shares("uniform", p), p)
    assert np.allclose(baseline_shares("balanced", p), 0.1)
    loss = np.arange(1.0, 11.0)
    assert np.allclose(baseline_shares("loss-proportional", p, loss), loss / loss.sum())
    assert np.allclose(baseline_shares("loss-proportional", p, None), 0.1)
    assert np.allclose(target_shares(4, p, loss, p), np.eye(10)[9])
    exact = s.set_shares(0, [1.0] + [0.0] * 9)  # a baseline's shares: no floor
    assert exact[0] == 1.0
    with pytest.raises(ValueError, match="must be 10 finite numbers >= 0"):
        s.set_shares(0, [-1.0] + [0.2] * 9)


def test_batches_hold_the_shares_exactly_up_to_rounding_and_walk_each_class(imb_data):
    s = _sampler(imb_data, k=2, batch=32, batches_per_epoch=1000)
    s.set_shares(1, [0.1] * 10)
    y = imb_data.y_train
    seen = [set() for _ in range(10)]
    for _ in range(20):
        idx = s.next_indices()
        assert idx.shape == (2, 32)
        for i in range(2):
            counts = torch.bincount(y[idx[i]], minlength=10).numpy()
            expected = 32 * s.shares[i]
            assert (counts >= np.floor(expected - 1e-9)).all()
            assert (counts <= np.ceil(expected + 1e-9)).all()
        for j in idx[1].tolist():  # member 1: each class's samples in order, no repeat
            seen[int(y[j])].add(j)
    # 20 batches x 3-4 slots per class: every class's first samples without repeats
    n = imb_data.class_count.tolist()
    for c in range(10):
        assert len(seen[c]) == min(n[c], len(seen[c]))
        assert len(seen[c]) >= min(n[c], 60)


def test_sampler_state_resumes_the_same_batches(imb_data):
    a = _sampler(imb_data, k=2, batches_per_epoch=7)
    a.class_loss = [np.arange(10.0), np.ones(10)]
    a.act(0, 3)
    for _ in range(5):
        a.next_indices()
    state = a.state_dict()
    gens = [g.get_state() for g in a.gens]
    first = [a.next_indices() for _ in range(9)]  # crosses a reshuffle
    b = _sampler(imb_data, k=2, batches_per_epoch=7)
    b.load_state_dict(state)
    for g, st in zip(b.gens, gens):
        g.set_state(st)
    assert all(torch.equal(x, b.next_indices()) for x in first)
    assert np.array_equal(a.shares, b.shares)


def test_population_state_dict_and_members_own_shares(imb_data):
    cfg = IMB.replace(batch_size=64)
    pop = PopulationTrainer(cfg, k=2, data=imb_data)
    pop.evaluate_classes("val")
    pop.class_action(1, 2)
    assert pop.class_shares(0) == pytest.approx(pop.data_shares)
    assert pop.class_shares(1) != pytest.approx(pop.data_shares)
    pop.train(3)
    state = pop.state_dict()
    pop.train(4)
    after = pop.theta.clone()
    pop.load_state_dict(state)
    pop.train(4)
    assert torch.allclose(pop.theta, after)
    with pytest.raises(ValueError, match="needs action_mode 'minibatch'"):
        PopulationTrainer(cfg.replace(action_mode="lr"), k=1, data=imb_data).class_action(0, 1)


def test_evaluate_classes_agrees_with_evaluate(imb_data):
    pop = PopulationTrainer(IMB, k=2, data=imb_data)
    pop.train(10)
    loss, acc = pop.evaluate("val")
    out = pop.evaluate_classes("val")
    assert torch.allclose(out["loss"], loss.double(), atol=1e-5)
    assert torch.allclose(out["accuracy"], acc.double())
    assert out["class_loss"].shape == (2, 10)
    assert torch.allclose(out["balanced_accuracy"], out["class_accuracy"].mean(dim=1))
    y = imb_data.y_val
    weights = torch.bincount(y, minlength=10).double() / len(y)
    assert torch.allclose((out["class_accuracy"] * weights).sum(1), out["accuracy"])


def test_class_observation_is_in_the_spec_and_a_mismatch_is_refused():
    spec = observation_spec(IMB)
    assert spec.class_signals and spec.size == ObservationSpec().size + len(CLASS_SIGNAL_NAMES)
    assert spec.feature_names[-1] == "signal.nonfinite"
    assert ObservationSpec.from_dict(spec.to_dict()).mismatch(spec) is None
    lr_spec = observation_spec(IMB.replace(action_mode="lr"))
    assert "per-class signals (minibatch mode) True vs False" in spec.mismatch(lr_spec)
    ctrl = spec_for(IMB, (8,))
    with pytest.raises(ValueError, match="per-class signals"):
        ctrl.check_fits(lr_spec, "the trials")
    with pytest.raises(ValueError, match="needs the per-class signals"):
        Observer(spec).observe_weights(np.zeros(576), lr=0.1, train_loss=2.0, val_loss=2.0,
                                       val_accuracy=0.1, progress=0.0)


def test_class_block_is_invariant_to_relabelling_the_classes():
    rng = np.random.default_rng(1)
    inputs = {"class_loss": rng.exponential(size=10), "class_accuracy": rng.random(10),
              "shares": rng.dirichlet(np.ones(10)), "data_shares": rng.dirichlet(np.ones(10))}
    perm = rng.permutation(10)
    a = class_signals(10, **inputs)
    b = class_signals(10, **{k: v[perm] for k, v in inputs.items()})
    assert a.shape == (len(CLASS_SIGNAL_NAMES),) and np.array_equal(a, b)
    hardest = int(np.argmax(inputs["class_loss"]))
    assert a[0] == pytest.approx(math.log(inputs["class_loss"][hardest] / math.log(10)))


def test_minibatch_env_observes_classes_and_its_actions_move_the_shares():
    env = TargetTrainingEnv(IMB)
    obs, info = env.reset(seed=0)
    assert env.action_space.n == 5 and obs.shape == (observation_spec(IMB).size,)
    assert info["class_shares"] == pytest.approx(env.trainer.population.data_shares)
    _, _, _, _, info = env.step(2)  # toward balanced: the rare classes gain
    assert min(info["class_shares"][5:]) > max(env.trainer.population.data_shares[5:])
    assert env.actions.labels == list(CLASS_ACTIONS) and env.actions.keep_action == 0


def test_the_guard_rescues_a_dying_run_in_minibatch_mode():
    env = TargetTrainingEnv(IMB.replace(lr=1.0, momentum=0.99))
    env.reset(seed=0)
    rescued = []
    for _ in range(4):
        _, reward, _, _, info = env.step(0)
        rescued.append(info["rescued"])
        if info["rescued"]:
            assert reward == -IMB.rescue_penalty and info["lr"] == pytest.approx(0.1)
            break
    assert any(rescued)


def test_the_guard_accepts_the_class_prior_of_an_imbalanced_split():
    counts = np.array([100] * 5 + [10] * 5)
    labels = np.repeat(np.arange(10), 20)
    prior = prior_val_loss(counts, labels)
    assert prior > math.log(10)  # predicting the training prior costs more on balanced val
    ep = Episodes(IMB, 2, total_batches=4 * IMB.control_interval)
    ep.start(0, 0.05, 2.3, 2.3, 0.1)
    ep.start(1, 0.05, 2.3, 2.3, 0.1, val_reference=prior)
    out = ep.step([0, 1], [2.0, 2.0], [2.5, 2.5], [0.3, 0.3], [2.3, 2.3], [False, False])
    assert out.rescued.tolist() == [True, False]


def test_a_trainable_applies_each_class_decision_once():
    from qan_ray.trainer import TargetTrainer
    from trainables.targets import apply_hyperparams

    tr = TargetTrainer(IMB)
    tr.evaluate_classes("val")
    apply_hyperparams(tr, {"class_action": 2, "class_decision": 1})
    first = tr.class_shares
    assert first != pytest.approx(tr.population.data_shares)
    apply_hyperparams(tr, {"class_action": 2, "class_decision": 1})  # the same decision again
    assert tr.class_shares == first
    apply_hyperparams(tr, {"class_action": 2, "class_decision": 2})
    assert tr.class_shares != pytest.approx(first)
