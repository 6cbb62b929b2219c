"""Pure summaries of scheduler runs (no Ray): one run is the arrival-ordered result rows of one
Tune experiment, each with the cumulative epochs of all its trials so far.

Measured per run: best validation accuracy, epochs until the target accuracy (target = the best
baseline's best validation accuracy x target_fraction, per seed; baselines = the schedulers whose
name does not start with "qan"), total epochs, wall time, and the test accuracy of the best trial
that finished its budget. `table_rows` and `markdown` turn them into mean ± sd per scheduler.
Diverged trials never count as a best: their results (every result of a trial that reported
diverged=True) are left out of the best accuracies and the epochs to target.

Per trial (what one user's trial gets, not only the best one): the mean over all trials of their
final validation accuracy (the last one each reported, NaN counting as chance), the dead trials
(final validation accuracy within 5 points of chance, `constants.is_dead`) and the rescue
guard's rollbacks.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

from qan_ray.constants import chance_accuracy, is_dead


def diverged_trials(rows: list[dict[str, Any]]) -> set[str]:
    """The trials that reported diverged=True at some result."""
    return {r["trial"] for r in rows if r.get("diverged")}


def _usable(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The results that may count as a best: finite accuracy, from a trial that never
    diverged."""
    bad = diverged_trials(rows)
    return [r for r in rows if r.get("trial") not in bad and r.get("val_accuracy") is not None
            and math.isfinite(r["val_accuracy"])]


def best_curve(rows: list[dict[str, Any]]) -> list[tuple[float, float]]:
    """(cumulative epochs, best validation accuracy so far) after every result."""
    best, out = -math.inf, []
    usable = {id(r) for r in _usable(rows)}
    for r in rows:
        if id(r) in usable:
            best = max(best, r["val_accuracy"])
        out.append((r["epochs"], best))
    return out


def epochs_to_target(rows: list[dict[str, Any]], target: float) -> float | None:
    """Cumulative epochs at the first result whose validation accuracy reaches `target`."""
    for r in _usable(rows):
        if r["val_accuracy"] >= target - 1e-12:
            return float(r["epochs"])
    return None


def best_finished_test(rows: list[dict[str, Any]]) -> float | None:
    """Test accuracy of the trial whose last-epoch validation accuracy is best (among trials that
    trained their whole budget, i.e. reported test_accuracy)."""
    finished = [r for r in _usable(rows) if r.get("test_accuracy") is not None]
    if not finished:
        return None
    return float(max(finished, key=lambda r: r["val_accuracy"])["test_accuracy"])


