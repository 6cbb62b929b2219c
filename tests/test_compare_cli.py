"""End-to-end: `qan compare` and `qan tune` in a subprocess, as a user runs them (tiny budget)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from controllers import fixed_action_controller

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}


def qan(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qan_ray.cli", *args], capture_output=True,
                          text=True, timeout=timeout, env=ENV, cwd=ROOT)


def test_package_import_is_lazy_and_exports_the_public_names():
    code = ("import sys, qan_ray; assert 'ray' not in sys.modules and 'torch' not in sys.modules;"
            " print(sorted(qan_ray.__all__)); from qan_ray import QANScheduler, QANConfig;"
            " print(QANScheduler.__module__, 'ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env=ENV, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == [
        "['QANConfig', 'QANScheduler', 'TargetTrainer', 'TargetTrainingEnv', 'UserTask']",
        "qan_ray.scheduler True"]


def test_missing_controller_and_bad_scheduler_are_one_clear_line(tmp_path):
    out = qan("compare", "--policy", str(tmp_path / "nope"), "--out", str(tmp_path))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "has no spec.json + qnet.pt" in out.stderr and "--policy" in out.stderr
    out = qan("tune", "--scheduler", "qan+fifo", "--out", str(tmp_path))
    assert out.returncode == 2 and "qan+STOPPER" in out.stderr


def test_compare_prints_and_writes_the_table(tmp_path):
    policy = fixed_action_controller(action=2).save(tmp_path / "ctrl")  # keep
    out_dir = tmp_path / "cmp"
    out = qan("compare", "--schedulers", "qan,fifo", "--samples", "2", "--epochs", "2",
              "--policy", str(policy), "--out", str(out_dir), timeout=400)
    assert out.returncode == 0, out.stderr[-3000:]
    table = [line for line in out.stdout.splitlines() if line.startswith("| ")]
    assert [line.split("|")[1].strip() for line in table[1:]] == ["qan", "fifo"]
    rows = pq.read_table(out_dir / "compare.parquet").to_pylist()
    assert [(r["scheduler"], r["total_epochs"]) for r in rows] == [("qan", 4.0), ("fifo", 4.0)]
    # a 'keep' controller and FIFO train the same configs the same way: same best accuracy
    assert rows[0]["best_val_accuracy"] == rows[1]["best_val_accuracy"]
    assert len(pq.read_table(out_dir / "trace.parquet")) == 8
    assert (out_dir / "compare.png").stat().st_size > 10_000
    assert (out_dir / "compare.md").read_text().startswith("Target accuracy:")
