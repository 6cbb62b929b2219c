from __future__ import annotations

import io

import pytest
import torch
from torch.nn import functional as F

from qan_ray.config import from_dict
from qan_ray.data import load_data
from qan_ray.models import build_model
from qan_ray.population import PopulationTrainer, cross_entropy
from qan_ray.trainer import TargetTrainer

CFG = from_dict(task="digits-mlp")


@pytest.fixture(scope="module")
def data():
    return load_data(CFG, torch.device("cpu"))


def _plain_loop(cfg, data, seed: int, lr: float, batches: int) -> list[float]:
    """The training of one network as a bare torch loop: seeded init, torch.optim (SGD with the
    config's momentum/Nesterov/weight decay, or Adam), a fresh on-device permutation per epoch
    from a generator seeded like the trainer's."""
    torch.manual_seed(seed)
    model = build_model(cfg, data.input_shape, 10)
    if cfg.optimizer == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=cfg.momentum,
                              nesterov=cfg.nesterov, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(seed)
    b, n = cfg.batch_size, data.n_train
    perm, pos, losses = None, n, []
    for _ in range(batches):
        if pos + b > n:
            perm, pos = torch.randperm(n, generator=gen), 0
        idx = perm[pos:pos + b]
        pos += b
        loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("opt", [dict(), dict(nesterov=True, weight_decay=1e-3),
                                 dict(optimizer="adam", lr=0.01, momentum=0.0)])
def test_k1_gives_the_plain_torch_loops_numbers(data, opt):
    # 80 batches cross two epoch boundaries (35 batches per epoch): new permutations included.
    cfg = CFG.replace(**opt)
    tr = TargetTrainer(cfg, data=data)  # a population of one: the plain forward/backward path
    assert tr.population.k == 1 and tr.population.direct
    ref = _plain_loop(cfg, data, cfg.seed, cfg.lr, 80)
    got = [tr.train(1) for _ in range(80)]
    assert got == pytest.approx(ref, rel=1e-5, abs=1e-6)
    # member 0 of a population of 3 (the vmap path) is the same run
    pop = PopulationTrainer(cfg, seeds=[cfg.seed, 1, 2], data=data)
    assert pop.initial_loss[0] == pytest.approx(tr.initial_loss, rel=1e-6)
    assert [float(pop.train(1)[0]) for _ in range(80)] == pytest.approx(got, rel=1e-4, abs=1e-6)
    loss, acc = pop.evaluate("val")
    assert (float(loss[0]), float(acc[0])) == pytest.approx(tr.evaluate("val"), rel=1e-4)
    for p_pop, p_tr in zip(pop.member_model(0).parameters(), tr.model.parameters()):
        assert torch.allclose(p_pop, p_tr, rtol=1e-4, atol=1e-5)


