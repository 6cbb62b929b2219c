"""QAN vs ASHA, PBT and FIFO as Ray Tune schedulers on the embedded default (digits-mlp), and with
--synthetic-mnist on MNIST-format synthetic data (real MNIST is not on the benchmark machine).

Claim under test (issue 4): QANScheduler reaches the best baseline's accuracy with at most half the
epochs ASHA and PBT need, at equal or better final accuracy.
Evidence: `qan compare` (protocol: qan_ray/protocol.py) on the same trainable, search space (LR
log-uniform in [1e-3, 1], a per-trial init seed), trial configs
(BasicVariantGenerator(random_state=seed)), resources (2 concurrent trials x 1 CPU,
reuse_actors) and budget (samples x epochs) for every scheduler, over >= 3 seeds; mean and sd
per scheduler. Writes benchmarks/results/schedulers.md
(+ .parquet, .png, trace .parquet).

The controller: --policy DIR, or --train-episodes N to meta-train one first with `qan train`
(digits-mlp, one control step per epoch as in Tune, episodes starting from log-uniform LRs in
[1e-3, 1]); its provenance (command, episodes, commit) goes into the result file.

Usage: python benchmarks/schedulers.py --train-episodes 300    (about 5 + 15 minutes on 2 CPUs)
       python benchmarks/schedulers.py --policy runs/bench-controller/controller
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from qan_ray.compare import compare  # noqa: E402
from qan_ray.config import from_dict  # noqa: E402
from qan_ray.plots import plot_compare  # noqa: E402
from qan_ray.protocol import Protocol  # noqa: E402
from qan_ray.summaries import add_targets, markdown, table_rows  # noqa: E402

TASK = "digits-mlp"
LR_RANGE = (1e-3, 1.0)


def train_controller(out: Path, episodes: int, task: str = TASK,
                     data_root: str | None = None) -> Path:
    """Meta-train a controller whose control step is one epoch (the Tune cadence)."""
    from qan_ray.trainer import TargetTrainer

    per_epoch = TargetTrainer(from_dict(task=task, data_root=data_root,
                                        device="cpu")).batches_per_epoch
    data = ["--data-root", data_root] if data_root else []
    cmd = [sys.executable, "-m", "qan_ray.cli", "train", "--out", str(out), "--task", task, *data,
           "--episodes", str(episodes), "--control-interval", str(per_epoch),
           "--lr-init-range", f"{LR_RANGE[0]},{LR_RANGE[1]}", "--num-actors", "2",
           "--cpus-per-actor", "0.5"]
    print("training the controller:", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)
    return out / "controller"


def per_seed(summaries: list[dict], qan: str, base: str) -> list[dict]:
    """Per seed: QAN's and the baseline's epochs to target; 'met' = QAN reached the target in at
    most half the baseline's epochs (a baseline that never reached it counts as infinite)."""
    rows = []
    for seed in sorted({s["seed"] for s in summaries}):
        q = next(s for s in summaries if s["scheduler"] == qan and s["seed"] == seed)
        b = next(s for s in summaries if s["scheduler"] == base and s["seed"] == seed)
        qe, be = q["epochs_to_target"], b["epochs_to_target"]
        met = qe is not None and (be is None or qe <= 0.5 * be)
        rows.append({"seed": seed, "qan": qe, "base": be, "base_total": b["total_epochs"],
                     "met": met, "acc_ok": _ge(q["test_accuracy_best_finished"],
                                                b["test_accuracy_best_finished"])})
    return rows


def _ge(a, b) -> bool:
    return a is not None and (b is None or a >= b - 1e-12)


def _fmt(x) -> str:
    return "not reached" if x is None else f"{x:.0f}"


