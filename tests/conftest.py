from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(1)

import background  # noqa: E402

from qan_ray.formats import write_cifar10, write_mnist  # noqa: E402


def pytest_collection_modifyitems(config, items) -> None:
    """Tiers: every test that uses the Ray session (directly or through another fixture) is
    marked `ray`, so `make test-fast` (-m "not ray and not e2e") never starts Ray. Tests that run
    the CLI or a Ray job in a subprocess carry `e2e` in their module."""
    for item in items:
        if "ray_session" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.ray)


def pytest_collection_finish(session) -> None:
    """Background jobs (tests/background.py): a test module's `BACKGROUND = {fixture: Job}`;
    the jobs whose fixture a selected test uses start now, one at a time, in test order."""
    if session.config.option.collectonly:
        return
    queued: list = []
    for item in session.items:
        jobs = getattr(getattr(item, "module", None), "BACKGROUND", {})
        queued += [job for name, job in jobs.items()
                   if name in item.fixturenames and job not in queued]
    _BACKGROUND_JOBS.extend(queued)
    if queued:
        factory = getattr(session.config, "_tmp_path_factory", None)  # pytest's tmp_path_factory
        background.Job.base = factory.mktemp("background") if factory is not None else None
    background.start(queued)


_BACKGROUND_JOBS: list = []


def pytest_sessionfinish(session, exitstatus) -> None:
    while _BACKGROUND_JOBS:
        _BACKGROUND_JOBS.pop().stop()


def _ray_starts() -> int:
    """Ray instances this process has started so far (each leaves a session_*_<pid> folder)."""
    tmp = os.environ.get("RAY_TMPDIR") or (os.environ.get("TMPDIR") if sys.platform == "linux"
                                           else None) or "/tmp"  # Ray's own rule
    root = Path(tmp) / "ray"
    return len(list(root.glob(f"session_*_{os.getpid()}")))


@pytest.fixture(autouse=True)
def _one_ray_session(request):
    """Ray starts once per test run, in the `ray_session` fixture (each start costs seconds):
    - a test outside the `ray` and `e2e` tiers that starts Ray fails: mark it (or use the
      `ray_session` fixture) so the fast tier stays fast;
    - a test that starts a Ray instance of its own in this process (even one it shuts down
      again) fails: use `ray_session`, or run the command in a subprocess;
    - a test that shuts the session's Ray down fails (the next one would start another)."""
    starts = _ray_starts()
    yield
    node = request.node
    ray = sys.modules.get("ray")
    if "ray_session" in getattr(node, "fixturenames", ()):
        if not (ray is not None and ray.is_initialized()):
            pytest.fail(f"{node.nodeid} shut down the session's Ray; leave it running (the "
                        "`ray_session` fixture ends it after the last test).")
    if _ray_starts() == starts:
        return
    if not (node.get_closest_marker("ray") or node.get_closest_marker("e2e")):
        pytest.fail(f"{node.nodeid} started Ray but is not marked `ray`; use the "
                    "`ray_session` fixture (conftest.py marks its users) or @pytest.mark.ray.")
    pytest.fail(f"{node.nodeid} started a Ray instance of its own; use the `ray_session` "
                "fixture (one Ray per test run), or run the command in a subprocess.")


@pytest.fixture
def ray_must_not_start(monkeypatch):
    """For a command run in process (`qan_ray.cli.main`) that must refuse before any Ray work:
    starting Ray, or using a running instance (the session's), fails the test."""
    import ray

    def refuse(*args, **kwargs):
        raise AssertionError("the command started Ray; it must refuse before any Ray work")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", refuse)


@pytest.fixture(scope="session")
def mnist_root(tmp_path_factory) -> Path:
    return write_mnist(tmp_path_factory.mktemp("mnist"))


@pytest.fixture(scope="session")
def cifar_root(tmp_path_factory) -> Path:
    return write_cifar10(tmp_path_factory.mktemp("cifar"))


@pytest.fixture(scope="session")
def ray_session():
    """One Ray instance for the whole test session (never per test)."""
    import ray

    if not ray.is_initialized():
        # Ray workers inherit the environment of the local instance: with tests/ on their
        # PYTHONPATH they import the user-task example (`--task user_task_example:make_task`).
        here = str(Path(__file__).parent)
        os.environ["PYTHONPATH"] = os.pathsep.join(
            p for p in (here, os.environ.get("PYTHONPATH")) if p)
        # address="local": always a fresh instance of our own, never a `ray start` head that an
        # end-to-end test (or a developer) left running on this machine.
        ray.init(address="local", num_cpus=2, num_gpus=0, include_dashboard=False,
                 object_store_memory=256 * 1024**2, log_to_driver=False, namespace="qan")
    yield ray
    ray.shutdown()
