"""`qan tune` (one Ray Tune experiment) and `qan compare` (several schedulers, same protocol).

The pieces live beside this command module:
- `qan_ray.protocol`: the `Protocol` every scheduler shares (trial configs, search space,
  resources, metric, epoch budget), its generated CLI flags, the scheduler factory and one Tune
  experiment (`run_experiment`);
- `qan_ray.summaries`: best accuracy, epochs to the target accuracy, mean ± sd, the table;
- `qan_ray.plots.plot_compare`: the figure.

`compare()` runs every scheduler on every seed and writes compare.md, compare.parquet,
trace.parquet and compare.png; see docs/scheduler.md for how to read them.

Faults: every experiment keeps its records under OUT/experiments/<scheduler>-s<seed>/
(protocol.run_experiment). Ctrl-C ends `qan tune` / `qan compare` with exit status 130 and a list
of what finished; `compare` then writes no table (it never mixes an interrupted run with complete
ones). Running the same `qan compare` again reuses the finished experiments (same protocol) and
reruns the others; `qan tune --resume` continues the interrupted experiment via
`tune.Tuner.restore`. Outputs and the controllers are checked before Ray starts.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import Any

from qan_ray.config import add_config_arguments
from qan_ray.protocol import (
    BASE_SCHEDULERS,
    LR_FREE,
    SCHEDULED_NAMES,
    SKIP_FLAGS,
    STOPPERS,
    ExperimentInterrupted,
    Protocol,
    add_protocol_arguments,
    align_action_mode,
    fingerprint,
    protocol_from_args,
    read_rows,
    record_dir,
    run_experiment,
)
from qan_ray.records import read_json, writable_dir
from qan_ray.summaries import add_targets, is_baseline, markdown, table_rows, trial_table


def compare(names: list[str], proto: Protocol, seeds: list[int], out: Path,
            target_fraction: float = 1.0, log=print,
            storage: str | Path | None = None) -> dict[str, Any]:
    """Run every scheduler on every seed; write compare.md, compare.parquet, trace.parquet and
    compare.png under `out`; return the table rows and the Markdown."""
    from qan_ray.plots import plot_compare
    from qan_ray.records import write_table

    proto.validate()
    if not 0 < target_fraction <= 1:
        raise ValueError(f"`target_fraction` is {target_fraction}; it must lie in (0, 1]. "
                         "Try 1.0 (the best baseline's accuracy itself) or 0.99.")
    # fail fast on a bad name, a missing/corrupt controller or a mismatched action mode
    align_action_mode(names, proto)
    check_outputs(out, storage)
    runs = []
    for seed in seeds:
        for name in names:
            done = finished_run(out, name, proto, seed)
            if done is not None:
                log(f"  {name:<14} seed {seed}: finished before, reused "
                    f"({record_dir(out, name, seed)})")
                runs.append(done)
                continue
            record = record_dir(out, name, seed)
            if record.exists():  # an interrupted one: start it over
                shutil.rmtree(record)
            try:
                runs.append(run_experiment(name, proto, seed, storage or out / "ray", log=log,
                                           record=record))
            except (ExperimentInterrupted, KeyboardInterrupt) as err:
                finished = [f"{r['summary']['scheduler']} seed {r['summary']['seed']}"
                            for r in runs]
                why = err if isinstance(err, ExperimentInterrupted) else (
                    f"Ctrl-C during {name} seed {seed}")
                # the next run starts the interrupted experiment over: its partial Tune folder
                # is of no use (a cloud storage path is left to its owner)
                partial = Path(err.path) if isinstance(err, ExperimentInterrupted) else None
                if partial is not None and partial.is_dir():
                    shutil.rmtree(partial, ignore_errors=True)
                raise CompareInterrupted(why, finished, out) from None
    summaries = add_targets(runs, target_fraction)
    rows = table_rows(summaries, names)
    note = (f"{target_fraction:g} x the best baseline's best validation accuracy, per seed "
            f"(baselines: {[n for n in names if is_baseline(n)] or names})")
    text = markdown(rows, note)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.md").write_text(text + "\n")
    write_table(out / "compare.parquet", summaries)
    write_table(out / "trace.parquet", [{**row, "scheduler": r["summary"]["scheduler"],
                                         "seed": r["summary"]["seed"]}
                                        for r in runs for row in r["rows"]])
    plot_compare(runs, summaries, out / "compare.png")
    return {"rows": rows, "summaries": summaries, "markdown": text, "runs": runs}


class CompareInterrupted(RuntimeError):
    def __init__(self, err: object, finished: list[str], out: Path):
        self.err, self.finished, self.out = err, finished, out
        super().__init__(f"{err}; finished: {finished or 'none'}")


def finished_run(out: Path, name: str, proto: Protocol, seed: int) -> dict[str, Any] | None:
    """A finished experiment of this (scheduler, seed, protocol) recorded under `out`, or None.
    One of another protocol is refused (a table must not mix protocols)."""
    record = record_dir(out, name, seed)
    if not (record / "summary.json").exists():
        return None
    saved = read_json(record / "summary.json", "a finished experiment's summary",
                      f"Delete {record} to run it again.")
    if saved.get("fingerprint") != fingerprint(name, proto, seed):
        raise ValueError(f"--out {str(out)!r} holds a finished {name} seed {seed} of another "
                         f"protocol ({record / 'summary.json'}); one table must use one "
                         "protocol. Use a new --out, or delete that folder.")
    return {"summary": saved["summary"], "rows": read_rows(record / "rows.jsonl")}


def check_outputs(out: Path, storage: str | Path | None) -> None:
    """--out and a local --storage-path must be writable folders (checked before Ray)."""
    writable_dir(out, "--out")
    if storage is not None and "://" not in str(storage):
        writable_dir(storage, "--storage-path")


# --- CLI -----------------------------------------------------------------------------------------
def _add_arguments(p: argparse.ArgumentParser, out: str) -> None:
    add_protocol_arguments(p)
    g = p.add_argument_group("outputs")
    g.add_argument("--out", default=out, help="output folder")
    g.add_argument("--storage-path", default=None,
                   help="Ray Tune storage (trial checkpoints): a path every node can write or a "
                        "cloud URI such as s3://bucket/qan (default: OUT/ray)")
    add_config_arguments(p, skip=SKIP_FLAGS)


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError as err:
        raise ValueError(f"--seeds is {text!r}; it must be comma-separated integers, e.g. "
                         "0,1,2.") from err
    if not seeds:
        raise ValueError("--seeds is empty; give at least one seed, e.g. --seeds 0.")
    repeated = sorted({s for s in seeds if seeds.count(s) > 1})
    if repeated:
        unique = ",".join(str(s) for s in dict.fromkeys(seeds))
        raise ValueError(f"--seeds is {text!r}, which repeats seed(s) {repeated}: a seed would "
                         "run once but count twice. Give each seed once, e.g. --seeds "
                         f"{unique}.")
    return seeds


def configure_tune(p: argparse.ArgumentParser) -> None:
    p.add_argument("--scheduler", default="qan",
                   help=f"one of {BASE_SCHEDULERS}, qan+STOPPER ({'|'.join(STOPPERS)}) or "
                        f"{'|'.join(SCHEDULED_NAMES)} (a cosine LR decay per trial), an LR-free "
                        f"optimizer {'|'.join(LR_FREE)} (alone or +asha|hyperband|median), or "
                        "tpe+asha (TPE search, ASHA as the pruner)")
    p.add_argument("--seed", type=int, default=0, help="seed of the trial configs")
    p.add_argument("--resume", action="store_true",
                   help="continue the experiment an interrupted `qan tune` with the same flags "
                        "and --out left (tune.Tuner.restore)")
    _add_arguments(p, out="runs/tune")


def run_tune(args: argparse.Namespace) -> int:
    import ray

    proto = protocol_from_args(args)
    # bad name, missing/corrupt controller, mismatched --action-mode: fail before Ray
    align_action_mode([args.scheduler], proto)
    out = Path(args.out)
    check_outputs(out, args.storage_path)
    print(f"qan tune: {args.scheduler} on {proto.task_config['task']}, {proto.samples} trials x "
          f"{proto.epochs} epochs, LR in [{proto.lr_low:g}, {proto.lr_high:g}], seed {args.seed}"
          f"{' (resumed)' if args.resume else ''}")
    ours = not ray.is_initialized()
    try:
        run = run_experiment(args.scheduler, proto, args.seed, args.storage_path or out / "ray",
                             record=record_dir(out, args.scheduler, args.seed),
                             resume=args.resume)
    except ExperimentInterrupted as err:
        print(f"qan tune: interrupted: {err}. Nothing is reported for an unfinished experiment. "
              f"Continue with the same command plus --resume (tune.Tuner.restore).",
              file=sys.stderr)
        return 130
    except KeyboardInterrupt:  # outside Tune's own handling, e.g. while it wrapped up
        print(f"qan tune: interrupted. Continue with the same command plus --resume "
              f"(tune.Tuner.restore; the records are under {out}).", file=sys.stderr)
        return 130
    finally:
        if ours and ray.is_initialized():
            ray.shutdown()
    print(f"{'trial':<14} {'lr start':>9} {'lr end':>9} {'epochs':>6} {'best val acc':>12}")
    for tid, t in trial_table(run["rows"]).items():
        best = "diverged" if t["diverged"] else f"{t['best']:.4f}"
        print(f"{tid:<14} {t['first_lr']:>9.4g} {t['last_lr']:>9.4g} {t['epochs']:>6} "
              f"{best:>12}")
    s = run["summary"]
    best = ("n/a (every trial diverged)" if s["best_val_accuracy"] != s["best_val_accuracy"]
            else f"{s['best_val_accuracy']:.4f}")
    print(f"best val acc {best} (diverged trials excluded: {s.get('diverged_trials', 0)}); "
          f"{s['total_epochs']:.0f} epochs in total; {s['wall_s']:.1f}s")
    print(f"every trial: mean final val acc {s['trial_mean_final_val_accuracy']:.4f}, dead "
          f"trials {s['dead_trials']}/{s['trials']}, rescues {s['rescues']}")
    return 0


def configure_compare(p: argparse.ArgumentParser) -> None:
    p.add_argument("--schedulers", default="qan,asha,pbt,fifo",
                   help="comma-separated scheduler names (fifo, asha, hyperband, median, pbt, "
                        "pb2, qan, qan+asha, ..., asha+cosine, fifo+cosine: a cosine LR decay "
                        "per trial; the LR-free optimizers prodigy, schedulefree, dadapt, alone "
                        "or +asha: qan_ray.lrfree; tpe+asha: TPE search with ASHA as the "
                        "pruner)")
    p.add_argument("--search", choices=("random", "tpe"), default="random",
                   help="tpe: also run the row tpe+asha (Ray Tune's OptunaSearch with a TPE "
                        "sampler seeded by the seed, ASHA as the pruner) beside the random-search "
                        "schedulers, on the same epoch budget")
    p.add_argument("--seeds", default="0", help="comma-separated seeds of the trial configs")
    p.add_argument("--target-fraction", type=float, default=1.0,
                   help="target = this x the best baseline's best validation accuracy")
    _add_arguments(p, out="runs/compare")


def run_compare(args: argparse.Namespace) -> int:
    proto = protocol_from_args(args)
    names = [n.strip() for n in args.schedulers.split(",") if n.strip()]
    if getattr(args, "search", "random") == "tpe" and "tpe+asha" not in names:
        names.append("tpe+asha")
    seeds = _seeds(args.seeds)
    out = Path(args.out)
    print(f"qan compare: {names} on {proto.task_config['task']}, seeds {seeds}, "
          f"{proto.samples} trials x {proto.epochs} epochs (budget {proto.budget} epochs), "
          f"{proto.max_concurrent} concurrent")
    import ray

    ours = not ray.is_initialized()
    try:
        result = compare(names, proto, seeds, out, target_fraction=args.target_fraction,
                         storage=args.storage_path)
    except CompareInterrupted as err:
        print(f"qan compare: interrupted: {err.err}. Finished: {err.finished or 'none'} (kept "
              f"under {out / 'experiments'}; the interrupted experiment's partial Tune folder was "
              "removed). No table was written: it would mix an interrupted run with complete "
              "ones. Run the same command again to reuse the finished experiments and run the "
              "rest.", file=sys.stderr)
        return 130
    except KeyboardInterrupt:  # after the experiments, while the table or figure was written
        print(f"qan compare: interrupted while writing the table under {out}; every experiment "
              f"had finished (kept under {out / 'experiments'}). Run the same command again to "
              "write the table from them without re-running anything.", file=sys.stderr)
        return 130
    finally:
        if ours and ray.is_initialized():
            ray.shutdown()
    print(result["markdown"])
    print(f"wrote {out / 'compare.md'}, {out / 'compare.parquet'}, {out / 'trace.parquet'}, "
          f"{out / 'compare.png'}")
    return 0