def goal_section(runs: list[dict], names: list[str], fraction: float) -> list[str]:
    summaries = add_targets(runs, fraction)
    rows = table_rows(summaries, names)
    targets = sorted({round(s["target_accuracy"], 4) for s in summaries})
    lines = [f"### Target = {fraction:g} x the best baseline's best validation accuracy "
             f"(per seed: {targets})", "", markdown(rows, f"{fraction:g} x best baseline"), "",
             "| QAN / baseline | seed | QAN epochs to target | baseline epochs to target | "
             "baseline total epochs | QAN <= half the baseline's epochs | QAN test acc >= "
             "baseline's |", "|---|---|---|---|---|---|---|"]
    verdicts = []
    for q in [n for n in names if n.startswith("qan")]:
        for base in [b for b in ("asha", "pbt") if b in names]:
            seeds = per_seed(summaries, q, base)
            for r in seeds:
                lines.append(f"| {q} / {base} | {r['seed']} | {_fmt(r['qan'])} | "
                             f"{_fmt(r['base'])} | {r['base_total']:.0f} | "
                             f"{'yes' if r['met'] else 'no'} | {'yes' if r['acc_ok'] else 'no'} |")
            met = sum(r["met"] for r in seeds)
            acc = sum(r["acc_ok"] for r in seeds)
            verdicts.append(f"- {q} vs {base}: half the epochs to target on {met}/{len(seeds)} "
                            f"seeds; equal or better test accuracy on {acc}/{len(seeds)} seeds "
                            f"-> goal {'MET' if met == acc == len(seeds) else 'NOT met'}")
    return lines + ["", *verdicts, ""]


def _rel(path: Path) -> str:
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def best_accuracy_line(runs: list[dict], names: list[str]) -> list[str]:
    """Per QAN variant: on how many seeds its best validation accuracy is >= every baseline's."""
    lines = []
    seeds = sorted({r["summary"]["seed"] for r in runs})
    for q in [n for n in names if n.startswith("qan")]:
        wins = 0
        for seed in seeds:
            best = {r["summary"]["scheduler"]: r["summary"]["best_val_accuracy"] for r in runs
                    if r["summary"]["seed"] == seed}
            wins += all(best[q] >= v for n, v in best.items() if not n.startswith("qan"))
        lines.append(f"- {q}: best validation accuracy >= every baseline's on {wins}/{len(seeds)}"
                     " seeds (same budget)")
    return lines


def _spec_summary(path: Path) -> dict:
    """A controller's spec.json as the flat facts this report prints."""
    from qan_ray.contract import ControllerSpec

    spec = ControllerSpec.load(path)
    return {**spec.provenance, "qan": spec.task, "hidden": list(spec.hidden),
            "action_labels": spec.action.labels}


def _builtin_note() -> str:
    from policies.qnet import BUILTIN

    if not (BUILTIN / "spec.json").exists():
        return "not shipped"
    spec = _spec_summary(BUILTIN / "spec.json")
    q = spec.get("qan", {})
    return (f"{spec.get('episodes')} episodes, control interval {q.get('control_interval')} "
            f"batches, every episode from LR {q.get('lr')} (no initial-LR range), command "
            f"`{spec.get('command')}` at commit {spec.get('commit')}")


