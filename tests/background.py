"""Slow subprocesses whose results tests only read, run in the background.

A test module lists them as `BACKGROUND = {"fixture_name": Job(...)}`. Once the tests are
collected, conftest.py queues the jobs whose fixture a selected test uses, in the order the tests
run, and one background thread runs them one after the other (this machine has 2 cores: the test
process and one job), so that they overlap the tests that run before the ones that need them. The
module's fixture calls `job.result()`, which runs the job itself if nothing queued it, and waits.
When the session ends, conftest.py stops every job (a running one's process group is killed) and
removes its folder.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path


class Job:
    """One subprocess: `argv(root)` builds its command line in its own new folder `root` (and
    may write inputs there); stdout and stderr go to files in `root`."""

    base: Path | None = None
    """Where the jobs' folders go (conftest.py: under pytest's basetemp); None: the system's."""

    def __init__(self, name: str, argv: Callable[[Path], list[str]], env: dict[str, str],
                 cwd: Path, timeout: float = 400):
        self.name, self._argv, self._env, self._cwd, self._timeout = (name, argv, env, cwd,
                                                                       timeout)
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._state = "new"  # -> running -> done, or stopped
        self._proc: subprocess.Popen | None = None
        self._root: Path | None = None
        self._outcome: subprocess.CompletedProcess | BaseException | None = None

    def run(self) -> None:
        """Run the job to its end; a no-op if it was started (or stopped) already."""
        with self._lock:
            if self._state != "new":
                return
            self._state = "running"
            self._root = Path(tempfile.mkdtemp(prefix=f"{self.name}-", dir=Job.base))
        try:
            argv = self._argv(self._root)
            with open(self._root / "stdout", "w") as out, open(self._root / "stderr", "w") as err:
                with self._lock:
                    if self._state == "stopped":
                        return
                    self._proc = subprocess.Popen(argv, stdout=out, stderr=err,
                                                  stdin=subprocess.DEVNULL, env=self._env,
                                                  cwd=self._cwd, start_new_session=True)
            try:
                rc = self._proc.wait(timeout=self._timeout)
            except subprocess.TimeoutExpired:
                self._kill()
                raise TimeoutError(f"background job {self.name} ran over {self._timeout}s: "
                                   f"{argv}") from None
            self._outcome = subprocess.CompletedProcess(
                argv, rc, (self._root / "stdout").read_text(), (self._root / "stderr").read_text())
        except BaseException as err:  # noqa: BLE001 - handed to the test that waits for it
            self._outcome = err
        finally:
            with self._lock:
                if self._state == "running":
                    self._state = "done"
            self._done.set()

    def result(self) -> tuple[Path, subprocess.CompletedProcess]:
        """The job's folder and its finished process (runs it now if nothing queued it)."""
        self.run()
        if not self._done.wait(3600):  # each job before it in the queue has its own timeout
            raise TimeoutError(f"background job {self.name} did not finish")
        if isinstance(self._outcome, BaseException):
            raise RuntimeError(f"background job {self.name} failed") from self._outcome
        if self._outcome is None:
            raise RuntimeError(f"background job {self.name} was stopped before it finished")
        return self._root, self._outcome

    def _kill(self) -> None:
        proc = self._proc
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # start_new_session: its own group
            except ProcessLookupError:
                pass
            proc.wait(timeout=30)

    def stop(self) -> None:
        """Kill the job if it still runs and remove its folder."""
        with self._lock:
            running = self._state == "running"
            self._state = "stopped"
        if running:
            self._kill()
            self._done.wait(60)
        if self._root is not None:
            shutil.rmtree(self._root, ignore_errors=True)


def start(jobs: Sequence[Job]) -> None:
    """Run `jobs` one after the other in a background thread."""
    if jobs:
        threading.Thread(target=lambda: [job.run() for job in jobs], name="qan-background",
                         daemon=True).start()