def final_accuracies(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Per trial: the validation accuracy of its last result (NaN or missing -> chance)."""
    out: dict[str, float] = {}
    for r in rows:
        acc = r.get("val_accuracy")
        out[r["trial"]] = (float(acc) if acc is not None and math.isfinite(acc)
                           else chance_accuracy())
    return out


def trial_rescues(rows: list[dict[str, Any]]) -> int:
    """Rescues over all trials (each trial's count is cumulative: its largest)."""
    per: dict[str, int] = {}
    for r in rows:
        per[r["trial"]] = max(per.get(r["trial"], 0), int(r.get("rescues") or 0))
    return sum(per.values())


def mean_sd(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation of the finite values (nan, nan if there are none)."""
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return math.nan, math.nan
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def is_baseline(name: str) -> bool:
    return not name.startswith("qan")


def run_summary(name: str, seed: int, rows: list[dict[str, Any]], trials: int, wall_s: float,
                budget: float) -> dict[str, Any]:
    """The summary row of one experiment from its arrival-ordered result rows."""
    total = float(rows[-1]["epochs"]) if rows else 0.0
    finals = final_accuracies(rows)
    return {
        "scheduler": name, "seed": seed, "trials": trials,
        "best_val_accuracy": max((r["val_accuracy"] for r in _usable(rows)),
                                 default=math.nan),
        "diverged_trials": len(diverged_trials(rows)),
        "trial_mean_final_val_accuracy": (statistics.mean(finals.values()) if finals
                                          else math.nan),
        "dead_trials": sum(is_dead(a) for a in finals.values()),
        "rescues": trial_rescues(rows),
        "total_epochs": total, "wall_s": wall_s, "hit_budget": total >= budget,
        "test_accuracy_best_finished": best_finished_test(rows),
    }


def trial_table(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per trial: first and last LR, epochs trained, best validation accuracy (nan for a
    trial that diverged) and whether it diverged."""
    by_trial: dict[str, dict[str, Any]] = {}
    bad = diverged_trials(rows)
    for r in rows:
        t = by_trial.setdefault(r["trial"], {"first_lr": r["lr"], "best": -math.inf,
                                             "diverged": r["trial"] in bad})
        t.update(last_lr=r["lr"], epochs=r["iteration"])
        if r["val_accuracy"] is not None:
            t["best"] = max(t["best"], r["val_accuracy"])
    for t in by_trial.values():
        if t["diverged"]:
            t["best"] = math.nan
    return by_trial


def add_targets(runs: list[dict[str, Any]], target_fraction: float) -> list[dict[str, Any]]:
    """Per seed: the target accuracy and every run's epochs until it (pure over the runs)."""
    seeds = sorted({r["summary"]["seed"] for r in runs})
    out = []
    for seed in seeds:
        of_seed = [r for r in runs if r["summary"]["seed"] == seed]
        pool = [r for r in of_seed if is_baseline(r["summary"]["scheduler"])] or of_seed
        best = max((r["summary"]["best_val_accuracy"] for r in pool
                    if math.isfinite(r["summary"]["best_val_accuracy"])), default=math.nan)
        target = best * target_fraction
        for r in of_seed:
            s = dict(r["summary"], target_accuracy=target,
                     epochs_to_target=epochs_to_target(r["rows"], target))
            out.append(s)
    return out


def table_rows(summaries: list[dict[str, Any]], names: list[str]) -> list[dict[str, Any]]:
    """One row per scheduler: mean and sd over seeds of every measure."""
    rows = []
    for name in names:
        mine = [s for s in summaries if s["scheduler"] == name]
        reached = [s["epochs_to_target"] for s in mine if s["epochs_to_target"] is not None]
        row = {"scheduler": name, "seeds": len(mine), "reached_target": len(reached),
               "dead_trials": sum(int(s.get("dead_trials", 0)) for s in mine),
               "trials": sum(int(s.get("trials", 0)) for s in mine),
               "rescues": sum(int(s.get("rescues", 0)) for s in mine)}
        for key in ("best_val_accuracy", "epochs_to_target", "total_epochs", "wall_s",
                    "test_accuracy_best_finished", "trial_mean_final_val_accuracy"):
            m, sd = mean_sd([s[key] for s in mine if s.get(key) is not None])
            row[f"{key}_mean"], row[f"{key}_sd"] = m, sd
        rows.append(row)
    return rows


def markdown(rows: list[dict[str, Any]], target_note: str) -> str:
    """The comparison table as Markdown, headed by how the target accuracy was set."""
    def ms(r: dict[str, Any], key: str, fmt: str) -> str:
        m, sd = r[f"{key}_mean"], r[f"{key}_sd"]
        return "n/a" if math.isnan(m) else f"{m:{fmt}} ± {sd:{fmt}}"

    lines = [f"Target accuracy: {target_note}", "",
             "| scheduler | best val acc | epochs to target (reached) | total epochs | wall s "
             "| test acc (best finished trial) | mean final val acc (all trials) | dead trials "
             "| rescues |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['scheduler']} | {ms(r, 'best_val_accuracy', '.4f')} | "
                     f"{ms(r, 'epochs_to_target', '.1f')} ({r['reached_target']}/{r['seeds']}) | "
                     f"{ms(r, 'total_epochs', '.1f')} | {ms(r, 'wall_s', '.1f')} | "
                     f"{ms(r, 'test_accuracy_best_finished', '.4f')} | "
                     f"{ms(r, 'trial_mean_final_val_accuracy', '.4f')} | "
                     f"{r['dead_trials']}/{r['trials']} | {r['rescues']} |")
    return "\n".join(lines)
