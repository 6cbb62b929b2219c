"""End-to-end: `qan compare` and `qan tune` as a user runs them (tiny budget). A fresh process
where that is what is checked (lazy imports, Ctrl-C), `qan_ray.cli.main` in process otherwise."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from background import Job
from controllers import fixed_action_controller

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}


LAZY = ("import sys, qan_ray; assert 'ray' not in sys.modules and 'torch' not in sys.modules;"
        " print(sorted(qan_ray.__all__)); from qan_ray import QANScheduler, QANConfig;"
        " print(QANScheduler.__module__, 'ray' in sys.modules)")


@pytest.fixture
def fresh_import() -> subprocess.CompletedProcess:
    return BACKGROUND["fresh_import"].result()[1]


def test_package_import_is_lazy_and_exports_the_public_names(fresh_import):
    out = fresh_import  # a fresh interpreter: nothing imported before `import qan_ray`
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == [
        "['QANConfig', 'QANScheduler', 'TargetTrainer', 'TargetTrainingEnv', 'UserTask']",
        "qan_ray.scheduler True"]


def test_missing_controller_and_bad_scheduler_are_one_clear_line(tmp_path, capsys,
                                                                 ray_must_not_start):
    from qan_ray.cli import main

    # main() returning (not raising) is the CLI's "no traceback": one error line, status 2
    assert main(["compare", "--policy", str(tmp_path / "nope"), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "qan compare: error: " in err
    assert "has no spec.json + qnet.pt" in err and "--policy" in err
    assert main(["tune", "--scheduler", "qan+fifo", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "qan tune: error: " in err and "qan+STOPPER" in err


def _compare_args(root: Path) -> list[str]:
    return ["compare", "--schedulers", "qan,fifo", "--samples", "2", "--epochs", "2",
            "--policy", str(root / "ctrl"), "--out", str(root / "cmp")]


def _interrupted_compare_argv(root: Path) -> list[str]:
    fixed_action_controller(action=2).save(root / "ctrl")  # keep
    return [sys.executable, "-m", "qan_ray.cli", *_compare_args(root)]


BACKGROUND = {  # run once per test run, in the background (tests/background.py)
    "fresh_import": Job("fresh-import", lambda root: [sys.executable, "-c", LAZY], ENV, ROOT,
                        timeout=120),
    # a real SIGINT, sent by the process to itself at the 5th result: qan's 2 trials x 2 epochs
    # came first, so it lands in fifo's first epoch
    "interrupted_compare": Job("interrupted-compare", _interrupted_compare_argv,
                               {**ENV, "QAN_FAULT": "tune-result:5:sigint"}, ROOT),
}


@pytest.fixture
def interrupted_compare() -> tuple[Path, subprocess.CompletedProcess]:
    return BACKGROUND["interrupted_compare"].result()


def test_interrupted_compare_writes_no_table_then_reuses_and_writes_it(interrupted_compare,
                                                                       ray_session, capsys):
    """`qan compare` stopped by Ctrl-C inside its second scheduler writes no table (it would mix
    an interrupted run with complete ones); the same command again reuses the finished run, runs
    the other, prints the table and writes compare.md/.parquet, trace.parquet and the figure."""
    from qan_ray.cli import main

    root, stopped = interrupted_compare
    out_dir, args = root / "cmp", _compare_args(root)
    assert stopped.returncode == 130, stopped.stderr[-3000:]
    assert "Finished: ['qan seed 0']" in stopped.stderr
    assert "No table was written" in stopped.stderr
    assert "partial Tune folder was removed" in stopped.stderr
    assert [p.name.split("-s0-")[0] for p in (out_dir / "ray").iterdir() if p.is_dir()] == [
        "digits-mlp-qan"]  # the interrupted fifo experiment's Tune folder is gone
    assert not (out_dir / "compare.md").exists() and not (out_dir / "compare.parquet").exists()

    assert main(args) == 0  # the same command again, in process on the session's Ray
    printed = capsys.readouterr().out
    assert f"  {'qan':<14} seed 0: finished before, reused" in printed
    assert f"  {'fifo':<14} seed 0: finished before" not in printed  # the interrupted one reran
    table = [line for line in printed.splitlines() if line.startswith("| ")]
    assert [line.split("|")[1].strip() for line in table[1:]] == ["qan", "fifo"]
    rows = pq.read_table(out_dir / "compare.parquet").to_pylist()
    assert [(r["scheduler"], r["total_epochs"]) for r in rows] == [("qan", 4.0), ("fifo", 4.0)]
    # a 'keep' controller and FIFO train the same configs the same way: same best accuracy
    assert rows[0]["best_val_accuracy"] == rows[1]["best_val_accuracy"]
    assert len(pq.read_table(out_dir / "trace.parquet")) == 8
    assert (out_dir / "compare.png").stat().st_size > 10_000
    assert (out_dir / "compare.md").read_text().startswith("Target accuracy:")
