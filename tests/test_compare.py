"""`qan compare`'s pure pieces: curves, epochs to target, targets per seed, the table; the
protocol's generated flags; the scheduler factory's errors (no Ray session needed)."""

from __future__ import annotations

import argparse
import dataclasses
import math

import pytest
from controllers import fixed_action_controller

from qan_ray import protocol, summaries

NAN = float("nan")
ROWS = [  # arrival order: epochs are cumulative over all trials
    {"epochs": 1.0, "val_accuracy": 0.50, "test_accuracy": None},
    {"epochs": 2.0, "val_accuracy": NAN, "test_accuracy": None},
    {"epochs": 3.0, "val_accuracy": 0.90, "test_accuracy": None},
    {"epochs": 4.0, "val_accuracy": 0.80, "test_accuracy": 0.70},
    {"epochs": 5.0, "val_accuracy": 0.95, "test_accuracy": 0.93},
]


def test_best_curve_is_the_running_max_and_skips_nan():
    assert summaries.best_curve(ROWS) == [(1.0, 0.5), (2.0, 0.5), (3.0, 0.9), (4.0, 0.9),
                                          (5.0, 0.95)]


@pytest.mark.parametrize("target, epochs", [(0.5, 1.0), (0.85, 3.0), (0.95, 5.0), (0.96, None)])
def test_epochs_to_target(target, epochs):
    assert summaries.epochs_to_target(ROWS, target) == epochs


def test_best_finished_test_takes_the_best_validated_finished_trial():
    assert summaries.best_finished_test(ROWS) == 0.93
    assert summaries.best_finished_test(ROWS[:3]) is None


def _run(name, seed, accs):
    rows = [{"epochs": float(i + 1), "val_accuracy": a, "test_accuracy": None}
            for i, a in enumerate(accs)]
    return {"summary": {"scheduler": name, "seed": seed, "best_val_accuracy": max(accs),
                        "total_epochs": float(len(accs)), "wall_s": 1.0,
                        "test_accuracy_best_finished": None}, "rows": rows}


def test_targets_come_from_the_best_baseline_per_seed_and_qan_is_measured_against_them():
    runs = [_run("qan", 0, [0.8, 0.97, 0.99]), _run("asha", 0, [0.7, 0.9, 0.96]),
            _run("fifo", 0, [0.9, 0.97]), _run("qan", 1, [0.5, 0.6]),
            _run("asha", 1, [0.6, 0.7, 0.8])]
    out = {(s["scheduler"], s["seed"]): s for s in summaries.add_targets(runs, 1.0)}
    assert out[("qan", 0)]["target_accuracy"] == 0.97  # fifo's best, not QAN's 0.99
    assert out[("qan", 0)]["epochs_to_target"] == 2.0
    assert out[("asha", 0)]["epochs_to_target"] is None
    assert out[("fifo", 0)]["epochs_to_target"] == 2.0
    assert out[("qan", 1)]["epochs_to_target"] is None
    assert out[("asha", 1)]["target_accuracy"] == 0.8
    half = {(s["scheduler"], s["seed"]): s for s in summaries.add_targets(runs, 0.5)}
    assert half[("qan", 1)]["epochs_to_target"] == 1.0  # 0.5 >= 0.4
    rows = {r["scheduler"]: r
            for r in summaries.table_rows(list(out.values()), ["qan", "asha", "fifo"])}
    assert rows["qan"]["reached_target"] == 1 and rows["qan"]["seeds"] == 2
    assert rows["qan"]["best_val_accuracy_mean"] == pytest.approx(0.795)
    assert rows["qan"]["best_val_accuracy_sd"] == pytest.approx(math.sqrt(2 * 0.195**2))
    text = summaries.markdown(list(rows.values()), "note")
    assert "| qan | 0.7950 ± 0.2758 | 2.0 ± 0.0 (1/2) |" in text
    assert "| asha |" in text and "n/a" in text  # asha reached the target in no seed


@pytest.mark.parametrize("name, message", [
    ("sha", "scheduler 'sha' is unknown"),
    ("asha+qan", r"qan\+STOPPER"),
    ("qan+fifo", r"qan\+STOPPER"),
    ("asha@builtin", "only QAN schedulers take a policy"),
])
def test_make_scheduler_rejects_unknown_names(name, message):
    proto = protocol.Protocol(task_config={"task": "digits-mlp"})
    with pytest.raises(ValueError, match=message):
        protocol.make_scheduler(name, proto)


def test_make_scheduler_builds_qan_with_its_stopper(tmp_path):
    fixed_action_controller().save(tmp_path / "ctrl")
    proto = protocol.Protocol(task_config={"task": "digits-mlp"}, policy=str(tmp_path / "ctrl"),
                              epochs=6)
    qan = protocol.make_scheduler("qan+asha", proto)
    assert type(qan.stopper).__name__ == "AsyncHyperBandScheduler" and qan.stopper._max_t == 6
    pbt = protocol.make_scheduler("qan+pbt", proto).stopper
    assert set(pbt._hyperparam_mutations) == {"momentum"}  # QAN owns the LR
    assert set(protocol.make_scheduler("pbt", proto)._hyperparam_mutations) == {"lr"}
    other = fixed_action_controller(action=4).save(tmp_path / "other")
    chosen = protocol.make_scheduler(f"qan@{other}", proto)  # @POLICY overrides --policy
    assert chosen.fallback == 2  # the keep action, read from the controller's spec
    assert chosen.controller.act([0.0] * chosen.controller.obs_size) == 4


