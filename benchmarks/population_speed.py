"""Claim: a K-member PopulationTrainer trains >= 5x the mini-batches/s of K sequential bare
PyTorch loops doing the same work at K = 32 (same device, same thread count).

Evidence: for each task and K, in alternating rounds (so drift hits both sides):
- bare: K sequential loops, each a plain `nn.Module` + `torch.optim.SGD`/`Adam` (the task's
  settings), an on-device permutation per epoch, `F.cross_entropy`, an on-device running loss
  read once at the end -- the way a careful PyTorch loop trains one network;
- population: `PopulationTrainer(cfg, k=K).train(batches)` (one host read).
Throughput = member mini-batches per second (K x batches / seconds). We report mean +- sd over
rounds, the ratio of the means, and a torch.profiler table of where the time goes at K = 32.
The last lines are `meta_steps_speedup: <ratio>` (RLlib control steps/s, K = 32 vs 1),
`population_speedup_k32: <ratio>` (first task) and `population_speedup_cnn1d_k32: <ratio>`
(mnist1d-cnn; with --compile a line `population_speedup_cnn1d_k32_compile: <ratio>` before
them: PopulationTrainer(compile=True) against the same bare loops). On a model whose default
population switches convolutions to matmuls, the K = 32 rounds also time the population with
torch's grouped convolutions (`conv="native"`), the path before `qan_ray.popconv`. Next to
the wall-clock ratio, the ratio in this process's CPU time: steadier on a machine shared with
other jobs.

    python benchmarks/population_speed.py                      # the full run (a quiet machine)
    python benchmarks/population_speed.py --quick              # a smoke run (a busy machine)
    python benchmarks/population_speed.py --trainer-only       # the trainer tables alone
    python benchmarks/population_speed.py --device cuda        # on a GPU
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from bare_loop import bare_member, bare_train

from qan_ray import popconv
from qan_ray.config import from_dict
from qan_ray.data import load_data, resolve_device
from qan_ray.population import PopulationTrainer

RESULTS = Path(__file__).parent / "results" / "population_speed.md"

NOTES = """\
What one population mini-batch costs (PopulationTrainer.train), whatever K:
- batch: one (K, B) slice (or gather) of the K permutations and one advanced-indexing gather of
  the inputs (`aten::index`); a new permutation per member per epoch (`aten::randperm`, K per
  epoch);
- forward/backward: `vmap(grad_and_value(functional_call))` turns each Linear into one `bmm`
  (forward and backward); each strided 1-D Conv on the CPU is im2col (one gather of the input
  patches, channels last) + one `bmm` (`qan_ray.popconv`), every other Conv torch's kernel,
  which vmap turns into one grouped convolution (groups = K); the split of
  the flat (K, P) row into parameter views costs one `cat` in the backward (the gradient
  arrives flat);
- cross-entropy from exp/sum/log/gather (`population.cross_entropy`): on the CPU, log_softmax
  over a 10-wide last dim is slow (about 10x an exp of the same size);
- optimizer: 3 foreach ops on the single (K, P) tensor for SGD with momentum (`mul_`, `add_`,
  `addcmul_` with the (K, 1) LR), about 9 for Adam.