def test_k1_trains_a_batchnorm_model_and_resumes_its_running_stats(data):
    cfg = from_dict(task="digits-mlp", model="wrn", wrn_depth=10, wrn_width=1, batch_size=64,
                    augment=False)
    cpu = load_data(cfg, torch.device("cpu"))
    tr = TargetTrainer(cfg, data=cpu)
    bn = next(m for m in tr.model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    before = bn.running_mean.clone()
    tr.train(3)
    assert not torch.equal(bn.running_mean, before)  # the buffers train in the member module
    state = tr.state_dict()
    cont = tr.train(2), tr.evaluate("val")
    tr.reset(5)
    assert torch.equal(bn.running_mean, torch.zeros_like(before))  # a fresh init resets them
    tr.load_state_dict(state)
    assert (tr.train(2), tr.evaluate("val")) == cont


def test_member_i_trains_with_its_own_seed_and_lr(data):
    seeds, lrs = [3, 4, 5], [0.01, 0.05, 0.2]
    pop = PopulationTrainer(CFG, seeds=seeds, data=data)
    assert pop.set_lr(lrs) == pytest.approx(lrs)
    losses = torch.stack([pop.train(1) for _ in range(40)], dim=1)  # (K, 40)
    for i, (s, lr) in enumerate(zip(seeds, lrs)):
        ref = _plain_loop(CFG, data, s, lr, 40)
        assert losses[i].tolist() == pytest.approx(ref, rel=1e-4, abs=1e-6), i
    # the members really differ (not K copies of one run)
    assert len({round(v, 4) for v in losses[:, -1].tolist()}) == 3


def test_reset_member_restarts_one_member_alone(data):
    pop = PopulationTrainer(CFG, seeds=[0, 1, 2], data=data)
    pop.set_lr([0.05, 0.3, 0.05])
    first = pop.train(20)
    pop.reset_member(1, seed=7)
    assert pop.lr == [0.05, CFG.lr, 0.05] and pop.steps.tolist() == [20, 0, 20]
    after = torch.stack([pop.train(1) for _ in range(20)], dim=1)
    assert after[1].tolist() == pytest.approx(_plain_loop(CFG, data, 7, CFG.lr, 20), rel=1e-4)
    for i in (0, 2):  # the others continue their run uninterrupted
        ref = _plain_loop(CFG, data, i, 0.05, 40)
        assert sum(ref[:20]) / 20 == pytest.approx(float(first[i]), rel=1e-4)
        assert after[i].tolist() == pytest.approx(ref[20:], rel=1e-4, abs=1e-6)
    with pytest.raises(ValueError, match="member 3 is outside 0..2"):
        pop.reset_member(3, 0)


def test_evaluate_is_batched_and_equals_each_member(data):
    pop = PopulationTrainer(CFG, k=4, data=data)
    pop.set_lr([0.01, 0.05, 0.1, 0.5])
    pop.train(30)
    loss, acc = pop.evaluate("test")
    assert loss.shape == acc.shape == (4,)
    for i in range(4):
        with torch.no_grad():
            out = pop.member_model(i)(data.x_test)
        assert float(loss[i]) == pytest.approx(F.cross_entropy(out, data.y_test).item(), rel=1e-5)
        assert float(acc[i]) == pytest.approx((out.argmax(1) == data.y_test).float().mean().item())
    with pytest.raises(ValueError, match="split 'train' must be 'val' or 'test'"):
        pop.evaluate("train")


def test_member_model_shares_the_population_weights(data):
    pop = PopulationTrainer(CFG, k=2, data=data)
    w = pop.member_model(1).net[1].weight
    before = w.detach().clone()
    pop.train(3)
    assert not torch.equal(w.detach(), before)  # a view of row 1, updated in place
    assert torch.equal(pop.stacked_params["net.1.weight"][1], w.detach())


def test_divergence_is_flagged_per_member(data):
    pop = PopulationTrainer(CFG.replace(lr_max=1e4), k=3, data=data)
    pop.set_lr([0.05, 1e4, 0.05])
    losses = pop.train(10)
    flags = pop.diverged(losses)
    assert flags.tolist() == [False, True, False]
    assert torch.isfinite(losses[[0, 2]]).all()  # a diverged member does not leak into others


def test_set_lr_clamps_and_checks_the_count(data):
    pop = PopulationTrainer(CFG, k=3, data=data)
    assert pop.set_lr([1e-9, 0.1, 50.0]) == [CFG.lr_min, 0.1, CFG.lr_max]
    assert pop.set_lr(0.2) == [0.2] * 3
    with pytest.raises(ValueError, match="set_lr got 2 LRs for a population of 3"):
        pop.set_lr([0.1, 0.2])


def test_state_dict_resumes_bit_identically(data):
    pop = PopulationTrainer(CFG.replace(optimizer="adam", lr=0.01), k=3, data=data)
    pop.train(20)
    state = pop.state_dict()
    cont = pop.train(30)
    other = PopulationTrainer(CFG.replace(optimizer="adam", lr=0.01), k=3, seeds=[9, 9, 9],
                              data=data)
    buf = io.BytesIO()
    torch.save(state, buf)  # what a Tune checkpoint holds; read back the safe way
    buf.seek(0)
    other.load_state_dict(torch.load(buf, weights_only=True))
    assert torch.equal(other.train(30), cont)
    with pytest.raises(ValueError, match="load it into a PopulationTrainer of the same"):
        PopulationTrainer(CFG, k=2, data=data).load_state_dict(state)


@pytest.mark.parametrize("task,model", [("digits-mlp", "resnet"), ("mnist1d-cnn", "resnet1d")])
def test_a_batchnorm_population_member_equals_its_single_network_run(task, model):
    cfg = from_dict(task=task, model=model, lr=0.02)
    cpu = load_data(cfg, torch.device("cpu"))
    pop = PopulationTrainer(cfg, seeds=[5, 6, 7], data=cpu)
    one = PopulationTrainer(cfg, seeds=[6], data=cpu)  # K = 1: the module's own BatchNorm
    assert pop.initial_loss[1] == pytest.approx(one.initial_loss[0], rel=1e-6)
    got = [float(pop.train(1)[1]) for _ in range(12)]
    assert got == pytest.approx([float(one.train(1)[0]) for _ in range(12)], rel=1e-4, abs=1e-6)
    # the running statistics: (K, *shape) rows, member 1's equal to the single run's
    mean = next(n for n in pop.stacked_buffers if n.endswith("running_mean"))
    assert pop.stacked_buffers[mean].shape[0] == 3
    for name, b in pop.stacked_buffers.items():
        assert torch.allclose(b[1].double(), one.stacked_buffers[name][0].double(), rtol=1e-4,
                              atol=1e-5), name
    assert int(pop.stacked_buffers[mean.replace("running_mean", "num_batches_tracked")][1]) == 12
    # the member module's buffers are views of its row
    bn = dict(pop.member_model(2).named_buffers())[mean]
    assert bn.data_ptr() == pop.stacked_buffers[mean][2].data_ptr()
    # eval mode uses each member's running statistics
    loss, acc = pop.evaluate("val")
    assert (float(loss[1]), float(acc[1])) == pytest.approx(
        (float(one.evaluate("val")[0][0]), float(one.evaluate("val")[1][0])), rel=1e-4)
    assert not torch.allclose(pop.stacked_buffers[mean][0], pop.stacked_buffers[mean][1])


def test_population_buffers_snapshot_rollback_reset_and_resume(data):
    cfg = from_dict(task="digits-mlp", model="resnet", lr=0.02)
    pop = PopulationTrainer(cfg, k=3, data=data)
    fresh = {n: b.clone() for n, b in pop.stacked_buffers.items()}
    pop.train(3)
    pop.snapshot([0])
    kept = {n: b[0].clone() for n, b in pop.stacked_buffers.items()}
    pop.train(2)
    pop.rollback([0])
    for n, b in pop.stacked_buffers.items():
        assert torch.equal(b[0], kept[n]), n  # the rescue guard's rollback restores them
    pop.reset_member(1, pop.seeds[1])
    for n, b in pop.stacked_buffers.items():
        assert torch.equal(b[1], fresh[n][1]), n  # a fresh member starts from fresh statistics
        assert not torch.equal(b[2], fresh[n][2]), n  # the others keep theirs
    state = pop.state_dict()
    cont = pop.train(3), pop.evaluate("val")
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    other = PopulationTrainer(cfg, k=3, data=data)
    other.load_state_dict(torch.load(buf, weights_only=True))
    assert torch.equal(other.train(3), cont[0])
    assert [torch.equal(a, b) for a, b in zip(other.evaluate("val"), cont[1])] == [True, True]


def test_bad_sizes_and_unsupported_modes_are_refused(data):
    with pytest.raises(ValueError, match="k=3 but 2 seeds"):
        PopulationTrainer(CFG, k=3, seeds=[0, 1], data=data)
    with pytest.raises(ValueError, match="k >= 1"):
        PopulationTrainer(CFG, seeds=[], data=data)


def test_minibatch_mode_composes_each_members_batches_from_its_own_shares(data):
    cfg = CFG.replace(action_mode="minibatch", batch_size=128)
    cpu = load_data(cfg, torch.device("cpu"))
    pop = PopulationTrainer(cfg, k=3, data=cpu)
    pop.set_class_shares(1, [0.5] + [0.5 / 9] * 9)  # member 1: class 0 gets half
    idx = pop._next_indices()
    counts = [torch.bincount(cpu.y_train[idx[i]], minlength=10).tolist() for i in range(3)]
    assert counts[1][0] == 64 and all(7 <= n <= 8 for n in counts[1][1:])
    for i in (0, 2):  # uniform batches: the data's frequencies, rounded up or down
        expected = [128 * p for p in pop.data_shares]
        assert all(int(e) <= n <= int(e) + 1 for n, e in zip(counts[i], expected))
    assert pop.batch_composition(1) == pytest.approx([64] + [64 / 9] * 9)
    with pytest.raises(ValueError, match="class action 10 is outside 0..4"):
        pop.class_action(0, 10)


def test_cross_entropy_matches_torch():
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(3, 16, 10, generator=gen) * 30).requires_grad_(True)
    y = torch.randint(0, 10, (3, 16), generator=gen)
    ours = cross_entropy(x, y)
    ref = F.cross_entropy(x.transpose(1, 2), y, reduction="none")
    assert torch.allclose(ours, ref, rtol=1e-5, atol=1e-5)
    g1, = torch.autograd.grad(ours.sum(), x)
    g2, = torch.autograd.grad(ref.sum(), x)
    assert torch.allclose(g1, g2, atol=1e-6)


