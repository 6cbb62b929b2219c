from __future__ import annotations

import pytest
import torch

from qan_ray.popoptim import PopulationOptimizer

K = 4
SHAPES = [(5, 3), (5,), (2, 3, 3)]
LRS = [0.01, 0.1, 0.3, 1.0]

CASES = {
    "sgd": dict(kind="sgd"),
    "sgd-momentum": dict(kind="sgd", momentum=0.9),
    "sgd-nesterov-wd": dict(kind="sgd", momentum=0.9, nesterov=True, weight_decay=5e-4),
    "adam": dict(kind="adam"),
    "adam-wd": dict(kind="adam", weight_decay=1e-2, betas=(0.8, 0.99), eps=1e-6),
    "adamw": dict(kind="adamw", weight_decay=1e-2),
    "adamw-strong-wd": dict(kind="adamw", weight_decay=0.5, betas=(0.8, 0.99), eps=1e-6),
}


def _torch_optimizer(params, lr: float, kind: str, **kw) -> torch.optim.Optimizer:
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr, **kw)
    if kind == "adamw":  # decoupled weight decay
        return torch.optim.AdamW(params, lr=lr, **kw)
    return torch.optim.Adam(params, lr=lr, **kw)


def _grads(gen: torch.Generator) -> list[torch.Tensor]:
    return [torch.randn(K, *s, generator=gen) for s in SHAPES]


@pytest.mark.parametrize("case", list(CASES))
def test_member_i_steps_like_a_single_network_optimizer_with_lr_i(case):
    kw = dict(CASES[case])
    kind = kw.pop("kind")
    gen = torch.Generator().manual_seed(0)
    stacked = [torch.randn(K, *s, generator=gen) for s in SHAPES]
    singles = [[p[i].clone().requires_grad_(True) for p in stacked] for i in range(K)]
    refs = [_torch_optimizer(singles[i], LRS[i], kind, **kw) for i in range(K)]
    pop = PopulationOptimizer(stacked, kind, LRS, **kw)
    for _ in range(5):
        grads = _grads(gen)
        pop.step(grads)
        for i in range(K):
            for p, g in zip(singles[i], grads):
                p.grad = g[i].clone()
            refs[i].step()
    for i in range(K):
        for p_pop, p_ref in zip(stacked, singles[i]):
            assert torch.allclose(p_pop[i], p_ref.detach(), rtol=1e-5, atol=1e-6), (case, i)
    if kw.get("momentum"):
        state = refs[2].state[singles[2][0]]["momentum_buffer"]
        assert torch.allclose(pop.bufs[0][2], state, rtol=1e-5, atol=1e-6)
    if kind in ("adam", "adamw"):
        state = refs[1].state[singles[1][0]]
        assert torch.allclose(pop.exp_avgs[0][1], state["exp_avg"], rtol=1e-5, atol=1e-7)
        assert torch.allclose(pop.exp_avg_sqs[0][1], state["exp_avg_sq"], rtol=1e-5, atol=1e-9)
        assert pop.steps.tolist() == [5.0] * K


@pytest.mark.parametrize("kind,kw", [("sgd", {"momentum": 0.9}), ("adam", {}),
                                     ("adamw", {"weight_decay": 0.1})])
def test_reset_member_restarts_that_members_state_alone(kind, kw):
    gen = torch.Generator().manual_seed(1)
    stacked = [torch.randn(K, *s, generator=gen) for s in SHAPES]
    pop = PopulationOptimizer(stacked, kind, LRS, **kw)
    for _ in range(3):
        pop.step(_grads(gen))
    before = [t.clone() for t in pop._state()]
    pop.reset_member(2)
    # member 2 now steps like a fresh single-network optimizer from its current weights
    fresh = [p[2].clone().requires_grad_(True) for p in stacked]
    ref = _torch_optimizer(fresh, LRS[2], kind, **kw)
    grads = _grads(gen)
    pop.step(grads)
    for p, g in zip(fresh, grads):
        p.grad = g[2].clone()
    ref.step()
    for p_pop, p_ref in zip(stacked, fresh):
        assert torch.allclose(p_pop[2], p_ref.detach(), rtol=1e-5, atol=1e-6)
    # the others kept their state: their buffers moved on from `before`, not from zero
    for t, b in zip(pop._state(), before):
        assert not torch.equal(t[0], b[0]) and b[0].abs().sum() > 0
    if kind in ("adam", "adamw"):
        assert pop.steps.tolist() == [4.0, 4.0, 1.0, 4.0]


def test_set_lr_is_per_member_and_checks_the_shape():
    p = [torch.zeros(K, 3)]
    pop = PopulationOptimizer(p, "sgd", 0.5)
    assert pop.lr.tolist() == [0.5] * K
    pop.set_lr([1.0, 2.0, 3.0, 4.0])
    pop.step([torch.ones(K, 3)])
    assert p[0][:, 0].tolist() == [-1.0, -2.0, -3.0, -4.0]
    with pytest.raises(ValueError, match=r"one LR per member, shape \(4,\)"):
        pop.set_lr([1.0, 2.0])
    with pytest.raises(ValueError, match="'rmsprop' is not supported"):
        PopulationOptimizer(p, "rmsprop", 0.1)
    with pytest.raises(ValueError, match="no momentum buffers"):
        from qan_ray.popoptim import sgd_step

        sgd_step(p, [torch.ones(K, 3)], None, pop.lr, momentum=0.9)


def test_state_dict_round_trip():
    gen = torch.Generator().manual_seed(2)
    stacked = [torch.randn(K, *s, generator=gen) for s in SHAPES]
    pop = PopulationOptimizer(stacked, "adam", LRS)
    pop.step(_grads(gen))
    saved, weights = pop.state_dict(), [p.clone() for p in stacked]
    g = _grads(gen)
    pop.step(g)
    after = [p.clone() for p in stacked]
    for p, w in zip(stacked, weights):
        p.copy_(w)
    pop.load_state_dict(saved)
    pop.step(g)
    for p, a in zip(stacked, after):
        assert torch.equal(p, a)


@pytest.mark.parametrize("case", list(CASES))
def test_step_flat_is_step_on_one_flat_tensor(case):
    """The K = 1 trainer's per-batch call gives step([grad])'s numbers bit for bit, through an
    LR change and a momentum switched on mid-run."""
    kw = dict(CASES[case])
    kind = kw.pop("kind")
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(K, 7, generator=gen)
    b = a.clone()
    pa, pb = PopulationOptimizer([a], kind, LRS, **kw), PopulationOptimizer([b], kind, LRS, **kw)
    for t in range(6):
        if t == 3:
            for pop in (pa, pb):
                pop.set_lr([0.2, 0.05, 0.5, 0.01])
                pop.set_hyperparams(momentum=0.5)
        g = torch.randn(K, 7, generator=gen)
        pa.step([g])
        pb.step_flat(g)
        assert torch.equal(a, b), (case, t)
