"""SIGTERM handled like Ctrl-C (SIGINT) by every long-running command.

`ray job stop`, a Kubernetes pod's termination and most process managers send SIGTERM. Python
ends a process on SIGTERM without running any cleanup, and `ray.init()` in a driver replaces the
SIGTERM handler with its own, which aborts the process (exit 134): a command that started Ray
must install its handler after `ray.init`. `sigterm_as_sigint()` makes SIGTERM raise SIGINT, so
whatever handles Ctrl-C at that moment (Python's KeyboardInterrupt, Tune's graceful stop,
`qan train`'s export) handles both; the commands then exit with status 130 (the README's fault
table)."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator


def sigterm_as_sigint() -> bool:
    """From now on SIGTERM acts as SIGINT in this process. Main thread only (where signal
    handlers live); returns whether it was installed. Call it after `ray.init`."""
    if threading.current_thread() is not threading.main_thread():
        return False
    signal.signal(signal.SIGTERM, _forward)
    return True


@contextlib.contextmanager
def keyboard_interrupts() -> Iterator[None]:
    """Inside: SIGINT raises KeyboardInterrupt (whatever handler a library left installed, e.g.
    Tune's graceful stop) and SIGTERM acts as SIGINT; the previous handlers come back after.
    Main thread only (elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sigterm_as_sigint()
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _forward(signum, frame) -> None:
    signal.raise_signal(signal.SIGINT)