def runs_from_files(work: Path) -> list[dict]:
    """The runs of a finished comparison, rebuilt from its Parquet files (for --render-only)."""
    import pyarrow.parquet as pq

    keys = ("scheduler", "seed", "trials", "best_val_accuracy", "total_epochs", "wall_s",
            "hit_budget", "test_accuracy_best_finished")
    summaries = pq.read_table(work / "compare.parquet").to_pylist()
    trace = pq.read_table(work / "trace.parquet").to_pylist()
    return [{"summary": {k: s[k] for k in keys},
             "rows": [r for r in trace if r["scheduler"] == s["scheduler"]
                      and r["seed"] == s["seed"]]} for s in summaries]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--policy", default=None, help="controller folder (default: train one)")
    p.add_argument("--train-episodes", type=int, default=300)
    p.add_argument("--seeds", default="0,1,2,3,4")
    p.add_argument("--schedulers", default="qan,qan+asha,qan@builtin,asha,pbt,fifo")
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--task", default=TASK)
    p.add_argument("--data-root", default=None)
    p.add_argument("--synthetic-mnist", action="store_true",
                   help="MNIST-format synthetic data (qan_ray.formats, contrast 40, jitter 1) "
                        "with --task mnist-mlp; real MNIST is not on the benchmark machine")
    p.add_argument("--tag", default=None,
                   help="result file stem (default: schedulers, or schedulers_synthetic_mnist)")
    p.add_argument("--render-only", action="store_true",
                   help="rewrite the result file from the last run's Parquet files")
    args = p.parse_args()

    import ray
    import torch

    data_text = ("scikit-learn 8x8 digits, MLP 64, SGD momentum 0.9, batch 32; 1,150 train / 288 "
                 "validation / 359 test images")
    if args.synthetic_mnist:
        import tempfile

        from qan_ray.formats import write_mnist

        args.task = "mnist-mlp"
        args.data_root = str(write_mnist(tempfile.mkdtemp(prefix="synth-mnist-"), n_train=4000,
                                         n_test=1000, contrast=40, jitter=1))
        data_text = ("SYNTHETIC MNIST-format data, not MNIST: qan_ray.formats.synthetic_images "
                     "(contrast 40, jitter 1 px), 4,000 train / 1,000 test 28x28 images in IDX "
                     "files read through torchvision's MNIST class; MLP 256, SGD momentum 0.9, "
                     "batch 64. Real MNIST is not on this machine and there is no network")
    elif args.task != TASK:
        data_text = f"task preset {args.task}, data root {args.data_root}"
    tag = args.tag or ("schedulers_synthetic_mnist" if args.synthetic_mnist else "schedulers")
    from qan_ray.data import load_data

    n_val = len(load_data(from_dict(task=args.task, data_root=args.data_root),
                          torch.device("cpu")).y_val)
    out = Path(args.out)
    kept = out / f"{tag}_controller"  # the controller of the last run, kept with its numbers
    if args.policy:
        policy = Path(args.policy)
    elif args.render_only:
        policy = kept
    else:
        trained = train_controller(ROOT / "runs" / f"bench-controller-{tag}",
                                   args.train_episodes, args.task, args.data_root)
        kept.mkdir(parents=True, exist_ok=True)
        for name in ("qnet.pt", "spec.json"):
            (kept / name).write_bytes((trained / name).read_bytes())
        policy = kept
    spec = _spec_summary(policy / "spec.json")
    seeds = [int(s) for s in args.seeds.split(",")]
    names = args.schedulers.split(",")
    task_config = {"task": args.task, **({"data_root": args.data_root} if args.data_root else {})}
    proto = Protocol(task_config=task_config, samples=args.samples, epochs=args.epochs,
                     lr_low=LR_RANGE[0], lr_high=LR_RANGE[1], policy=str(policy))
    work = ROOT / "runs" / f"bench-{tag}"
    start = time.time()
    if args.render_only:
        runs = runs_from_files(work)
        names = list(dict.fromkeys(r["summary"]["scheduler"] for r in runs))
        seeds = sorted({r["summary"]["seed"] for r in runs})
        info = json.loads((work / "run_info.json").read_text())
    else:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        runs = compare(names, proto, seeds, work, target_fraction=1.0)["runs"]
        ray.shutdown()
        info = {"argv": sys.argv[1:], "minutes": (time.time() - start) / 60}
        (work / "run_info.json").write_text(json.dumps(info))
    plot_compare(runs, add_targets(runs, 1.0), work / "compare.png")
    for suffix in ("parquet", "png"):
        src = work / f"compare.{suffix}"
        (out / f"{tag}.{suffix}").write_bytes(src.read_bytes())
    (out / f"{tag}_trace.parquet").write_bytes((work / "trace.parquet").read_bytes())

    meta = spec.get("meta", {})
    text = "\n".join([
        f"# Schedulers on {args.task}"
        f"{' (synthetic MNIST-format data)' if args.synthetic_mnist else ''}: QAN vs ASHA, PBT, "
        "FIFO",
        "",
        f"Produced by `python benchmarks/schedulers.py {' '.join(info['argv'])}` in "
        f"{info['minutes']:.1f} min (meta-training the controller not included) on "
        f"{platform.machine()} ({os.cpu_count()} CPUs), torch {torch.__version__}, "
        f"ray {ray.__version__}.",
        "",
        f"- task: {args.task} ({data_text}); one Tune iteration = one epoch",
        f"- protocol: {args.samples} trials x {args.epochs} epochs, LR log-uniform in "
        f"[{LR_RANGE[0]:g}, {LR_RANGE[1]:g}] plus a per-trial init seed, the same trial configs "
        "for every scheduler (BasicVariantGenerator(random_state=seed)), 2 concurrent trials x "
        f"1 CPU, reuse_actors, budget {proto.budget} epochs per experiment; metric val_score "
        "(validation accuracy, ties broken by validation loss), mode max",
        "- schedulers: asha (grace 1, reduction 3, max_t = epochs), pbt (asynchronous, "
        "perturbation every epochs/4, quantile 0.25, explores the LR), fifo; qan = QANScheduler "
        "alone (acts every epoch), qan+asha = QAN sets the LR, ASHA (same settings) stops, "
        "qan@builtin = QANScheduler with the shipped policies/builtin controller",
        f"- seeds: {seeds}; mean ± sd over seeds",
        "- epochs are counted in arrival order by a driver-side Tune callback (PBT's rolled-back"
        " epochs count); target accuracy = the best baseline's best validation accuracy (1.0 x, "
        "per seed); 'epochs to target' = cumulative epochs of the experiment when any trial "
        "first reaches it",
        f"- controller (qan, qan+asha): `{_rel(policy)}` -- {spec.get('episodes', '?')} "
        "meta-training episodes, "
        f"Q-MLP {spec.get('hidden')}, actions {spec.get('action_labels')}, control interval "
        f"{spec.get('qan', {}).get('control_interval')} batches (= one epoch), initial LR range "
        f"{spec.get('qan', {}).get('lr_init_range')}, reward {spec.get('qan', {}).get('reward')}"
        f", DQN lr {meta.get('dqn_lr')}, gamma {meta.get('gamma')}; command `"
        f"{spec.get('command', '?')}` at commit {spec.get('commit', '?')}",
        f"- builtin controller (qan@builtin): {_builtin_note()}",
        "",
        "## Result",
        "",
        f"The strict target (1.0 x) is one order statistic of a {n_val}-image validation set "
        f"(one image = {100 / n_val:.2f} points), so whether a run hits it exactly is noisy; "
        "0.99 x measures the "
        "time to come within 1% of it. Both are computed from the same runs.",
        "",
        *goal_section(runs, names, 1.0),
        *goal_section(runs, names, 0.99),
        "### Best accuracy within the budget",
        "",
        *best_accuracy_line(runs, names),
        "",
        "## Why the goal can fall short on this task (structural, not fitted to these numbers)",
        "",
        "- 'Epochs to target' counts every epoch of every trial in arrival order with 2 trials "
        "running at once, so it has a floor of about 2 x the epochs one good trial needs. When "
        "the first two sampled LRs are already good, every scheduler reaches the target within "
        "a few epochs of that floor and nobody can be 2x faster; QAN can only gain on seeds "
        "whose first trials start from a bad LR, and only by as much as its LR corrections "
        "beat ASHA's early stopping (which also starts the next config sooner).",
        f"- The target is the maximum of many noisy validation accuracies ({n_val} images): the "
        "strict target is sometimes reached by no scheduler at all, and which one hits it first "
        f"is partly luck; {len(seeds)} seeds leave wide spreads. Tune runs are not "
        "bit-reproducible (arrival order changes ASHA/PBT decisions), so reruns move these "
        "numbers.",
        "- QAN acts once per epoch (8 decisions per trial), with a controller meta-trained for "
        "minutes on the log-loss reward, not on time-to-accuracy.",
        "",
        "## Not measured",
        "",
        "- MNIST / Fashion-MNIST / CIFAR-10: the trainables exist (trainables.mnist_lenet, ...) "
        "but there is no real MNIST-style data on this machine and no network, so nothing was run"
        " on them; no number here is about them.",
        "",
    ])
    (out / f"{tag}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