So the per-batch Python and dispatcher cost is a constant ~60 ops; a bare loop pays its own
~60 per member. The MLP (digits) is overhead-bound, so the ratio grows with K until the bmm
arithmetic dominates. The 1-D CNN at batch 100 is arithmetic- and memory-bound on the CPU
already at K = 1: the grouped convolution (`mkldnn_convolution` / `convolution_backward`) took
about as long as the K separate convolutions (1.2x at K = 32 before `qan_ray.popconv`). As
im2col + bmm the convolutions' arithmetic is one large matrix product per layer, and what is
left is memory traffic: the patch gather and its backward (`index_add`), ReLU and its backward
over K x B activations, which torch.compile fuses.
torch.compile of the vmapped loss-and-gradient (PopulationTrainer(compile=True), `--compile`)
fuses the elementwise work and removes most of the dispatcher cost: about 2-4x the eager
population at K = 32 on the MLP and about 1.6-2x on the 1-D CNN (matmul convolutions) on this
CPU, losses equal to 1e-6; the first call compiles (a minute or more cold, seconds with
inductor's on-disk cache).
At K = 1 (TargetTrainer, what the env and the Tune trainables run) the population trains member
0 by a plain forward/backward of its module, whose gradients are views of one flat buffer, and
steps the flat (1, P) tensor with the same foreach ops: no vmap, because vmap/functional_call
wrapping made a K = 1 step 0.3-0.5x a bare loop on the MLP.
Multi-threaded runs on a machine shared with other jobs are unreliable for both sides: an
OpenMP region waits for its slowest thread, which another process may have descheduled (we saw
single ops take 10x longer at 2 threads than at 1 under load). The default is 1 thread.
"""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare_loops(cfg, data, device, k: int, batches: int) -> tuple[float, float]:
    """K sequential single-network loops; returns member mini-batches per second of wall time
    and of this process's CPU time."""
    members = [bare_member(cfg, data, device, cfg.seed + i) for i in range(k)]
    _sync(device)
    start, cpu = time.perf_counter(), time.process_time()
    for model, opt, gen in members:
        bare_train(model, opt, gen, cfg, data, device, batches)
    _sync(device)
    return (k * batches / (time.perf_counter() - start),
            k * batches / (time.process_time() - cpu))


def population(cfg, data, device, k: int, batches: int, compile: bool = False,
               conv: str = "auto") -> tuple[float, float]:
    pop = PopulationTrainer(cfg, k=k, data=data, device=device, compile=compile, conv=conv)
    pop.train(2)  # warm-up: vmap tracing, first permutation
    _sync(device)
    start, cpu = time.perf_counter(), time.process_time()
    pop.train(batches)
    _sync(device)
    return (k * batches / (time.perf_counter() - start),
            k * batches / (time.process_time() - cpu))


def _rllib_algo(k: int, ctx: dict, fragment: int, learning_starts: int, intensity: float,
                train_batch: int = 32):
    """RLlib DQN with one (local) env runner over K population members (K = 1: today's
    TargetTrainingEnv), the meta-trainer's learner settings."""
    from ray.rllib.algorithms.dqn import DQNConfig
    from ray.rllib.core.rl_module.rl_module import RLModuleSpec
    from ray.tune.registry import register_env

    from policies.rllib_module import QMLPModule
    from qan_ray.env import TargetTrainingEnv
    from qan_ray.vector_env import make_population_env

    if k == 1:
        register_env("qan-bench-single", lambda c: TargetTrainingEnv(dict(c)))
        env, runners = "qan-bench-single", {}
    else:
        register_env("qan-bench-population", make_population_env)
        env, runners = "qan-bench-population", {"gym_env_vectorize_mode": "vector_entry_point"}
    return (
        DQNConfig().environment(env, env_config=ctx).framework("torch")
        .env_runners(num_env_runners=0, num_envs_per_env_runner=k,
                     rollout_fragment_length=fragment, **runners)
        .rl_module(rl_module_spec=RLModuleSpec(module_class=QMLPModule),
                   model_config={"qan_hidden": [64, 64]})
        .training(train_batch_size_per_learner=train_batch, training_intensity=intensity,
                  num_steps_sampled_before_learning_starts=learning_starts,
                  replay_buffer_config={"type": "PrioritizedEpisodeReplayBuffer",
                                        "capacity": 50_000})
        .reporting(min_sample_timesteps_per_iteration=1, min_time_s_per_iteration=0)
        .debugging(seed=0).build_algo())


def rllib_control_steps(k: int, task: str, iters: int, learn: bool, train_batch: int = 32
                        ) -> float:
    """Control steps (env steps) per second through RLlib DQN's algo.train()."""
    algo = _rllib_algo(k, {"task": task}, 8, train_batch if learn else 10**9, 16.0, train_batch)
    try:
        result = algo.train()  # warm-up: the first sample, the first updates
        before = result["env_runners"]["num_env_steps_sampled_lifetime"]
        start = time.perf_counter()
        for _ in range(iters):
            result = algo.train()
        steps = result["env_runners"]["num_env_steps_sampled_lifetime"] - before
        return steps / (time.perf_counter() - start)
    finally:
        algo.stop()


def env_step_breakdown(task: str, k: int, steps: int = 5) -> str:
    """Milliseconds per PopulationVectorEnv.step and its parts (no RLlib)."""
    import numpy as np

    from qan_ray.vector_env import PopulationVectorEnv

    env = PopulationVectorEnv({"task": task, "num_envs": k})
    env.reset(seed=0)
    keep = np.full(k, env.rule.keep_action)
    env.step(keep)

    def ms(fn) -> float:  # the fastest of `steps` calls: robust to other jobs' load
        best = math.inf
        for _ in range(steps):
            start = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - start)
        return best * 1e3

    tr = env.trainer
    total = ms(lambda: env.step(keep))
    train = ms(lambda: tr.train(env.cfg.control_interval))
    evaluate = ms(lambda: tr.evaluate("val"))
    feats = ms(tr.weight_features)
    return (f"PopulationVectorEnv.step at K = {k} ({task}, {env.cfg.control_interval} "
            f"mini-batches per step): {total:.1f} ms = train {train:.1f} + validation pass "
            f"{evaluate:.1f} + weight features {feats:.1f} + the rest (signals, rewards, "
            f"observation assembly) {total - train - evaluate - feats:.1f}; "
            f"{total / k:.2f} ms per member control step (fastest of {steps} calls each).")