def test_weight_features_of_the_population_equal_each_members(data):
    from qan_ray import features

    pop = PopulationTrainer(CFG.replace(hidden=(64, 48)), k=5, data=data)
    pop.set_lr([0.01, 0.05, 0.1, 0.3, 0.6])
    pop.train(15)
    got = pop.weight_features()
    assert got.shape == (5, features.WEIGHT_FEATURES)
    ref = torch.stack([features.weight_features(pop.member_model(i)) for i in range(5)])
    assert torch.allclose(got, ref, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got[0], got[4])  # members differ
    only = pop.weight_features(("net.3",))
    assert torch.allclose(only[2], features.weight_features(pop.member_model(2), ("net.3",)))
    # conv weights (out, in, kh, kw), subsampled rows and columns: the same per member
    w = torch.randn(3, 80, 40, 3, 3, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(features.layer_features(w),
                          torch.cat([features.layer_features(m[None]) for m in w]), rtol=1e-5)
    with pytest.raises(ValueError, match="has no Linear/Conv layer to observe"):
        features.pooled_weight_features([], "Net")


@pytest.mark.parametrize("extra", [{}, {"lr_schedule": "cosine", "reward": "final_val",
                                        "chance_penalty": 1.0}])
def test_vector_env_k1_matches_the_single_env(extra):
    import numpy as np

    from qan_ray.env import TargetTrainingEnv
    from qan_ray.vector_env import PopulationVectorEnv

    conf = {"task": "digits-mlp", "epochs_per_episode": 1.0, "control_interval": 7,
            "lr_init_range": (0.01, 0.5), **extra}
    venv = PopulationVectorEnv({**conf, "num_envs": 1})
    env = TargetTrainingEnv(conf)
    obs_v, _ = venv.reset()
    obs_e, _ = env.reset()
    assert obs_v.shape == (1, env.observation_space.shape[0])
    assert np.allclose(obs_v[0], obs_e, rtol=1e-4, atol=1e-4)
    for action in (4, 1, 2, 0, 3):  # 35 batches = 5 steps of 7
        obs_v, r_v, term_v, _, info = venv.step([action])
        obs_e, r_e, term_e, _, _ = env.step(action)
        assert np.allclose(obs_v[0], obs_e, rtol=1e-4, atol=1e-4)
        assert r_v[0] == pytest.approx(r_e, rel=1e-3, abs=1e-5)
        assert bool(term_v[0]) == term_e
        assert info["lr"][0] == pytest.approx(env.trainer.lr)
    assert term_e and info["batches"].tolist() == [35]
    if extra:  # the terminal reward was paid on the last step (final_val: a log-loss ratio)
        assert abs(r_e) > 0.05


def test_vector_env_guard_rolls_a_diverging_member_back_and_cuts_its_lr():
    import numpy as np

    from qan_ray.vector_env import PopulationVectorEnv

    venv = PopulationVectorEnv({"task": "digits-mlp", "lr_max": 1e4, "num_envs": 3,
                                "rescue_penalty": 2.0})
    venv.reset(seed=100)
    venv.step([2, 2, 2])  # a good first interval: the state the guard keeps
    tr = venv.trainer
    good = tr.theta[1].clone()
    good_buf = tr.optimizer.bufs[0][1].clone()
    tr.set_lr([0.05, 1e4, 0.05])
    obs, rewards, term, _, info = venv.step([2, 2, 2])
    assert info["rescued"].tolist() == [False, True, False] and not term.any()
    assert rewards[1] == -2.0 and info["rescues"].tolist() == [0, 1, 0]
    assert torch.equal(tr.theta[1], good) and torch.equal(tr.optimizer.bufs[0][1], good_buf)
    assert info["lr"][1] == pytest.approx(1e3)  # x rescue_factor 0.1
    assert info["val_accuracy"][1] > 0.3 and np.isfinite(obs).all()
    assert not torch.equal(tr.theta[0], good)  # the others trained on


def test_vector_env_resets_a_diverged_member_alone():
    import numpy as np

    from qan_ray.vector_env import PopulationVectorEnv

    venv = PopulationVectorEnv({"task": "digits-mlp", "lr_max": 1e4, "num_envs": 3,
                                "guard": False})
    venv.reset(seed=100)
    venv.trainer.set_lr([0.05, 1e4, 0.05])
    obs, rewards, term, trunc, info = venv.step([2, 2, 2])
    assert term.tolist() == [False, True, False] and info["diverged"].tolist()[1]
    assert rewards[1] == -venv.cfg.divergence_penalty and not trunc.any()
    obs, rewards, term, _, info = venv.step([2, 2, 2])
    # member 1 started over (a fresh episode, seed 100 + 3, the config's LR, 0 batches); the
    # others went on to step 2
    assert info["step"].tolist() == [2, 0, 2]
    assert info["batches"].tolist() == [20, 0, 20]
    assert rewards[1] == 0.0 and not term.any()
    assert venv.trainer.seeds[1] == 103 and info["lr"][1] == pytest.approx(venv.cfg.lr)
    assert np.isfinite(obs).all()
    with pytest.raises(ValueError, match=r"unknown config key\(s\) \['controlinterval'\]"):
        PopulationVectorEnv({"task": "digits-mlp", "controlinterval": 5, "num_envs": 2})
    with pytest.raises(ValueError, match="supports the lr mode only"):
        PopulationVectorEnv({"task": "digits-mlp", "action_mode": "minibatch", "num_envs": 2})


def test_vector_env_builds_the_way_rllib_makes_it():
    # RLlib 2.60 SingleAgentEnvRunner.make_env with gym_env_vectorize_mode="vector_entry_point":
    # gym.register(vector_entry_point=lambda num_envs: creator(env_ctx | {"num_envs": ...})),
    # gym.make_vec(..., vectorization_mode=VECTOR_ENTRY_POINT), then DictInfoToList.
    import gymnasium as gym
    from gymnasium.wrappers.vector import DictInfoToList

    from qan_ray.vector_env import make_population_env

    ctx = {"task": "digits-mlp", "epochs_per_episode": 0.5}
    gym.register("qan-population-test-v0", entry_point=lambda: make_population_env(ctx),
                 vector_entry_point=lambda num_envs: make_population_env(
                     ctx | {"num_envs": num_envs}))
    env = DictInfoToList(gym.make_vec("qan-population-test-v0", num_envs=3,
                                      vectorization_mode=gym.VectorizeMode("vector_entry_point")))
    assert env.num_envs == 3
    obs, infos = env.reset(seed=5)
    assert obs.shape == (3, env.single_observation_space.shape[0]) and len(infos) == 3
    obs, rewards, term, trunc, infos = env.step(env.action_space.sample())
    assert rewards.shape == (3,) and infos[2]["batches"] == 10
    assert env.unwrapped.trainer.seeds == [5, 6, 7]


def _dqn_on_population(k: int, ctx: dict, name: str):
    from ray.rllib.algorithms.dqn import DQNConfig
    from ray.rllib.core.rl_module.rl_module import RLModuleSpec
    from ray.tune.registry import register_env

    from policies.rllib_module import QMLPModule
    from qan_ray.vector_env import make_population_env

    register_env(name, make_population_env)
    return (
        DQNConfig()
        .environment(name, env_config=ctx)
        .framework("torch")
        .env_runners(num_env_runners=0, num_envs_per_env_runner=k,
                     gym_env_vectorize_mode="vector_entry_point", rollout_fragment_length=4)
        .rl_module(rl_module_spec=RLModuleSpec(module_class=QMLPModule),
                   model_config={"qan_hidden": [32]})
        .training(train_batch_size_per_learner=16, num_steps_sampled_before_learning_starts=8,
                  replay_buffer_config={"type": "PrioritizedEpisodeReplayBuffer",
                                        "capacity": 1000})
        .reporting(min_sample_timesteps_per_iteration=1, min_time_s_per_iteration=0)
        .debugging(seed=0)
        .build_algo()
    )


def test_rllib_dqn_trains_on_a_population_vector_env(ray_session):
    import numpy as np
    from ray.rllib.core import DEFAULT_MODULE_ID

    ctx = {"task": "digits-mlp", "epochs_per_episode": 1.0, "control_interval": 7}
    algo = _dqn_on_population(4, ctx, "qan-population-dqn-test")
    try:
        env = algo.env_runner.env.unwrapped
        assert type(env).__name__ == "PopulationVectorEnv" and env.num_envs == 4
        def weights() -> dict[str, np.ndarray]:
            return {n: np.array(v) for n, v in
                    algo.learner_group.get_weights()[DEFAULT_MODULE_ID].items()}

        obs = np.random.default_rng(0).standard_normal((3, env.single_observation_space.shape[0]))

        def q_values(w: dict[str, np.ndarray], prefix: str = "") -> np.ndarray:
            """The Q-net (or its target copy) on fixed observations, by a float64 forward of
            the learner's weights (one hidden layer of 32 here)."""
            h = np.maximum(obs @ w[f"{prefix}encoder.mlp.0.weight"].T
                           + w[f"{prefix}encoder.mlp.0.bias"], 0.0)
            return h @ w[f"{prefix}af.weight"].T + w[f"{prefix}af.bias"]

        before = weights()
        assert np.array_equal(q_values(before, "_target_"), q_values(before))  # a copy at start
        # each iteration samples rollout_fragment_length 4 x 4 members = 16 env steps; learning
        # starts at 8 sampled steps, then one update on a batch of 16 per iteration
        for iteration in (1, 2):
            result = algo.train()
            assert result["env_runners"]["num_env_steps_sampled_lifetime"] == 16 * iteration
            learner = result["learners"][DEFAULT_MODULE_ID]
            assert learner["num_module_steps_trained"] == 16  # this iteration's one batch
            assert learner["num_module_steps_trained_lifetime"] == 16 * iteration
            assert np.isfinite(learner["qf_loss"])
            if iteration == 1:
                first = weights()
        after = weights()
        # the Q-net moved at every update: its outputs on the same observations changed (an
        # Adam step of lr 5e-4 on every weight moves them by ~1e-2; float noise is ~1e-7) ...
        main = [n for n in before if not n.startswith("_target")]
        assert len(main) == 4
        for a, b in ((before, first), (first, after)):
            assert np.abs(q_values(b) - q_values(a)).max() > 1e-4
            assert [n for n in main if np.array_equal(a[n], b[n])] == []  # every layer learns
        # ... while the target network stayed the initial copy (its update period, 500 trained
        # steps, is far away): a separate network, not an alias of the trained one
        assert np.array_equal(q_values(after, "_target_"), q_values(before))
        assert np.abs(q_values(after, "_target_") - q_values(after)).max() > 1e-4
        # the env runner acts with the trained weights (synced after each update)
        runner = {n: np.asarray(v.detach()) for n, v in algo.env_runner.module.state_dict().items()
                  if not n.startswith("_target")}
        assert runner and all(np.array_equal(v, after[n]) for n, v in runner.items())
        assert (env.trainer.steps > 0).all()  # every member of the population trained
    finally:
        algo.stop()


def test_run_schedules_equals_the_envs_schedule_episodes(data):
    from qan_ray.control import run_schedules
    from qan_ray.env import TargetTrainingEnv
    from qan_ray.evaluate import baseline_config, run_schedule

    cfg = baseline_config(CFG.replace(epochs_per_episode=2.0, lr_init_range=(0.01, 0.5)))
    members = [("fixed", 0.05, 11), ("cosine", 0.1, 12), ("step", 0.02, 11), ("fixed", 5.0, 13),
               ("plateau", 0.3, 14), ("hypergradient", 0.05, 15)]
    records, test_acc = run_schedules(cfg.replace(lr_max=5.0), members, data=data)
    env = TargetTrainingEnv(cfg.replace(lr_max=5.0))
    for (name, lr, seed), recs, acc in zip(members, records, test_acc):
        ref = run_schedule(env, name, lr, seed)
        assert len(recs) == len(ref), name
        for got, want in zip(recs, ref):
            assert got["step"] == want["step"] and got["batches"] == want["batches"]
            assert got["diverged"] == want["diverged"] and got["action"] == want["action"]
            assert got["lr"] == pytest.approx(want["lr"])
            for key in ("train_loss", "val_loss", "val_accuracy", "reward"):
                assert got[key] == pytest.approx(want[key], rel=1e-3, abs=1e-4, nan_ok=True), key
        assert acc == pytest.approx(env.trainer.evaluate("test")[1], abs=1e-6)
    assert records[3][-1]["diverged"]  # LR 5 diverges; the others ran the whole episode
    assert [r[-1]["batches"] for r in records[:3] + records[4:]] == [70] * 5


def test_a_frozen_member_keeps_its_weights_until_reset(data):
    pop = PopulationTrainer(CFG, k=3, data=data)
    pop.train(5)
    pop.freeze(1)
    before = pop.theta.clone()
    pop.train(5)
    assert torch.equal(pop.theta[1], before[1])  # momentum buffer and all: LR 0
    assert not torch.equal(pop.theta[0], before[0]) and not torch.equal(pop.theta[2], before[2])
    assert pop.lr == [CFG.lr] * 3  # the reported LR is unchanged
    pop.reset_member(1, seed=4)
    fresh = pop.theta[1].clone()
    pop.train(1)
    assert not torch.equal(pop.theta[1], fresh)


@pytest.mark.parametrize("reference", ["final", "trajectory"])
def test_meta_momentum_per_member_equals_the_trainer(data, reference):
    from qan_ray.trainer import reference_run

    cfg = CFG.replace(mm_coef=0.05, mm_reference=reference, mm_active_fraction=0.2)
    ref = reference_run(cfg)
    pop = PopulationTrainer(cfg, seeds=[0, 1], data=data)
    pop.set_reference(ref)
    first = pop.train(15)
    pop.reset_member(1, seed=5)  # now out of step: member 0 at batch 15, member 1 at 0
    after = torch.stack([pop.train(1) for _ in range(50)], dim=1)  # 0.2 x 280 = 56: pull ends

    def trainer(seed: int) -> TargetTrainer:
        tr = TargetTrainer(cfg.replace(seed=seed), data=data)
        tr.set_reference(ref)
        return tr

    t0, t1 = trainer(0), trainer(5)
    assert float(first[0]) == pytest.approx(t0.train(15), rel=1e-4)
    assert after[0].tolist() == pytest.approx([t0.train(1) for _ in range(50)], rel=1e-4)
    assert after[1].tolist() == pytest.approx([t1.train(1) for _ in range(50)], rel=1e-4)
    with pytest.raises(ValueError, match="do not match the monitored layers' shapes"):
        pop.set_reference([[torch.zeros(3, 3)]])


def test_vector_env_with_meta_momentum_sets_the_reference():
    from qan_ray.vector_env import PopulationVectorEnv

    venv = PopulationVectorEnv({"task": "digits-mlp", "mm_coef": 0.01, "epochs_per_episode": 1.0,
                                "num_envs": 2})
    assert venv.trainer._reference is not None
    assert venv.trainer._reference[0].shape[1:] == venv.trainer._mm_params[0].shape[1:]
    venv.reset(seed=0)
    _, _, term, _, info = venv.step([2, 2])
    assert info["batches"].tolist() == [10, 10] and not term.any()


# --- qan train --population: trainer actors hosting populations ---------------------------------
POP_QAN = from_dict(task="digits-mlp", epochs_per_episode=1.0)  # 35 batches -> 4 control steps


def test_meta_trainer_population_4_over_a_distribution_logs_every_episode(ray_session, tmp_path):
    from qan_ray.distribution import describe, sample_task
    from qan_ray.meta import MetaConfig, MetaTrainer
    from qan_ray.records import read_parts

    meta = MetaConfig(episodes=4, num_actors=1, population=4, cpus_per_actor=0.5,
                      learning_starts=8, hidden=(16, 16), select_every=0)
    # a task distribution (one preset member: 8 one-epoch steps of 10 batches, a start LR drawn
    # per member)
    qan = POP_QAN.replace(tasks=("digits-mlp",), max_train_samples=320)
    lines: list[str] = []
    mt = MetaTrainer(qan, meta, tmp_path / "run", log=lines.append)
    try:
        assert mt.algo.config.num_envs_per_env_runner == 4 and mt.steps_per_episode == 8
        result = mt.train()
        assert mt.progress["episodes"] >= 4 and mt.progress["iterations"] == 1
        sampled = result["env_runners"]["num_env_steps_sampled_lifetime"]
        assert sampled >= 4 * mt.steps_per_episode  # 4 members' control steps, one runner
        kinds = mt.algo.env_runner_group.foreach_env_runner(
            lambda er: (type(er.env.unwrapped).__name__, er.env.unwrapped.num_envs),
            local_env_runner=False)
        assert kinds == [("ActorVectorEnv", 4)]
        rows = read_parts(mt.out / "steps").to_pylist()
        episodes = {r["episode"] for r in rows}
        assert len(episodes) >= 4 and None not in episodes
        seeds = {r["episode"]: r["seed"] for r in rows}
        assert len(set(seeds.values())) == len(episodes)  # distinct seeds, from the counter
        assert sorted({r["global_episode"] for r in rows}) == list(range(len(episodes)))
        for ep in episodes:  # the reset row + one row per control step of that member
            steps = [r["step"] for r in rows if r["episode"] == ep]
            assert steps == list(range(mt.steps_per_episode + 1))
            assert len({r["task"] for r in rows if r["episode"] == ep}) == 1
        # the first generation's 4 members trained the task drawn from the first seed, each
        # from its own start LR
        first = sample_task(qan, min(seeds.values()))
        first_gen = [r for r in rows if r["global_episode"] in range(4)]
        assert {r["task"] for r in first_gen} == {describe(first).rsplit(" lr", 1)[0]}
        shown = [t for t in lines if t.startswith("episode ")]  # each names its task
        assert len(shown) == len(episodes) and all(t.endswith(
            f"[{describe(first).rsplit(' lr', 1)[0]}]") for t in shown[:4])
        assert len({r["lr"] for r in first_gen if r["step"] == 0}) == 4
        assert all(r["q_values"] is not None for r in rows if r["action"] >= 0)
    finally:
        mt.stop()


def test_killed_population_actor_is_replaced_and_its_running_episodes_truncated(ray_session):
    import numpy as np
    import ray

    from qan_ray.actors import ActorVectorEnv, episode_seed, start_episode_counter

    counter = start_episode_counter("episodes-pop-kill", [])
    env = ActorVectorEnv({"qan": POP_QAN.to_dict(), "resources": {"cpus_per_actor": 0.5},
                          "run": "pop-kill", "counter": "episodes-pop-kill", "num_envs": 3})
    try:
        env.reset(seed=1)
        env.step([2, 2, 2])
        victim = env.name
        ray.kill(env._actor, no_restart=True)
        obs, rewards, term, trunc, info = env.step([2, 2, 2])
        assert trunc.tolist() == [True] * 3 and not term.any() and not rewards.any()
        assert env.replacements == 1 and env.name == f"{victim}-r1"
        assert info["actor_replaced"].all()
        # the three running episodes end as truncated: reset row + the one step before the kill
        assert [(len(e), e[0]["global_episode"], e[0]["truncated"], e[0]["actor"])
                for e in env.finished] == [(2, 0, True, victim), (2, 1, True, victim),
                                           (2, 2, True, victim)]
        obs, rewards, term, trunc, info = env.step([2, 2, 2])  # NEXT_STEP: all start over
        assert info["step"].tolist() == [0, 0, 0] and info["global_episode"].tolist() == [3, 4, 5]
        assert info["seed"].tolist() == [episode_seed(0, g) for g in (3, 4, 5)]
        obs, rewards, term, trunc, info = env.step([2, 2, 2])
        assert info["step"].tolist() == [1, 1, 1] and not trunc.any() and np.isfinite(obs).all()
        assert [w for _, w in ray.get(counter.history.remote())][3:] == [env.name] * 3
    finally:
        env.close()
        ray.kill(counter)


def test_population_refusals_name_the_fix(ray_session, tmp_path):
    from qan_ray.meta import MetaConfig, MetaTrainer

    meta = MetaConfig(episodes=2, num_actors=1, population=2, cpus_per_actor=0.5)
    with pytest.raises(ValueError, match=r"--population 2: task 'digits-mlp' cannot run as a "
                       r"population \(action_mode 'minibatch'.*Use --population 1"):
        MetaTrainer(POP_QAN.replace(action_mode="minibatch"), meta,
                    tmp_path / "a", log=lambda *_: None)
    with pytest.raises(ValueError, match="`population` is 0; it must be an integer >= 1"):
        MetaConfig(population=0).validate()


def test_evaluate_baselines_as_populations_give_the_sequential_table():
    from qan_ray.evaluate import eval_seeds, run_baselines, summarise

    cfg = from_dict(task="digits-mlp", epochs_per_episode=1.0, lr=0.05)
    kw = dict(seeds=2, lr_grid=(0.02, 0.1), log=lambda *_: None,
              adaptive=("warmup_cosine", "plateau", "hypergradient"), lr_free=())
    batched, best_b = run_baselines(cfg, population=True, **kw)
    sequential, best_s = run_baselines(cfg, population=False, **kw)
    assert best_b == best_s
    assert list(batched.by_method) == list(sequential.by_method) == [
        "fixed@0.02", "fixed@0.1", f"step@{best_s:g}", f"cosine@{best_s:g}",
        "warmup_cosine@0.05", "plateau@0.05", "hypergradient@0.05"]
    for method, runs in sequential.by_method.items():
        assert [r["seed"] for r in batched.by_method[method]] == eval_seeds(2)
        for got, ref in zip(batched.by_method[method], runs):
            assert [r["lr"] for r in got["recs"]] == pytest.approx([r["lr"] for r in ref["recs"]])
    table_b, table_s = summarise(batched), summarise(sequential)
    assert table_b["target"] == pytest.approx(table_s["target"], abs=1e-6)
    for row_b, row_s in zip(table_b["summary"], table_s["summary"]):
        assert row_b["method"] == row_s["method"]
        for key in ("val_acc_mean", "val_acc_std", "test_acc_mean", "test_acc_std",
                    "final_lr_mean", "batches_to_target_mean", "reached_target"):
            want = row_s[key] if row_s[key] is None else pytest.approx(row_s[key], rel=1e-4,
                                                                         abs=1e-5)
            assert row_b[key] == want, (row_b["method"], key)


# --- a task distribution as populations: generations -------------------------------------------
DIST = {"task": "digits-mlp", "tasks": ("generalist",), "holdout": ("mnist1d", "cnn"),
        "guard": False}


def _dist_env(k: int = 3):
    from qan_ray.vector_env import PopulationVectorEnv

    return PopulationVectorEnv({**DIST, "num_envs": k})


def _expected_task(seed: int):
    from qan_ray.distribution import load_config, sample_task

    return sample_task(load_config(DIST), seed)


def _kill(venv, member: int) -> None:
    """Member `member`'s weights become NaN: its next interval diverges, on any CPU."""
    with torch.no_grad():
        venv.trainer.theta[member].fill_(float("nan"))


def _same_task(got, want) -> bool:
    keys = ("model", "hidden", "optimizer", "momentum", "nesterov", "batch_size",
            "epochs_per_episode", "control_interval")
    return all(getattr(got, k) == getattr(want, k) for k in keys)


def test_distribution_population_trains_one_drawn_task_per_generation():
    import numpy as np

    from qan_ray.constants import run_seed
    from qan_ray.distribution import load_config, optimizer_family, task_lr_range
    from qan_ray.episode import start_lr

    venv = _dist_env()
    obs, info = venv.reset(seed=100)
    first = _expected_task(run_seed(100, 0))  # the generation's task: member 0's episode seed
    assert _same_task(venv.cfg, first) and venv.trainer.k == 3
    assert venv.trainer.seeds == [100, 101, 102] and info["generation"].tolist() == [1, 1, 1]
    low, high = task_lr_range(load_config(DIST), first)
    ranged = first.replace(lr_init_range=(low, high))
    # each member's start LR is its own draw from the task's range, from its own seed
    assert info["lr"].tolist() == pytest.approx(
        [min(max(start_lr(ranged, s), low), high) for s in (100, 101, 102)])
    assert len(set(info["lr"].tolist())) == 3
    assert obs.shape == (3, venv.single_observation_space.shape[0])
    steps = venv.total_steps
    for t in range(1, steps + 1):
        obs, rewards, term, trunc, info = venv.step(np.full(3, 2))
        assert info["step"].tolist() == [t] * 3 and not trunc.any()
    assert term.all()
    obs, rewards, term, trunc, info = venv.step(np.full(3, 2))  # all start generation 2
    second = _expected_task(run_seed(100, 3))
    assert _same_task(venv.cfg, second) and not _same_task(second, first)
    assert info["generation"].tolist() == [2, 2, 2] and info["step"].tolist() == [0, 0, 0]
    assert venv.trainer.seeds == [103, 104, 105] and rewards.tolist() == [0.0, 0.0, 0.0]
    val, acc = venv.trainer.evaluate("val")  # the new task's members at init, nothing else
    assert info["val_loss"].tolist() == val.tolist() and info["val_accuracy"].tolist() == \
        acc.tolist()
    assert venv.episodes.first[1]["val_loss"] == float(val[1])
    assert np.isfinite(obs).all() and obs.shape[1] == venv.single_observation_space.shape[0]
    hidden = "-".join(str(h) for h in second.hidden)
    assert info["task"].tolist() == [f"digits/mlp-{hidden} {optimizer_family(second)} "
                                     f"bs{second.batch_size}"] * 3


def test_distribution_generation_ends_by_cutting_a_restarted_episode():
    import numpy as np

    venv = _dist_env()
    venv.reset(seed=100)
    steps, task = venv.total_steps, venv.cfg
    _kill(venv, 1)
    _, rewards, term, trunc, info = venv.step(np.full(3, 2))
    assert term.tolist() == [False, True, False] and info["diverged"].tolist()[1]
    _, _, term, trunc, info = venv.step(np.full(3, 2))  # member 1 restarts on the same task
    assert info["step"].tolist() == [2, 0, 2] and venv.trainer.seeds[1] == 103
    assert venv.cfg is task and info["generation"].tolist() == [1, 1, 1]
    for _ in range(steps - 2):
        _, _, term, trunc, info = venv.step(np.full(3, 2))
    # the first episodes of members 0 and 2 end; member 1's second episode is cut at 6 steps
    assert term.tolist() == [True, False, True] and trunc.tolist() == [False, True, False]
    assert info["step"].tolist() == [steps, steps - 2, steps]
    _, _, term, trunc, info = venv.step(np.full(3, 2))
    assert info["generation"].tolist() == [2, 2, 2] and info["step"].tolist() == [0, 0, 0]
    assert venv.trainer.seeds == [104, 105, 106] and not (term.any() or trunc.any())


def test_distribution_generation_never_cuts_an_episode_that_just_started():
    import numpy as np

    venv = _dist_env()
    venv.reset(seed=100)
    steps = venv.total_steps
    for _ in range(steps - 2):
        venv.step(np.full(3, 2))
    _kill(venv, 1)
    _, _, term, trunc, info = venv.step(np.full(3, 2))  # member 1 ends one step early
    assert term.tolist() == [False, True, False]
    _, _, term, trunc, info = venv.step(np.full(3, 2))  # 0 and 2 end; 1 has just started
    assert term.tolist() == [True, False, True] and not trunc.any()
    assert info["step"].tolist() == [steps, 0, steps]
    _, _, term, trunc, info = venv.step(np.full(3, 2))  # 0 and 2 have just started again
    assert info["step"].tolist() == [0, 1, 0] and not (term.any() or trunc.any())
    _, _, term, trunc, info = venv.step(np.full(3, 2))  # every episode has a step: cut them
    assert info["step"].tolist() == [1, 2, 1] and trunc.all() and not term.any()
    _, _, _, _, info = venv.step(np.full(3, 2))
    assert info["generation"].tolist() == [2, 2, 2] and info["step"].tolist() == [0, 0, 0]



def test_generalist_wide_trains_a_batchnorm_resnet_as_a_population():
    import numpy as np

    from qan_ray.vector_env import PopulationVectorEnv

    wide = {"tasks": ("generalist-wide",), "holdout": ("cnn2d", "mnist1d-mlp", "mnist1d"),
            "max_train_samples": 128, "guard": False}  # a small split; no rollback
    venv = PopulationVectorEnv({**wide, "num_envs": 2})
    venv.reset(seed=5)  # seed 5 draws digits/resnet, AdamW, half the split, 30% label noise
    cfg = venv.cfg
    assert (cfg.model, cfg.optimizer, cfg.max_train_samples, cfg.label_noise) == (
        "resnet", "adamw", 64, 0.3) and cfg.weight_decay > 0
    assert venv.trainer.data.n_train == 64 and venv.trainer.batches_per_epoch == 1
    buffers = venv.trainer.stacked_buffers
    assert buffers and all(b.shape[0] == 2 for b in buffers.values())
    before = {n: b.clone() for n, b in buffers.items()}
    obs, _, _, _, info = venv.step(np.full(2, venv.rule.keep_action))
    assert np.isfinite(obs).all() and info["batches"].tolist() == [1, 1]
    buffers = venv.trainer.stacked_buffers
    means = [n for n in buffers if n.endswith("running_mean")]
    assert means and all(not torch.equal(buffers[n], before[n]) for n in means)  # they moved
    assert all(not torch.equal(buffers[n][0], buffers[n][1]) for n in means)  # each its own
