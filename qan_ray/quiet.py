"""Known noise of RLlib and Ray on a normal `qan train` run, dropped where it is emitted.

Each entry is one message that is not a problem for this project, with the reason. Nothing else
is touched: another warning from the same logger, any other deprecation and every other line of
Ray's C++ core still reach the terminal (tests/test_quiet.py checks both directions).

- RLlib's "You are running DQN on the new API stack!": the new stack is what we use on purpose.
- RLlib's own `RLModule(config=[RLModuleConfig object])` deprecation: RLlib 2.60 builds that
  object itself inside `RLModule.__init__`; no call of ours passes a config.
- Tune's "Trainable.setup took N seconds ... consider reuse_actors=True": the RLlib Algorithm is
  a Trainable that starts the trainer actors in its setup, so it is slow by design, and it runs
  outside Tune, where reuse_actors does not apply.
- Tune's "Install gputil for GPU system monitoring": optional system monitoring we do not use.
- Ray core's (C++, logged at ERROR once per process) "Actor ... has constructor arguments in the
  object store and max_restarts > 0" (ray-project/ray#53727): RLlib passes its EnvRunners the
  algorithm config by ObjectRef and lets Ray restart them. The driver owns that ref for the
  whole run, so it can be lost only with the driver's node, which ends the run anyway.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading

LOG_NOISE: dict[str, tuple[str, ...]] = {
    "ray.rllib.algorithms.algorithm_config": (
        "on the new API stack! This is the new default behavior",),
    "ray._common.deprecation": (
        "`RLModule(config=[RLModuleConfig object])` has been deprecated",),
    "ray.tune.trainable.trainable": ("Trainable.setup took",),
    "ray.tune.utils.util": ("Install gputil for GPU system monitoring",),
}
"""logger name -> message fragments that are noise (the loggers Ray's messages come from)."""
CORE_NOISE: tuple[str, ...] = (
    "has constructor arguments in the object store and max_restarts > 0",)
"""Fragments of Ray core (C++) lines, written straight to file descriptor 2, that are noise."""


def is_noise(line: str, logger: str | None = None) -> bool:
    """Whether `line` is one of the known noise messages (of `logger`, if given)."""
    if logger is not None:
        return any(f in line for f in LOG_NOISE.get(logger, ()))
    return any(f in line for fragments in LOG_NOISE.values() for f in fragments) or any(
        f in line for f in CORE_NOISE)


class NoiseFilter(logging.Filter):
    """Drops the known noise messages of the logger it is attached to."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not is_noise(record.getMessage(), record.name)


def install_log_filters() -> None:
    """Attach a NoiseFilter to each logger of LOG_NOISE (idempotent). A logger's filter sees only
    the records logged to that very logger, so nothing else is filtered."""
    for name in LOG_NOISE:
        logger = logging.getLogger(name)
        if not any(isinstance(f, NoiseFilter) for f in logger.filters):
            logger.addFilter(NoiseFilter())


@contextlib.contextmanager
def filtered_stderr(fd: int = 2):
    """Within the block, lines written to file descriptor `fd` (Ray core's C++ logging writes
    there directly) pass through a pipe and reach the real stderr unless they are CORE_NOISE.
    Keep the block free of subprocess starts: a child would inherit the pipe."""
    try:
        saved = os.dup(fd)
    except OSError:  # no stderr at all: nothing to filter
        yield
        return
    sys.stderr.flush()
    read_end, write_end = os.pipe()
    os.dup2(write_end, fd)
    os.close(write_end)

    def pump() -> None:
        with os.fdopen(read_end, "rb") as pipe:
            for raw in pipe:
                try:
                    if any(f in raw.decode(errors="replace") for f in CORE_NOISE):
                        continue
                    os.write(saved, raw)
                except OSError:  # the real stderr went away: drop the line
                    pass

    thread = threading.Thread(target=pump, name="qan-stderr-filter", daemon=True)
    thread.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, fd)  # closes the pipe's last write end: the pump reads EOF and ends
        thread.join(timeout=10)
        if not thread.is_alive():
            os.close(saved)


@contextlib.contextmanager
def quiet_rllib():
    """Scope for building or restoring an RLlib Algorithm: the known noise is dropped."""
    install_log_filters()
    with filtered_stderr():
        yield