@pytest.mark.parametrize("field, value, message", [
    ("samples", 0, "`samples` is 0"),
    ("lr_low", 2.0, "0 < low < high"),
    ("budget_epochs", 0, "`budget_epochs` is 0"),
])
def test_protocol_validation(field, value, message):
    with pytest.raises(ValueError, match=message):
        protocol.Protocol(task_config={}, **{field: value}).validate()


def test_budget_defaults_to_what_fifo_spends():
    assert protocol.Protocol(task_config={}, samples=8, epochs=8).budget == 64
    assert protocol.Protocol(task_config={}, budget_epochs=10).budget == 10


def _parse(*argv: str, command: str = "compare"):
    from qan_ray import compare

    parser = argparse.ArgumentParser()
    getattr(compare, f"configure_{command}")(parser)
    return parser.parse_args(list(argv))


def test_every_protocol_field_has_a_generated_flag_with_its_docstring_as_help():
    parser = argparse.ArgumentParser()
    protocol.add_protocol_arguments(parser)
    by_dest = {a.dest: a for a in parser._actions}
    for f in dataclasses.fields(protocol.Protocol):
        if f.name in ("task_config", "lr_low", "lr_high"):
            continue  # the task flags fill task_config; --lr-range sets lr_low and lr_high
        action = by_dest[protocol.DEST_PREFIX + f.name]
        assert action.option_strings == ["--" + f.name.replace("_", "-")]
        assert action.default is None and action.help  # unset = the dataclass default
    assert "Log-uniform LR search space" in by_dest[protocol.DEST_PREFIX + "lr_range"].help


def test_flags_map_to_the_protocol_and_unset_flags_keep_its_defaults():
    proto = protocol.protocol_from_args(_parse(
        "--samples", "3", "--epochs", "5", "--lr-range", "0.01,0.5", "--max-concurrent", "1",
        "--cpus-per-trial", "0.5", "--gpus-per-trial", "0.25", "--budget-epochs", "12",
        "--policy", "runs/x/controller", "--control-every", "2", "--task", "digits-mlp",
        "--control-interval", "35"))
    assert proto == protocol.Protocol(
        task_config={"task": "digits-mlp", "control_interval": 35}, samples=3, epochs=5,
        lr_low=0.01, lr_high=0.5, max_concurrent=1, cpus_per_trial=0.5, gpus_per_trial=0.25,
        budget_epochs=12, policy="runs/x/controller", control_every=2)
    default = protocol.protocol_from_args(_parse("--out", "somewhere", command="tune"))
    assert default == protocol.Protocol(task_config={"task": "digits-mlp"})
    assert default.budget == 64


@pytest.mark.parametrize("argv, message", [
    (("--lr-range", "0.1"), "--lr-range is '0.1'; it must be LOW,HIGH"),
    (("--lr-range", "1,0.1"), "0 < low < high"),
    (("--samples", "0"), "`samples` is 0; it must be >= 1"),
])
def test_bad_protocol_flags_name_the_value_and_the_fix(argv, message):
    with pytest.raises(ValueError, match=message):
        protocol.protocol_from_args(_parse(*argv))


def test_duplicate_seeds_are_refused_naming_them_and_a_fix():
    from qan_ray.compare import _seeds

    assert _seeds("0,1,2") == [0, 1, 2]
    with pytest.raises(ValueError, match=r"--seeds is '0,0,1', which repeats seed\(s\) \[0\]: "
                                         r".*e\.g\. --seeds 0,1\."):
        _seeds("0,0,1")
    with pytest.raises(ValueError, match="comma-separated integers"):
        _seeds("0,x")


def test_per_trial_summary_counts_dead_trials_rescues_and_the_mean_final_accuracy():
    rows = [  # arrival order; a trial's last result is its final one
        {"epochs": 1, "trial": "a", "iteration": 1, "val_accuracy": 0.5, "rescues": 0},
        {"epochs": 2, "trial": "b", "iteration": 1, "val_accuracy": 0.3, "rescues": 1},
        {"epochs": 3, "trial": "a", "iteration": 2, "val_accuracy": 0.9, "rescues": 0},
        {"epochs": 4, "trial": "b", "iteration": 2, "val_accuracy": 0.12, "rescues": 2},
        {"epochs": 5, "trial": "c", "iteration": 1, "val_accuracy": float("nan"),
         "diverged": True},
    ]
    s = summaries.run_summary("qan", 0, rows, trials=3, wall_s=1.0, budget=10)
    assert s["dead_trials"] == 2 and s["rescues"] == 2  # b at 0.12, c at NaN (chance)
    assert s["trial_mean_final_val_accuracy"] == pytest.approx((0.9 + 0.12 + 0.1) / 3)
    table = summaries.table_rows([dict(s, epochs_to_target=None)], ["qan"])
    assert (table[0]["dead_trials"], table[0]["trials"], table[0]["rescues"]) == (2, 3, 2)
    assert "| 2/3 | 2 |" in summaries.markdown(table, "x")
