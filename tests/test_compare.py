"""`qan compare`'s pure pieces: curves, epochs to target, targets per seed, the table; plus the
scheduler factory's errors (no Ray session needed)."""

from __future__ import annotations

import math

import pytest
from controllers import fixed_action_controller

from qan_ray import compare as c

NAN = float("nan")
ROWS = [  # arrival order: epochs are cumulative over all trials
    {"epochs": 1.0, "val_accuracy": 0.50, "test_accuracy": None},
    {"epochs": 2.0, "val_accuracy": NAN, "test_accuracy": None},
    {"epochs": 3.0, "val_accuracy": 0.90, "test_accuracy": None},
    {"epochs": 4.0, "val_accuracy": 0.80, "test_accuracy": 0.70},
    {"epochs": 5.0, "val_accuracy": 0.95, "test_accuracy": 0.93},
]


def test_best_curve_is_the_running_max_and_skips_nan():
    assert c.best_curve(ROWS) == [(1.0, 0.5), (2.0, 0.5), (3.0, 0.9), (4.0, 0.9), (5.0, 0.95)]


@pytest.mark.parametrize("target, epochs", [(0.5, 1.0), (0.85, 3.0), (0.95, 5.0), (0.96, None)])
def test_epochs_to_target(target, epochs):
    assert c.epochs_to_target(ROWS, target) == epochs


def test_best_finished_test_takes_the_best_validated_finished_trial():
    assert c.best_finished_test(ROWS) == 0.93
    assert c.best_finished_test(ROWS[:3]) is None


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
    out = {(s["scheduler"], s["seed"]): s for s in c.add_targets(runs, 1.0)}
    assert out[("qan", 0)]["target_accuracy"] == 0.97  # fifo's best, not QAN's 0.99
    assert out[("qan", 0)]["epochs_to_target"] == 2.0
    assert out[("asha", 0)]["epochs_to_target"] is None
    assert out[("fifo", 0)]["epochs_to_target"] == 2.0
    assert out[("qan", 1)]["epochs_to_target"] is None
    assert out[("asha", 1)]["target_accuracy"] == 0.8
    half = {(s["scheduler"], s["seed"]): s for s in c.add_targets(runs, 0.5)}
    assert half[("qan", 1)]["epochs_to_target"] == 1.0  # 0.5 >= 0.4
    rows = {r["scheduler"]: r for r in c.table_rows(list(out.values()), ["qan", "asha", "fifo"])}
    assert rows["qan"]["reached_target"] == 1 and rows["qan"]["seeds"] == 2
    assert rows["qan"]["best_val_accuracy_mean"] == pytest.approx(0.795)
    assert rows["qan"]["best_val_accuracy_sd"] == pytest.approx(math.sqrt(2 * 0.195**2))
    text = c.markdown(list(rows.values()), "note")
    assert "| qan | 0.7950 ± 0.2758 | 2.0 ± 0.0 (1/2) |" in text
    assert "| asha |" in text and "n/a" in text  # asha reached the target in no seed


@pytest.mark.parametrize("name, message", [
    ("sha", "scheduler 'sha' is unknown"),
    ("asha+qan", r"qan\+STOPPER"),
    ("qan+fifo", r"qan\+STOPPER"),
    ("asha@builtin", "only QAN schedulers take a policy"),
])
def test_make_scheduler_rejects_unknown_names(name, message):
    proto = c.Protocol(task_config={"task": "digits-mlp"})
    with pytest.raises(ValueError, match=message):
        c.make_scheduler(name, proto)


def test_make_scheduler_builds_qan_with_its_stopper(tmp_path):
    fixed_action_controller(392).save(tmp_path / "ctrl")
    proto = c.Protocol(task_config={"task": "digits-mlp"}, policy=str(tmp_path / "ctrl"),
                       epochs=6)
    qan = c.make_scheduler("qan+asha", proto)
    assert type(qan.stopper).__name__ == "AsyncHyperBandScheduler" and qan.stopper._max_t == 6
    pbt = c.make_scheduler("qan+pbt", proto).stopper
    assert set(pbt._hyperparam_mutations) == {"momentum"}  # QAN owns the LR
    assert set(c.make_scheduler("pbt", proto)._hyperparam_mutations) == {"lr"}
    other = fixed_action_controller(392, action=4).save(tmp_path / "other")
    assert c.make_scheduler(f"qan@{other}", proto).keep == 2
    assert c.make_scheduler(f"qan@{other}", proto).controller.act([0.0] * 392) == 4


@pytest.mark.parametrize("field, value, message", [
    ("samples", 0, "`samples` is 0"),
    ("lr_low", 2.0, "0 < low < high"),
    ("budget_epochs", 0, "`budget_epochs` is 0"),
])
def test_protocol_validation(field, value, message):
    with pytest.raises(ValueError, match=message):
        c.Protocol(task_config={}, **{field: value}).validate()


def test_budget_defaults_to_what_fifo_spends():
    assert c.Protocol(task_config={}, samples=8, epochs=8).budget == 64
    assert c.Protocol(task_config={}, budget_epochs=10).budget == 10
