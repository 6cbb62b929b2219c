"""Faults lose nothing and report honestly: interrupts, resume, crashes, corrupt inputs.

Pure checks (no Ray) first; then real Ray (the session fixture: marked `ray`) and the CLI (marked
`e2e`), on tiny budgets (digits-mlp, 1 actor, --control-interval 35). The CLI runs in a
subprocess where a fresh process is what is checked (a kill without cleanup, Ctrl-C), in process
(`qan_ray.cli.main`) otherwise. One `qan train` process killed mid-commit is shared: each resume
test works on its own copy. Interrupts land at fault points (QAN_FAULT, records.fault_point), not
after a timer."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from background import Job
from controllers import fixed_action_controller

from qan_ray.config import from_dict
from qan_ray.records import STEP_SCHEMA, append_parts, read_parts

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
       "PYTHONUNBUFFERED": "1"}
QAN = from_dict(task="digits-mlp", epochs_per_episode=1.0)  # 35 batches/epoch -> 4 control steps


def qan(*args: str, timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qan_ray.cli", *args], capture_output=True,
                          text=True, timeout=timeout, env={**ENV, **(env or {})}, cwd=ROOT)


# --- pure: seeds, commits, validation ------------------------------------------------------------
def test_episode_seed_is_a_pure_function_of_meta_seed_and_global_index():
    from qan_ray.actors import episode_seed
    from qan_ray.evaluate import EVAL_SEED_BASE
    from qan_ray.meta import SELECTION_SEED_BASE

    seeds = [episode_seed(0, i) for i in range(1000)]
    assert seeds == [episode_seed(0, i) for i in range(1000)] and len(set(seeds)) == 1000
    assert not {episode_seed(1, i) for i in range(1000)} & set(seeds)
    held_out = {EVAL_SEED_BASE + i for i in range(1000)} | {SELECTION_SEED_BASE + i
                                                             for i in range(1000)}
    assert not held_out & set(seeds)


def test_episode_counter_hands_out_the_lowest_unfinished_index_first():
    from qan_ray.actors import _EpisodeCounter

    counter = _EpisodeCounter(done=[0, 1, 3])  # committed before the interrupt
    assert [counter.claim("a"), counter.claim("b"), counter.claim("a")] == [2, 4, 5]


def _fake_run(folder: Path, episodes: int, commits: int, extra_part: bool = False) -> Path:
    """A run folder as MetaTrainer commits it: checkpoint/qan_progress.json + Parquet parts."""
    (folder / "checkpoint").mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    progress = {"episodes": episodes, "iterations": commits, "run": "x", "commits": commits}
    (folder / "checkpoint" / "qan_progress.json").write_text(json.dumps(progress))
    for c in range(commits + int(extra_part)):
        append_parts(folder / "steps", [{"episode": c, "global_episode": c, "step": s,
                                         "truncated": False} for s in range(3)],
                     name=f"c{c:06d}")
    return folder


def _recover(folder: Path) -> tuple[list[int], list[str]]:
    from qan_ray.meta import MetaTrainer

    lines: list[str] = []
    mt = MetaTrainer.__new__(MetaTrainer)  # only the recovery logic: no Ray, no RLlib
    mt.out, mt.log = folder, lines.append
    mt.progress = {"episodes": 0, "commits": 0}
    return mt._recover(), lines


def test_resume_drops_the_part_of_an_uncommitted_commit(tmp_path):
    run = _fake_run(tmp_path / "run", episodes=2, commits=2, extra_part=True)  # killed mid-commit
    done, lines = _recover(run)
    assert done == [0, 1]  # episode 2 was never committed: it runs again
    assert sorted(p.name for p in (run / "steps").glob("*.parquet")) == [
        "part-c000000.parquet", "part-c000001.parquet"]
    assert any("dropped part-c000002.parquet (not committed" in line for line in lines)
    assert read_parts(run / "steps").num_rows == 6  # no duplicate rows


def test_resume_puts_back_a_half_swapped_checkpoint(tmp_path):
    run = _fake_run(tmp_path / "run", episodes=1, commits=1)
    os.replace(run / "checkpoint", run / "checkpoint.old")  # killed inside swap_dir
    (run / "checkpoint.tmp").mkdir()
    assert _recover(run)[0] == [0]
    assert (run / "checkpoint").is_dir() and not (run / "checkpoint.old").exists()
    assert not (run / "checkpoint.tmp").exists()


def test_resume_refuses_rows_that_disagree_with_the_progress(tmp_path):
    run = _fake_run(tmp_path / "run", episodes=3, commits=2)  # progress says 3, rows hold 2
    with pytest.raises(ValueError, match=r"holds 2 full episodes but the committed progress says "
                                         r"3; they must agree"):
        _recover(run)


def test_resume_refuses_a_run_folder_without_config_json(tmp_path):
    from test_meta import _train_args

    from qan_ray.meta import run_train

    (tmp_path / "checkpoint").mkdir()
    (tmp_path / "progress.json").write_text('{"episodes": 2}')
    with pytest.raises(FileNotFoundError, match=r"config.json' is missing, so the run's task .* "
                                                r"it must exist to resume"):
        run_train(_train_args("--out", str(tmp_path), "--resume"))


def test_corrupt_progress_and_parquet_name_the_file(tmp_path):
    from qan_ray.records import read_json

    (tmp_path / "progress.json").write_text('{"episodes": 2, "run')
    with pytest.raises(ValueError, match=r"progress.json \(the progress\) is not valid JSON"):
        read_json(tmp_path / "progress.json", "the progress", "Fix.")
    (tmp_path / "steps").mkdir()
    (tmp_path / "steps" / "part-c000000.parquet").write_bytes(b"PAR1 garbage")
    with pytest.raises(ValueError, match=r"part-c000000.parquet is not a readable Parquet part"):
        read_parts(tmp_path / "steps")


def test_swap_dir_killed_in_the_middle_leaves_the_old_folder(tmp_path):
    code = ("import sys; from pathlib import Path; from qan_ray.records import swap_dir; "
            "d = Path(sys.argv[1]); (d / 'new').mkdir(); (d / 'new' / 'f').write_text('new'); "
            "swap_dir(d / 'new', d / 'final')")
    (tmp_path / "final").mkdir()
    (tmp_path / "final" / "f").write_text("old")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], env={
        **ENV, "QAN_FAULT": "swap-dir"}, cwd=ROOT, capture_output=True, timeout=60)
    assert out.returncode == 86  # os._exit at the fault point: no cleanup ran
    from qan_ray.records import recover_dir

    assert recover_dir(tmp_path / "final") == tmp_path / "final"
    assert (tmp_path / "final" / "f").read_text() == "old"


def test_output_folders_are_checked_before_any_work(tmp_path):
    from qan_ray.records import writable_dir

    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=r"--out is '.*file' but '.*file' is a file; it must be "
                                         r"a folder"):
        writable_dir(tmp_path / "file", "--out")
    with pytest.raises(ValueError, match=r"--out is '.*file/sub' but '.*file' is a file"):
        writable_dir(tmp_path / "file" / "sub", "--out")
    assert writable_dir(tmp_path / "new" / "deep", "--out").is_dir()


def test_corrupt_mnist_idx_names_the_file(tmp_path):
    from qan_ray.data import _load_mnist_like
    from qan_ray.formats import write_mnist

    write_mnist(tmp_path, n_train=20, n_test=10)
    images = tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:1000])  # truncated
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte holds 1000 bytes but its "
                                         r"header \[20, 28, 28\] needs 15696; it is truncated.* "
                                         r"Replace the file"):
        _load_mnist_like("mnist", str(tmp_path), download=False)
    images.write_bytes(b"\x12\x34\x56\x78" + b"\0" * 100)
    with pytest.raises(ValueError, match=r"has magic 12345678; an MNIST IDX file starts with"):
        _load_mnist_like("mnist", str(tmp_path), download=False)


def test_reported_bests_ignore_diverged_trials():
    from qan_ray.summaries import run_summary, trial_table

    rows = [{"epochs": 1.0, "trial": "a", "iteration": 1, "val_accuracy": 0.6, "lr": 0.1,
             "test_accuracy": None, "diverged": False},
            {"epochs": 2.0, "trial": "b", "iteration": 1, "val_accuracy": 0.1, "lr": 9.0,
             "test_accuracy": 0.1, "diverged": True}]
    assert run_summary("fifo", 0, rows, 2, 1.0, 2)["best_val_accuracy"] == 0.6
    table = trial_table(rows)
    assert table["b"]["diverged"] and table["b"]["best"] != table["b"]["best"]  # nan
    only_diverged = run_summary("fifo", 0, rows[1:], 1, 1.0, 2)["best_val_accuracy"]
    assert only_diverged != only_diverged  # nan: no best from a diverged trial


def test_a_minibatch_controller_sets_minibatch_trials_and_a_mismatch_is_refused(tmp_path):
    from qan_ray.protocol import Protocol, align_action_mode

    mb = fixed_action_controller(action=3, action_mode="minibatch").save(tmp_path / "mb")
    lr = fixed_action_controller(action=2).save(tmp_path / "lr")
    proto = Protocol(task_config={"task": "digits-mlp"}, policy=str(mb))
    assert align_action_mode(["qan"], proto) == "minibatch"
    assert proto.task_config["action_mode"] == "minibatch"  # the trials follow the controller
    proto = Protocol(task_config={"task": "digits-mlp", "action_mode": "minibatch"},
                     policy=str(lr))
    with pytest.raises(ValueError, match=r"`action_mode` is 'minibatch' but the controller was "
                                         r"trained with action_mode 'lr'"):
        align_action_mode(["qan", "fifo"], proto)


# --- a `qan train` process killed mid-commit, shared by the resume tests ----------------------
TRAIN = ("train", "--task", "digits-mlp", "--epochs-per-episode", "1", "--control-interval", "35",
         "--num-actors", "1", "--cpus-per-actor", "0.5", "--learning-starts", "4",
         "--q-hidden", "8")


def _killed_argv(root: Path) -> list[str]:
    return [sys.executable, "-m", "qan_ray.cli", *TRAIN, "--episodes", "20", "--out",
            str(root / "run")]


TUNE = ["tune", "--scheduler", "fifo", "--samples", "2", "--epochs", "2", "--max-concurrent", "1"]

BACKGROUND = {  # run once per test run, in the background (tests/background.py)
    # `qan train` ended by os._exit (no cleanup: what a SIGKILL leaves) right after the Parquet
    # part of its second commit, before that commit completed
    "killed_run": Job("killed-train", _killed_argv, {**ENV, "QAN_FAULT": "after-parquet:2"},
                      ROOT),
    # `qan tune` sent a real SIGTERM (as `ray job stop` sends) by itself at the experiment's
    # first result: handled as Ctrl-C (Tune's graceful stop), not an abort
    "interrupted_tune": Job("interrupted-tune",
                            lambda root: [sys.executable, "-m", "qan_ray.cli", *TUNE, "--out",
                                          str(root / "tune")],
                            {**ENV, "QAN_FAULT": "tune-result:1:sigterm"}, ROOT),
}


@pytest.fixture(scope="module")
def killed_run() -> tuple[Path, subprocess.CompletedProcess]:
    """The killed `qan train` run (its folder, its process); each test resumes its own copy."""
    root, proc = BACKGROUND["killed_run"].result()
    return root / "run", proc


@pytest.fixture(scope="module")
def interrupted_tune() -> tuple[Path, subprocess.CompletedProcess]:
    root, proc = BACKGROUND["interrupted_tune"].result()
    return root / "tune", proc


def _copy_of_killed_run(killed_run, dest: Path) -> tuple[Path, int, list[dict]]:
    """A copy of the killed run: its folder, the committed episodes, and the rows of the part
    the kill left uncommitted."""
    src, proc = killed_run
    assert proc.returncode == 86, proc.stderr[-2000:]  # os._exit at the fault point
    out = Path(shutil.copytree(src, dest))
    done = json.loads((out / "progress.json").read_text())["episodes"]
    parts = sorted(p.name for p in (out / "steps").glob("*.parquet"))
    assert done >= 1 and parts == ["part-c000000.parquet", "part-c000001.parquet"]
    cut = pq.read_table(out / "steps" / "part-c000001.parquet").to_pylist()
    assert cut and min(r["episode"] for r in cut) == done  # episodes beyond the commit
    return out, done, cut


def _resume_trainer(out: Path, log):
    """A MetaTrainer resumed as `qan train --out OUT --resume` does it (the run's config.json)."""
    from qan_ray.meta import MetaConfig, MetaTrainer

    saved = json.loads((out / "config.json").read_text())
    meta = MetaConfig(**{**saved["meta"], "hidden": tuple(saved["meta"]["hidden"])})
    return MetaTrainer(from_dict(saved["qan"]), meta, out, resume=True, log=log)


@pytest.fixture(scope="module")
def crashed_twice(ray_session, killed_run, tmp_path_factory):
    """The killed run resumed in process, then crashed again inside the checkpoint swap of its
    first commit. Yields the live trainer (its run folder in the crashed state) and what was seen;
    info["state"] is a copy of that state for the next resume."""
    from qan_ray import records
    from qan_ray.records import FaultInjected

    tmp = tmp_path_factory.mktemp("crash")
    out, done, cut = _copy_of_killed_run(killed_run, tmp / "run")
    lines: list[str] = []
    info: dict = {"out": out, "done": done, "cut": cut, "lines": lines}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(records, "_fault_passes", {})  # count the passes of this sequence only
        mt = _resume_trainer(out, lines.append)
        info["first_resume"] = mt.progress["episodes"]
        mp.setenv("QAN_FAULT", "swap-dir:1:raise")
        try:
            with pytest.raises(FaultInjected, match="swap-dir"):
                mt.train()
        except BaseException:
            mt.stop()
            raise
    try:
        info["crashed"] = mt.progress["episodes"]  # in memory: the commit the crash cut
        info["half_swapped"] = sorted(p.name for p in out.iterdir()
                                      if p.name.startswith("checkpoint"))
        info["cut_again"] = pq.read_table(out / "steps" / "part-c000001.parquet").to_pylist()
        info["state"] = Path(shutil.copytree(out, tmp / "state"))
        yield mt, info
    finally:
        mt.stop()


@pytest.mark.e2e
def test_a_killed_run_resumes_and_a_crash_in_its_checkpoint_swap_keeps_the_old_one(
        crashed_twice):
    """Two crashes in a row, at two steps of a commit: a killed process after its Parquet part
    (the resume drops the uncommitted part), then inside the checkpoint swap of the resumed run's
    first commit (checkpoint/ moved aside, the new one not yet in place). The resume after both
    is test_after_a_kill_and_a_crash_a_resume_is_exact_and_sigterm_on_train_... below."""
    mt, info = crashed_twice
    done = info["done"]
    # the resume: the committed state of the killed process, its uncommitted part dropped
    assert info["first_resume"] == done
    assert any("resume: dropped part-c000001.parquet (not committed" in line
               for line in info["lines"])
    assert mt.steps_per_episode == 1  # --control-interval 35: one control step
    # the 2nd crash cut the swap of the commit that wrote part-c000001 again
    assert info["crashed"] > done
    assert info["half_swapped"] == ["checkpoint.old", "checkpoint.tmp"]
    again = info["cut_again"]
    assert sorted({r["episode"] for r in again}) == list(range(done, info["crashed"]))
    # the episodes the kill lost ran again first, with the same global index and seed
    first = {(r["episode"], r["global_episode"], r["seed"]) for r in again}
    assert {(r["episode"], r["global_episode"], r["seed"]) for r in info["cut"]
            if r["episode"] < info["crashed"]} <= first


@pytest.mark.e2e
def test_a_run_whose_folder_disappears_stops_with_an_error(crashed_twice):
    mt, info = crashed_twice
    out = info["out"]
    shutil.rmtree(out)
    with pytest.raises(FileNotFoundError, match=r"disappeared during the run; it must stay "
                                                r"in place"):
        mt.train(until=info["crashed"] + 1)
    assert not out.exists()  # never silently recreated


def test_a_killed_trainer_actor_is_replaced_in_seconds_and_its_episode_flagged(ray_session):
    import numpy as np
    import ray

    from qan_ray.actors import ActorEnv, start_episode_counter

    counter = start_episode_counter("episodes-kill", [])  # kept alive by this handle
    env = ActorEnv({"qan": QAN.to_dict(), "resources": {"cpus_per_actor": 0.5}, "run": "kill",
                    "counter": "episodes-kill", "meta_seed": 0})
    env.reset()
    env.step(2)
    ray.kill(env._actor, no_restart=True)
    t0 = time.perf_counter()
    obs, reward, terminated, truncated, info = env.step(2)
    seconds = time.perf_counter() - t0
    print(f"\ntrainer actor replaced in {seconds:.2f}s (start {env.replace_seconds[0]:.2f}s)")
    assert truncated and not terminated and reward == 0.0
    assert info["actor_replaced"] and info["replacement"] == "trainer-kill-0-0-r1"
    assert env.replacements == 1
    assert seconds < 10.0
    assert len(env.finished) == 1 and len(env.finished[0]) == 2  # reset row + the one step
    cut = env.finished[0]
    assert all(r["truncated"] and r["global_episode"] == 0 for r in cut)
    env.reset()  # the next episode: a new index, never the cut one again
    assert (env.index, env.seed) == (1, 10_000_001)
    obs, reward, terminated, truncated, info = env.step(2)  # served by the replacement
    assert not truncated and info["step"] == 1 and np.isfinite(obs).all()
    env.close()
    ray.kill(counter)


# --- the CLI in a subprocess (signals, a fresh process) and in process (refusals, resumes) -------
def _wait_for(proc: subprocess.Popen, path: Path, what, timeout: float = 240) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout and proc.poll() is None:
        if path.exists() and what(path):
            return
        time.sleep(0.5)
    raise AssertionError(f"{path} never showed {what} (rc {proc.poll()})")


@pytest.mark.e2e
def test_after_a_kill_and_a_crash_a_resume_is_exact_and_sigterm_on_train_exports_the_controller(
        crashed_twice, tmp_path):
    """The run killed (os._exit: no cleanup) after the Parquet part of a commit, resumed, and
    crashed inside the checkpoint swap of its next commit: `qan train --resume` puts the old
    checkpoint back, drops the uncommitted part, trains every lost episode again with its seed,
    and is stopped with SIGTERM (what `ray job stop` and Kubernetes send; Ray's driver handler
    would abort) after committing them: handled as Ctrl-C."""
    from policies.qnet import load_controller
    from qan_ray.actors import episode_seed

    _, info = crashed_twice
    done, cut = info["done"], info["cut"] + info["cut_again"]
    lost = max(r["episode"] for r in cut) + 1  # every episode a crash cut
    out = Path(shutil.copytree(info["state"], tmp_path / "run"))
    proc = subprocess.Popen([sys.executable, "-m", "qan_ray.cli", *TRAIN, "--episodes", "20",
                             "--out", str(out), "--resume"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT)
    _wait_for(proc, out / "progress.json",
              lambda p: json.loads(p.read_text())["episodes"] >= lost)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-2000:]
    # the old checkpoint put back (no checkpoint/ otherwise), the part of the cut commit dropped
    assert f"resumed from {out / 'checkpoint'} at episode {done} " in stdout
    assert "resume: dropped part-c000001.parquet (not committed" in stdout
    assert f"Continue with: qan train --out {out} --resume" in stderr
    assert "Traceback" not in stderr
    # what the next --resume continues from: the committed episodes (the interrupt may cut a
    # commit; the recovery drops its part), exactly those of an uninterrupted run
    recovered, _ = _recover(out)
    n = len(recovered)
    assert n >= lost and recovered == list(range(n))
    assert load_controller(out).spec.provenance["episodes"] >= n  # exported at the interrupt
    table = read_parts(out / "steps")
    assert table.schema == STEP_SCHEMA
    rows = table.to_pylist()
    full = sorted({(r["episode"], r["global_episode"], r["seed"]) for r in rows})
    # an uninterrupted 1-actor run trains global episodes 0, 1, 2, ... with their seeds...
    assert full == [(i, i, episode_seed(0, i)) for i in range(n)]
    # ...and the episodes the crashes cut ran again with the same index and seed
    assert {(r["episode"], r["global_episode"], r["seed"]) for r in cut} <= set(full)
    assert len(rows) == n * 2  # reset row + 1 control step (35 batches) each, no duplicates


def test_outputs_and_controllers_are_checked_before_ray_starts(tmp_path, capsys, recwarn,
                                                               ray_must_not_start):
    from qan_ray.cli import main

    def qan_in_process(*args: str) -> tuple[int, str, str]:
        rc = main(list(args))
        out, err = capsys.readouterr()
        return rc, out, err

    ctrl = fixed_action_controller(action=2).save(tmp_path / "ctrl")
    (tmp_path / "file").write_text("x")
    rc, out, err = qan_in_process("evaluate", "--controller", str(ctrl), "--out",
                                  str(tmp_path / "file"))
    assert rc == 2 and "is a file; it must be a folder" in err
    assert "evaluating" not in out  # refused before any episode
    rc, _, err = qan_in_process("tune", "--policy", str(ctrl), "--out", str(tmp_path / "t"),
                                "--storage-path", str(tmp_path / "file" / "ray"))
    assert rc == 2 and "--storage-path is" in err
    rc, _, err = qan_in_process("tune", "--policy", str(ctrl), "--action-mode", "minibatch",
                                "--out", str(tmp_path / "t"))
    assert rc == 2 and "trained with action_mode 'lr'" in err
    (ctrl / "qnet.pt").write_bytes((ctrl / "qnet.pt").read_bytes()[:50])  # truncated
    rc, _, err = qan_in_process("compare", "--policy", str(ctrl), "--out", str(tmp_path / "c"))
    assert rc == 2 and "qnet.pt is not a readable controller" in err
    assert "weights_only=False" not in err
    assert not [w for w in recwarn if "weights_only" in str(w.message)]
    assert not (tmp_path / "c" / "ray").exists()  # no Ray experiment was started


@pytest.mark.e2e
def test_interrupted_tune_exits_non_zero_and_resumes_to_the_full_budget(interrupted_tune,
                                                                        ray_session, capsys):
    from qan_ray.cli import main
    from qan_ray.protocol import read_rows
    from qan_ray.summaries import trial_table

    out, stopped = interrupted_tune  # SIGTERM at the first of 2 trials x 2 epochs
    assert stopped.returncode == 130, stopped.stderr[-2000:]
    assert "interrupted" in stopped.stderr and "--resume" in stopped.stderr
    assert "best val acc" not in stopped.stdout
    rows = out / "experiments" / "fifo-s0" / "rows.jsonl"
    assert 1 <= len(read_rows(rows)) < 4  # stopped inside the experiment
    assert main([*TUNE, "--out", str(out), "--resume"]) == 0  # in process, on the session's Ray
    printed = capsys.readouterr().out
    # the full budget (2 trials x 2 epochs); an epoch cut by the interrupt is redone and counted
    total = re.search(r"(\d+) epochs in total", printed)
    assert total is not None and int(total.group(1)) in (4, 5), printed[-2000:]
    assert len(trial_table(read_rows(rows))) == 2


# The interrupted `qan compare` (no mixed table, finished runs reused) is
# tests/test_compare_cli.py::test_interrupted_compare_writes_no_table_then_reuses_and_writes_it.


def test_sigterm_during_evaluate_exits_130_and_leaves_no_output_folder(tmp_path, capsys,
                                                                       monkeypatch):
    """SIGTERM at a known point of `qan evaluate` (after its first controller episode), in this
    process: the same message and exit status as Ctrl-C, and the new --out folder is gone."""
    from qan_ray.cli import main

    ctrl = fixed_action_controller(action=2).save(tmp_path / "ctrl")
    monkeypatch.setenv("QAN_FAULT", "evaluate-episode:1:sigterm")
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGINT, lambda *_: None)  # e.g. Tune's graceful-stop handler, left over
    try:
        rc = main(["evaluate", "--controller", str(ctrl), "--seeds", "2", "--epochs-per-episode",
                   "0.5", "--out", str(tmp_path / "e")])
        assert signal.getsignal(signal.SIGTERM) is previous[signal.SIGTERM]  # put back
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    err = capsys.readouterr().err
    assert rc == 130 and "qan evaluate: interrupted before the results were written" in err
    assert "Run the same command again." in err and not (tmp_path / "e").exists()