def baseline_grid(task: str, seeds: int) -> tuple[float, float, int]:
    """Wall seconds of `qan evaluate`'s whole baseline set (evaluate.run_baselines: fixed over
    the default LR grid, step and cosine from the best fixed LR, warmup_cosine, plateau and
    hypergradient from the task LR, `seeds` seeds each): episode by episode on the env
    (--no-population-baselines, the path before populations) vs as populations (the default).
    Returns (episode-by-episode s, population s, episodes)."""
    from qan_ray.evaluate import run_baselines

    cfg = from_dict(task=task)
    quiet = lambda *_: None  # noqa: E731
    start = time.perf_counter()
    runs, _ = run_baselines(cfg, seeds, log=quiet, population=False)
    sequential = time.perf_counter() - start
    start = time.perf_counter()
    run_baselines(cfg, seeds, log=quiet, population=True)
    population = time.perf_counter() - start
    return sequential, population, sum(len(v) for v in runs.by_method.values())


def control_overhead(task: str, ks: list[int], steps: int = 5) -> list[str]:
    """The share of a control step that is not training, at the task's default control
    interval and at one decision per epoch (what a Tune trainable reports): env.step's wall time
    minus the same number of mini-batches of `trainer.train`, over env.step (fastest of `steps`
    calls each). K = 1 is TargetTrainingEnv; K > 1 a PopulationVectorEnv."""
    import numpy as np

    from qan_ray.env import TargetTrainingEnv
    from qan_ray.vector_env import PopulationVectorEnv

    def fastest(fn) -> float:
        best = math.inf
        for _ in range(steps):
            start = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - start)
        return best

    rows = []
    base = from_dict(task=task)
    per_epoch = TargetTrainingEnv(base).trainer.batches_per_epoch
    for label, interval in (("default", base.control_interval), ("one per epoch", per_epoch)):
        for k in ks:
            conf = {"task": task, "control_interval": interval, "epochs_per_episode": 50.0}
            if k == 1:
                env = TargetTrainingEnv(conf)
                keep = env.actions.keep_action
            else:
                env = PopulationVectorEnv({**conf, "num_envs": k})
                keep = np.full(k, env.rule.keep_action)
            env.reset(seed=0)
            env.step(keep)
            total = fastest(functools.partial(env.step, keep))
            train = fastest(functools.partial(env.trainer.train, interval))
            share = max(0.0, total - train) / total
            rows.append(f"| {label} ({interval} batches) | {k} | {total * 1e3:.1f} | "
                        f"{train * 1e3:.1f} | {share:.0%} |")
            print(rows[-1], flush=True)
    return rows


