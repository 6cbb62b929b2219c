"""End-to-end: the `qan` CLI in a subprocess, as a user runs it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from controllers import fixed_action_controller

from qan_ray.config import from_dict

pytestmark = pytest.mark.e2e
ENV = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}


def qan(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qan_ray.cli", *args], capture_output=True,
                          text=True, timeout=timeout, env=ENV)


def test_help_lists_every_subcommand_with_its_help_line():
    out = qan("--help")
    assert out.returncode == 0
    # argparse lists each subcommand on its own line, indented by 4: "    train   meta-train ..."
    listed = dict(re.findall(r"^    (\w+) +(\S.*)$", out.stdout, re.M))
    assert list(listed) == ["episode", "train", "evaluate", "tune", "compare"]
    assert listed["train"].startswith("meta-train a controller")
    assert listed["compare"].startswith("QAN vs ASHA/PBT")


HELP_SCRIPT = """
import contextlib, io, sys
from qan_ray.cli import COMMANDS, build_parser

parser = build_parser()
for argv in ([], *([name] for name in COMMANDS)):
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        parser.parse_args([*argv, "--help"])
    print(out.getvalue().split(chr(10))[0])  # the usage line
print("heavy:", *sorted(m for m in ("torch", "ray") if m in sys.modules))
"""


def test_help_imports_neither_torch_nor_ray():
    # `qan --help` and `qan <command> --help` build the whole parser: each command's flags
    # import only argparse-level modules; torch and Ray load when a command runs
    out = subprocess.run([sys.executable, "-c", HELP_SCRIPT], capture_output=True, text=True,
                         timeout=60, env=ENV)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[-1] == "heavy:"  # neither torch nor ray in sys.modules
    commands = ["episode", "train", "evaluate", "tune", "compare"]
    assert [line.split()[:3] for line in lines[1:-1]] == [
        ["usage:", "qan", name] for name in commands]
    top = qan("--help")  # the entry point itself, as a user runs it
    assert top.returncode == 0 and all(f"    {name} " in top.stdout for name in commands)


def test_bad_input_is_one_clear_line_and_exit_code_2(tmp_path):
    out = qan("episode", "--control-interval", "0")
    assert out.returncode == 2
    assert "`control_interval` is 0; it must be an integer >= 1. Try --control-interval 50." in (
        out.stderr)
    assert "Traceback" not in out.stderr
    out = qan("evaluate", "--controller", str(tmp_path / "nope"), "--out", str(tmp_path / "e"))
    assert out.returncode == 2 and "has no spec.json + qnet.pt" in out.stderr
    assert not (tmp_path / "e").exists()  # a failed evaluation leaves no empty --out folder


def test_episode_prints_both_controllers():
    import numpy as np

    out = qan("episode", "--episodes", "1", "--epochs-per-episode", "1")
    assert out.returncode == 0, out.stderr
    assert ("task digits-mlp: 4 control steps of 10 mini-batches per episode, 5 actions, "
            "obs size 589, device cpu") in out.stdout
    rows = [line.split() for line in out.stdout.splitlines()
            if line.startswith(("fixed", "random"))]
    assert [r[:2] for r in rows] == [["fixed", "0"], ["random", "0"]]
    fixed, random = rows
    # columns: controller episode return val-acc test-acc final-lr seconds
    assert float(fixed[5]) == 0.05  # keep at every step: the task's LR to the end
    # the random controller's 4 actions come from default_rng(seed 0), whatever the run does;
    # the first decision of an episode is replaced by keep (qan_ray.episode), the others apply
    rng = np.random.default_rng(0)
    factors = [(0.5, 0.9, 1.0, 1.1, 2.0)[int(rng.integers(5))] for _ in range(4)]
    assert factors[0] != 1.0  # so the first-decision rule shows in the final LR
    assert float(random[5]) == pytest.approx(0.05 * np.prod(factors[1:]), rel=1e-3)
    # 40 batches at LR 0.05 (momentum 0.9) always learn the digits well past chance (0.1):
    # 0.91 val / 0.89 test on x86, far from 0.6 whatever the float rounding
    assert float(fixed[3]) > 0.6 and float(fixed[4]) > 0.6


def _keep_controller(folder: Path, cfg) -> Path:
    """A controller whose greedy action is always 'keep' (factor 1.0), for task `cfg`."""
    ctrl = fixed_action_controller(cfg.lr_factors.index(1.0))
    ctrl.spec.provenance["task"] = cfg.to_dict()  # what `qan evaluate` reads the task from
    return ctrl.save(folder)


def test_evaluate_keep_controller_equals_the_fixed_baseline_exactly(tmp_path):
    # Same trainer code for QAN and the baselines: a controller that always keeps the LR must
    # reproduce the fixed-LR baseline at that LR bit for bit.
    cfg = from_dict(task="digits-mlp", epochs_per_episode=1.0)
    ctrl = _keep_controller(tmp_path / "ctrl", cfg)
    out = qan("evaluate", "--controller", str(ctrl), "--seeds", "2", "--lr-grid", "0.05,0.1",
              "--out", str(tmp_path / "eval"))
    assert out.returncode == 0, out.stderr
    summary = {r["method"]: r for r in pq.read_table(tmp_path / "eval" /
                                                     "evaluation.parquet").to_pylist()}
    best = "0.1" if summary["fixed@0.1"]["best_fixed"] else "0.05"
    sf = [m for m in summary if m.startswith("schedulefree@")]  # the best of its LR grid
    assert sf in (["schedulefree@0.1"], ["schedulefree@0.3"], ["schedulefree@1"])
    assert set(summary) == {"qan", "fixed@0.05", "fixed@0.1", f"step@{best}", f"cosine@{best}",
                            "warmup_cosine@0.05", "plateau@0.05", "hypergradient@0.05",
                            "prodigy@1", "dadapt@1", *sf}
    assert "Schedule-Free at the best LR of its grid (0.1, 0.3, 1)" in out.stdout
    assert summary["qan"]["val_acc_mean"] == summary["fixed@0.05"]["val_acc_mean"]
    assert summary["qan"]["test_acc_mean"] == summary["fixed@0.05"]["test_acc_mean"]
    curves = pq.read_table(tmp_path / "eval" / "curves.parquet").to_pylist()
    q = [(r["seed"], r["batches"], r["val_accuracy"]) for r in curves if r["method"] == "qan"]
    f = [(r["seed"], r["batches"], r["val_accuracy"]) for r in curves
         if r["method"] == "fixed@0.05"]
    assert q == f and len(q) == 2 * 5  # 2 seeds x (reset + 4 control steps)
    for name in ("evaluation.md", "accuracy_vs_epoch.png", "lr_over_time.png"):
        assert (tmp_path / "eval" / name).stat().st_size > 0
    assert "| qan |" in out.stdout and "figures:" in out.stdout