def profile_table(fn, *fn_args, rows: int = 12) -> str:
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=acts) as prof:
        fn(*fn_args)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)
    return "\n".join(line[:130] for line in table.splitlines())


def mean_sd(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", default="digits-mlp,mnist1d-cnn",
                   help="comma-separated task presets (a preset this checkout lacks is skipped)")
    p.add_argument("--ks", default="1,8,32,64")
    p.add_argument("--batches", type=int, default=200, help="mini-batches per member per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch threads, both sides")
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true",
                   help="K = 1, 8, 32; 30 batches; 2 rounds; no profile of the bare side")
    p.add_argument("--compile", action="store_true",
                   help="also time PopulationTrainer(compile=True) at K = 32 (torch.compile; "
                        "about a minute to compile on a small CPU)")
    p.add_argument("--rllib-ks", default="1,32",
                   help="population sizes for the RLlib control-steps/s part ('' skips it)")
    p.add_argument("--rllib-iters", type=int, default=10, help="algo.train() calls timed")
    p.add_argument("--grid-seeds", type=int, default=3,
                   help="seeds of the evaluate baseline-grid timing (0 skips it)")
    p.add_argument("--overhead-ks", default="1,32",
                   help="population sizes of the control-overhead table ('' to skip)")
    p.add_argument("--trainer-only", action="store_true",
                   help="only the trainer tables (bare loops vs populations, compile, profiles): "
                        "no RLlib, baseline-grid, overhead or env-step parts; the "
                        "meta_steps_speedup line repeats the value in --out, labelled so")
    p.add_argument("--out", default=str(RESULTS))
    argv = sys.argv[1:] if argv is None else list(argv)
    args = p.parse_args(argv)
    if args.quick:
        args.ks, args.batches, args.rounds, args.rllib_iters = "1,8,32", 30, 2, 3
    previous_meta = None
    if args.trainer_only:
        args.rllib_ks, args.grid_seeds, args.overhead_ks = "", 0, ""
        old = Path(args.out).read_text().splitlines() if Path(args.out).exists() else []
        previous_meta = next((ln.split(":", 1)[1].split()[0] for ln in old
                              if ln.startswith("meta_steps_speedup:")), "nan")
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    ks = [int(k) for k in args.ks.split(",")]
    lines = [
        "# Population training speed: K members in lockstep vs K bare PyTorch loops", "",
        f"`python benchmarks/population_speed.py {' '.join(argv or [])}`".replace(" `", "`"),
        "",
        f"Device {device}, torch {torch.__version__}, {args.threads} torch thread(s) on both "
        f"sides, {platform.processor() or platform.machine()}; {args.batches} mini-batches per "
        f"member per round, {args.rounds} rounds (bare and population alternate). Throughput is "
        "member mini-batches per second. Load average at the start: "
        f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
        + (" (--quick: a smoke run, not the claim's measurement)." if args.quick else "."), "",
    ]
    speedup32: float | None = None
    cnn1d32 = cnn1d32_compile = float("nan")
    eager32 = bare32 = float("nan")
    profiles: list[str] = []
    for task in args.tasks.split(","):
        try:
            cfg = from_dict(task=task, device=str(device))
        except ValueError as err:
            lines += [f"## {task}", "", f"skipped: {err}", ""]
            continue
        data = load_data(cfg, device)
        lines += [f"## {task} (model {cfg.model}, batch {cfg.batch_size}, {cfg.optimizer}, "
                  f"momentum {cfg.momentum})", "",
                  "| K | bare loops (batches/s) | population (batches/s) | speedup | "
                  "speedup in CPU time | load |", "|---|---|---|---|---|---|"]
        probe = PopulationTrainer(cfg, k=2, data=data, device=device)
        convs = popconv.switched(probe._template) > 0  # the default switched some
        native: list[tuple[float, float]] = []
        for k in ks:
            bare, pop = [], []
            for _ in range(args.rounds):
                bare.append(bare_loops(cfg, data, device, k, args.batches))
                pop.append(population(cfg, data, device, k, args.batches))
                if convs and k == 32:
                    native.append(population(cfg, data, device, k, args.batches,
                                             conv="native"))
            (bm, bs), (pm, ps) = mean_sd([b[0] for b in bare]), mean_sd([r[0] for r in pop])
            bare_cpu = statistics.fmean(b[1] for b in bare)
            ratio = pm / bm
            cpu_ratio = statistics.fmean(r[1] for r in pop) / bare_cpu
            if k == 32:
                eager32, bare32 = pm, bm
                if speedup32 is None:
                    speedup32 = ratio
                if task == "mnist1d-cnn":
                    cnn1d32 = ratio
            lines.append(f"| {k} | {bm:.0f} +- {bs:.0f} | {pm:.0f} +- {ps:.0f} | {ratio:.2f}x | "
                         f"{cpu_ratio:.2f}x | {os.getloadavg()[0]:.1f} |")
            print(lines[-1], flush=True)
            if native and k == 32:
                nm, ns = mean_sd([r[0] for r in native])
                ncpu = statistics.fmean(r[1] for r in native) / bare_cpu
                lines.append(f"| 32, grouped convolutions (`conv='native'`, before) | | "
                             f"{nm:.0f} +- {ns:.0f} | {nm / bm:.2f}x | {ncpu:.2f}x | |")
                print(lines[-1], flush=True)
        lines.append("")
        if args.compile and 32 in ks:
            eager = PopulationTrainer(cfg, k=32, data=data, device=device)
            start = time.perf_counter()
            comp = PopulationTrainer(cfg, k=32, data=data, device=device, compile=True)
            drift = (comp.train(20) - eager.train(20)).abs().max().item()
            compile_s = time.perf_counter() - start
            rates = [population(cfg, data, device, 32, args.batches, compile=True)[0]
                     for _ in range(args.rounds)]
            cm, cs = mean_sd(rates)
            if task == "mnist1d-cnn":
                cnn1d32_compile = cm / bare32
            lines += [f"torch.compile at K = 32: {cm:.0f} +- {cs:.0f} batches/s "
                      f"({cm / eager32:.2f}x the eager population above, {cm / bare32:.2f}x "
                      "the bare loops); first call "
                      f"{compile_s:.0f} s (compile); max loss "
                      f"difference to eager over 20 batches {drift:.1e}.", ""]
            print(lines[-2], flush=True)
        if 32 in ks:
            pop32 = PopulationTrainer(cfg, k=32, data=data, device=device)
            pop32.train(2)
            profiles += [f"### {task}, population K = 32, {args.batches} batches", "", "```",
                         profile_table(pop32.train, args.batches), "```", ""]
            if not args.quick:
                profiles += [f"### {task}, 32 bare loops, {args.batches} batches each", "",
                             "```", profile_table(
                                 bare_loops, cfg, data, device, 32, args.batches),
                             "```", ""]
    meta_speedup = float("nan")
    rllib_ks = [int(k) for k in args.rllib_ks.split(",") if k]
    if rllib_ks:
        import ray

        task = args.tasks.split(",")[0]
        ray.init(address="local", num_cpus=2, num_gpus=0, include_dashboard=False,
                 log_to_driver=False)
        lines += [f"## Control steps/s through RLlib DQN ({task}, one local env runner)", "",
                  "algo.train() with the meta-trainer's learner settings (batch 32, replay "
                  "ratio 16, Q-MLP 64-64, prioritized replay), rollout fragment 8 control steps "
                  "per member. K = 1 is today's TargetTrainingEnv (in-process: no trainer-actor "
                  "round trip, so this favours today's side); K > 1 is one "
                  "PopulationVectorEnv (`gym_env_vectorize_mode='vector_entry_point'`, "
                  f"`num_envs_per_env_runner=K`). {args.rllib_iters} timed iterations after one "
                  "warm-up.", "",
                  "| K | sampling only (steps/s) | with DQN updates (steps/s) |", "|---|---|---|"]
        rates = {}
        for k in rllib_ks:
            rates[k] = (rllib_control_steps(k, task, args.rllib_iters, learn=False),
                        rllib_control_steps(k, task, args.rllib_iters, learn=True))
            lines.append(f"| {k} | {rates[k][0]:.0f} | {rates[k][1]:.0f} |")
            print(lines[-1], flush=True)
        top = max(rates)
        big = rllib_control_steps(top, task, args.rllib_iters, learn=True, train_batch=256)
        lines.append(f"| {top}, train batch 256 (same replay ratio) | | {big:.0f} |")
        print(lines[-1], flush=True)
        ray.shutdown()
        if 1 in rates and len(rates) > 1:
            meta_speedup = rates[top][1] / rates[1][1]
            lines += ["", f"K = {top} vs K = 1: {rates[top][0] / rates[1][0]:.2f}x sampling "
                      f"only, {meta_speedup:.2f}x with DQN updates (the meta_steps_speedup "
                      f"line), {big / rates[1][1]:.2f}x with DQN updates on batches of 256. "
                      "At replay ratio 16 and batch 32 every control step costs half a "
                      "learner update, and the learner, not the population, sets the pace; a "
                      "train batch of 256 at the same replay ratio needs 8x fewer (larger) "
                      "updates (the last row).", ""]
    first = args.tasks.split(",")[0]
    if args.grid_seeds:
        seq, popu, episodes = baseline_grid(first, args.grid_seeds)
        lines += [f"## qan evaluate's baselines ({first}, {episodes} episodes)", "",
                  f"`evaluate.run_baselines`: fixed over the default LR grid, step and cosine "
                  f"from the best fixed LR, warmup_cosine, plateau and hypergradient from the "
                  f"task LR, {args.grid_seeds} seeds each. Episode by episode on the env "
                  f"(before; `--no-population-baselines`) {seq:.1f} s; as two populations "
                  f"(now the default: the grid with the adaptive baselines, then step + "
                  f"cosine) {popu:.1f} s: {seq / popu:.1f}x.", ""]
        print(lines[-2], flush=True)
    if args.overhead_ks:
        lines += [f"## Control overhead ({first})", "",
                  "The share of a control step that is not training (observation: weight "
                  "features and signals; the validation pass; rewards; RLlib not included).",
                  "", "| interval | K | env step (ms) | training alone (ms) | overhead |",
                  "|---|---|---|---|---|",
                  *control_overhead(first, [int(k) for k in args.overhead_ks.split(",")]), ""]
    breakdown = env_step_breakdown(first, 32) if 32 in ks else ""
    lines += ["## Where the time goes", "", NOTES, breakdown, "", *profiles]
    if math.isfinite(cnn1d32_compile):
        lines.append(f"population_speedup_cnn1d_k32_compile: {cnn1d32_compile:.2f}")
    if previous_meta is not None:
        lines += ["(--trainer-only: the meta_steps_speedup line repeats the previous full run's "
                  "value; this run did not measure it)", f"meta_steps_speedup: {previous_meta}"]
    else:
        lines.append(f"meta_steps_speedup: {meta_speedup:.2f}")
    lines.append(f"population_speedup_k32: {speedup32:.2f}" if speedup32 is not None
                 else "population_speedup_k32: nan")
    lines.append(f"population_speedup_cnn1d_k32: {cnn1d32:.2f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
