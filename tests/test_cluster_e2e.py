"""End-to-end tests on a real two-node Ray cluster started on this machine (`pytest -m e2e`).

A module-scoped fixture starts two `ray start --block` processes, each in its own process group
and its own `--temp-dir` (never `/tmp/ray`, which the other Ray instances here use):

  head    --num-cpus=1 --num-gpus=0, dashboard + job API on http://127.0.0.1:<free port>
  worker  --num-cpus=2 --num-gpus=1 --resources='{"trainer_node": 2}'  (a *declared* GPU)

Every port a node would otherwise take at a fixed default (GCS 6379, dashboard 8265, client
server 10001, dashboard agent 52365) is a free one picked here, so the cluster never collides
with another engineer's Ray. `ray stop` is never used: it stops every Ray on the machine,
including the test session's own `ray_session`. Nodes are stopped by signalling their process
groups, with `RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0` (otherwise each node waits up to 30 s
trying to drain through a GCS that is already gone). Every process of the cluster inherits a
marker environment variable; teardown kills any that outlive their group and fails if it had to.

The pytest process is already connected to the session Ray and cannot join a second cluster, so
the placement checks run in a driver subprocess, and the job is submitted with
`cluster/submit.sh` (the documented path) and watched over HTTP with `JobSubmissionClient`.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
SUBMIT = REPO / "cluster" / "submit.sh"
BIN = Path(sys.executable).parent  # the venv of this test run: its `ray`, `python`, `qan`
MARK_VAR = "QAN_E2E_CLUSTER"
HAS_CUDA = torch.cuda.is_available()

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs Linux /proc"),
    pytest.mark.skipif(not (BIN / "ray").exists(), reason=f"no `ray` CLI in {BIN}"),
]


# --- the cluster -----------------------------------------------------------------------------


@dataclass
class Cluster:
    root: Path
    env: dict[str, str]
    mark: str
    gcs_address: str
    dashboard_url: str
    nodes: dict[str, subprocess.Popen]


def _free_ports(n: int) -> list[int]:
    """n distinct ports free on all interfaces right now (Ray binds 0.0.0.0)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _node_env(mark: str) -> dict[str, str]:
    """The parent environment without Ray/qan settings (no RAY_ADDRESS from the caller's shell),
    plus what a test cluster needs."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "QAN_"))}
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        RAY_AUTH_MODE="disabled",
        RAY_USAGE_STATS_ENABLED="0",
        RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",
        PYTHONUNBUFFERED="1",
        **{MARK_VAR: mark},
    )
    return env


def _tail(path: Path, chars: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError as err:
        return f"({path}: {err})"


def _start_node(name: str, args: list[str], root: Path, env: dict[str, str]) -> subprocess.Popen:
    temp_dir = root / name
    temp_dir.mkdir()
    log_path = root / f"{name}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [str(BIN / "ray"), "start", *args, f"--temp-dir={temp_dir}", "--block"],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=root,
            start_new_session=True,  # its own process group: stopped with os.killpg
        )
    return proc


def _wait_started(name: str, proc: subprocess.Popen, root: Path, timeout: float = 120) -> str:
    """GCS address from <temp-dir>/ray_current_cluster, written once the node is up."""
    marker = root / name / "ray_current_cluster"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"`ray start` ({name}) exited {proc.returncode}:\n"
                               f"{_tail(root / f'{name}.log')}")
        if marker.exists() and marker.read_text().strip():
            return marker.read_text().strip()
        time.sleep(0.25)
    raise TimeoutError(f"{name} node not up after {timeout}s:\n{_tail(root / f'{name}.log')}")


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def _stop_groups(procs: list[subprocess.Popen], timeout: float = 20) -> None:
    """SIGTERM every node's process group at once, SIGKILL what is left after `timeout`."""
    pgids = [proc.pid for proc in procs]  # start_new_session: the leader's pid is the group id
    for pgid in pgids:
        if _group_alive(pgid):
            os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(
            proc.poll() is None or _group_alive(proc.pid) for proc in procs):
        time.sleep(0.1)
    for pgid in pgids:
        if _group_alive(pgid):
            os.killpg(pgid, signal.SIGKILL)
    for proc in procs:
        proc.wait(timeout=10)


def _marked_pids(mark: str) -> list[int]:
    """Live processes whose environment carries this cluster's marker."""
    needle = f"{MARK_VAR}={mark}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if needle in environ.split(b"\0"):
            pids.append(int(entry.name))
    return pids


def _describe(pids: list[int]) -> str:
    lines = []
    for pid in pids:
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            cmd = "?"
        lines.append(f"  {pid}: {cmd[:160]}")
    return "\n".join(lines)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    # A short root: Ray's Unix sockets live under <temp-dir>/session_<time>_<pid>/sockets/ and
    # AF_UNIX paths are capped at 107 bytes, too tight under pytest's tmp_path.
    root = Path(tempfile.mkdtemp(prefix="qan-e2e-", dir="/tmp"))
    mark = uuid.uuid4().hex
    env = _node_env(mark)
    gcs, dash, client, head_agent, worker_agent = _free_ports(5)
    nodes: dict[str, subprocess.Popen] = {}
    try:
        nodes["head"] = _start_node("head", [
            "--head", "--num-cpus=1", "--num-gpus=0", f"--port={gcs}",
            "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
            f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={head_agent}",
            "--object-store-memory=134217728", "--disable-usage-stats",
        ], root, env)
        gcs_address = _wait_started("head", nodes["head"], root)
        nodes["worker"] = _start_node("worker", [
            f"--address={gcs_address}", "--num-cpus=2", "--num-gpus=1",
            '--resources={"trainer_node": 2}', f"--dashboard-agent-listen-port={worker_agent}",
            "--object-store-memory=134217728", "--disable-usage-stats",
        ], root, env)
        assert _wait_started("worker", nodes["worker"], root) == gcs_address
        yield Cluster(root, env, mark, gcs_address, f"http://127.0.0.1:{dash}", nodes)
    finally:
        _stop_groups(list(nodes.values()))
        deadline = time.monotonic() + 15  # e.g. workers noticing their raylet is gone
        while (left := _marked_pids(mark)) and time.monotonic() < deadline:
            time.sleep(0.5)
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(root, ignore_errors=True)
        if left:
            pytest.fail(f"Ray processes outlived their process groups (SIGKILLed):\n"
                        f"{_describe(left)}")


# --- 1. placement ----------------------------------------------------------------------------

PLACEMENT_DRIVER = """
import json, sys, time
import ray
from qan_ray.actors import ActorResources, start_trainer_actor

t0 = time.monotonic()
ray.init(address=sys.argv[1], log_to_driver=False)
deadline = time.monotonic() + 60
while len(nodes := [n for n in ray.nodes() if n["Alive"]]) < 2 and time.monotonic() < deadline:
    time.sleep(0.5)
specs = {
    "gpu_a": ActorResources(cpus_per_actor=0.5, gpus_per_actor=0.5),
    "gpu_b": ActorResources(cpus_per_actor=0.5, gpus_per_actor=0.5),
    "cpu_pinned": ActorResources(cpus_per_actor=0.5, resources={"trainer_node": 1}),
}
actors = {k: start_trainer_actor({"task": "digits-mlp"}, r.validate()) for k, r in specs.items()}
t1 = time.monotonic()
locations = ray.get([a.location.remote() for a in actors.values()], timeout=240)
t2 = time.monotonic()
for _ in range(50):  # the resource view trails the scheduler a little
    gpu_left = ray.available_resources().get("GPU", 0.0)
    if gpu_left == 0:
        break
    time.sleep(0.2)
print("QAN_E2E_RESULT " + json.dumps({
    "nodes": [{"id": n["NodeID"], "resources": n["Resources"]} for n in nodes],
    "cluster": ray.cluster_resources(), "gpu_left": gpu_left,
    "locations": dict(zip(actors, locations)),
    "seconds": {"connect": round(t1 - t0, 1), "actors": round(t2 - t1, 1)}}))
"""


def _result_line(text: str, prefix: str) -> dict:
    lines = [line for line in text.splitlines() if line.startswith(prefix + " ")]
    assert lines, f"no {prefix} line in:\n{text[-4000:]}"
    return json.loads(lines[-1][len(prefix) + 1 :])


def test_trainer_actors_land_on_gpu_node_and_share_its_declared_gpu(cluster: Cluster) -> None:
    proc = subprocess.run(
        [str(BIN / "python"), "-c", PLACEMENT_DRIVER, cluster.gcs_address],
        capture_output=True, text=True, env=cluster.env, cwd=REPO, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = _result_line(proc.stdout, "QAN_E2E_RESULT")
    print("placement driver seconds:", out["seconds"])

    (head,) = [n for n in out["nodes"] if "node:__internal_head__" in n["resources"]]
    (worker,) = [n for n in out["nodes"] if n is not head]
    assert head["resources"]["CPU"] == 1 and "GPU" not in head["resources"]
    assert {k: worker["resources"][k] for k in ("CPU", "GPU", "trainer_node")} == {
        "CPU": 2, "GPU": 1, "trainer_node": 2}
    assert {k: out["cluster"][k] for k in ("CPU", "GPU", "trainer_node")} == {
        "CPU": 3, "GPU": 1, "trainer_node": 2}
    loc = out["locations"]

    # Two 0.5-GPU actors: both on the worker, in two processes, sharing GPU id 0 -- and the
    # two halves use up the one declared GPU.
    for name in ("gpu_a", "gpu_b"):
        assert loc[name]["node_id"] == worker["id"], name
        assert loc[name]["gpu_ids"] == ["0"], name
        assert loc[name]["resources"] == {"CPU": 0.5, "GPU": 0.5}, name
        # A declared GPU resource is not a usable GPU: the actor asks torch, not Ray.
        assert loc[name]["cuda_available"] is HAS_CUDA, name
        assert loc[name]["device"].startswith("cuda" if HAS_CUDA else "cpu"), name
        if not HAS_CUDA:  # this CPU-only machine
            assert (loc[name]["cuda_available"], loc[name]["device"]) == (False, "cpu")
    assert loc["gpu_a"]["pid"] != loc["gpu_b"]["pid"]
    assert out["gpu_left"] == 0

    # A CPU-only actor is still placed, here on the GPU node beside the two GPU actors because
    # it asks for the worker's custom resource (ActorResources.resources), and gets no GPU id.
    # (The job test's trainer is a CPU-only actor without custom resources: placed anywhere.)
    assert loc["cpu_pinned"]["node_id"] == worker["id"]
    assert loc["cpu_pinned"]["resources"] == {"CPU": 0.5, "trainer_node": 1}
    assert loc["cpu_pinned"]["gpu_ids"] == []
    if not HAS_CUDA:
        assert loc["cpu_pinned"]["device"] == "cpu"


# --- 2. job submission -----------------------------------------------------------------------

# Runs as a second job on the train job's uploaded package: what does the job see?
JOB_PROBE = """
import json, os, shutil, sys
from pathlib import Path
import qan_ray.meta
cwd = Path.cwd()
files = [p for p in cwd.rglob("*") if p.is_file()]
print("QAN_E2E_PROBE " + json.dumps({
    "python": shutil.which("python"), "qan": shutil.which("qan"), "executable": sys.executable,
    "cwd": str(cwd), "qan_ray_meta": qan_ray.meta.__file__,
    "pythonpath": os.environ.get("PYTHONPATH", "").split(os.pathsep),
    "top": sorted(p.name for p in cwd.iterdir()),
    "bytes": sum(p.stat().st_size for p in files)}))
"""
TRAIN_ARGS = ["train", "--task", "digits-mlp", "--episodes", "2", "--num-actors", "1",
              "--cpus-per-actor", "0.5", "--epochs-per-episode", "1", "--learning-starts", "4"]
NEVER_UPLOADED = {".git", ".venv", "runs", "data", ".pytest_cache", ".ruff_cache",
                  "qan_ray.egg-info", "__pycache__"}


def _wait_job(client, submission_id: str, timeout: float):
    deadline = time.monotonic() + timeout
    while not (status := client.get_job_status(submission_id)).is_terminal():
        if time.monotonic() > deadline:
            break
        time.sleep(0.5)
    return status


def _job_succeeded(client, submission_id: str, timeout: float) -> str:
    """The job's logs, once it has SUCCEEDED (fails the test with the logs otherwise)."""
    from ray.job_submission import JobStatus

    status = _wait_job(client, submission_id, timeout)
    logs = client.get_job_logs(submission_id)
    if status != JobStatus.SUCCEEDED:
        info = client.get_job_info(submission_id)
        pytest.fail(f"job {submission_id} is {status} after up to {timeout}s "
                    f"({info.message}); logs:\n{logs[-6000:]}")
    return logs


def test_submit_sh_runs_qan_train_as_a_ray_job(cluster: Cluster, tmp_path: Path) -> None:
    from ray.job_submission import JobSubmissionClient

    from policies.qnet import load_controller
    from qan_ray.records import read_parts

    submission_id = f"qan-e2e-train-{cluster.mark[:8]}"
    results = tmp_path / "results"
    out = results / "train" / submission_id
    env = {**cluster.env, "RAY_ADDRESS": cluster.dashboard_url, "QAN_RESULTS": str(results),
           "QAN_SUBMISSION_ID": submission_id}
    proc = subprocess.run(["bash", str(SUBMIT), *TRAIN_ARGS], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"submission id: {submission_id}" in proc.stdout
    assert f"results:       {out}" in proc.stdout

    client = JobSubmissionClient(cluster.dashboard_url)
    probe_id = f"{submission_id}-probe"
    try:
        info = client.get_job_info(submission_id)
        assert info.entrypoint == shlex.join(["qan", *TRAIN_ARGS, "--out", str(out)])
        assert info.runtime_env["working_dir"].startswith("gcs://_ray_pkg_")
        assert info.runtime_env["env_vars"] == {"PYTHONUNBUFFERED": "1"}
        # Same runtime env, so the same uploaded package (no second upload): a bare `python`.
        client.submit_job(entrypoint=shlex.join(["python", "-c", JOB_PROBE]),
                          runtime_env=info.runtime_env, submission_id=probe_id)
        probe = _result_line(_job_succeeded(client, probe_id, 120), "QAN_E2E_PROBE")
        logs = _job_succeeded(client, submission_id, 240)
    finally:
        for job in (submission_id, probe_id):
            try:
                if not client.get_job_status(job).is_terminal():
                    client.stop_job(job)
            except Exception:  # noqa: BLE001 - best effort; teardown kills the cluster anyway
                pass

    # The job's `python` and `qan` are this venv's (the nodes' PATH), and it imports qan_ray
    # from the unpacked working dir under the head's temp dir, not from this checkout.
    assert os.path.samefile(probe["python"], BIN / "python")
    assert os.path.samefile(probe["executable"], sys.executable)
    assert os.path.samefile(probe["qan"], BIN / "qan")
    job_dir = Path(probe["cwd"])
    assert job_dir.is_relative_to(cluster.root / "head") and "_ray_pkg_" in job_dir.name
    assert Path(probe["qan_ray_meta"]) == job_dir / "qan_ray" / "meta.py"
    # ... also for the `qan` console script (whose sys.path[0] is the venv's bin/): Ray puts the
    # working dir on PYTHONPATH, ahead of this checkout's editable install.
    assert str(job_dir) in probe["pythonpath"]
    assert {"qan_ray", "policies", "cluster", "tests", "pyproject.toml"} <= set(probe["top"])
    assert not NEVER_UPLOADED & set(probe["top"])
    assert probe["bytes"] < 10 * 1024**2  # the limit is 512 MiB (Ray's gRPC message size)

    assert "meta-training: 2 episodes" in logs
    assert "episode    2/2" in logs

    progress = json.loads((out / "progress.json").read_text())
    assert progress["episodes"] >= 2
    assert progress["run"] == submission_id

    controller = load_controller(out / "controller")
    spec = controller.spec
    assert spec.provenance["episodes"] == progress["episodes"]
    assert spec.task["task"] == "digits-mlp" and spec.task["epochs_per_episode"] == 1
    meta = spec.provenance["meta"]
    assert {k: meta[k] for k in ("episodes", "num_actors", "cpus_per_actor", "gpus_per_actor",
                                 "learning_starts")} == {
        "episodes": 2, "num_actors": 1, "cpus_per_actor": 0.5, "gpus_per_actor": 0,
        "learning_starts": 4}
    state = torch.load(out / "controller" / "qnet.pt", weights_only=True)
    assert all(torch.isfinite(t).all() for t in state.values())
    q = controller.net(torch.zeros(spec.obs_size))
    assert q.shape == (spec.num_actions,) == (len(spec.action.labels),)

    parts = sorted((out / "steps").glob("part-*.parquet"))
    assert parts
    steps = read_parts(out / "steps").to_pylist()
    assert {r["episode"] for r in steps} == set(range(progress["episodes"]))
    assert {r["run"] for r in steps} == {submission_id}
    assert all(r["lr"] > 0 for r in steps)


# --- 3. what the working-dir upload leaves out (no cluster needed) ---------------------------


def _submit_sh_runtime_env() -> dict:
    proc = subprocess.run(
        ["bash", str(SUBMIT), "train", "--task", "digits-mlp"], capture_output=True, text=True,
        env={**_node_env("dry-run"), "QAN_DRY_RUN": "1", "QAN_SUBMISSION_ID": "x"}, timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    argv = shlex.split(proc.stdout)
    return json.loads(argv[argv.index("--runtime-env-json") + 1])


@pytest.mark.parametrize("gitignore", [True, False], ids=["with-gitignore", "excludes-only"])
def test_submit_sh_working_dir_package_leaves_out_venv_git_runs_data(
    tmp_path: Path, gitignore: bool
) -> None:
    """Ray's own packager (what `ray job submit --working-dir` runs) on a tree that has every
    heavy directory; submit.sh's excludes alone are enough, .gitignore drops the caches too."""
    from ray._private.runtime_env.packaging import create_package

    excludes = _submit_sh_runtime_env()["excludes"]
    tree = tmp_path / "repo"
    kept = ["pyproject.toml", "qan_ray/meta.py", "qan_ray/data.py", "cluster/submit.sh",
            "tests/test_runs.py"]
    heavy = [".venv/bin/python", ".git/HEAD", "runs/demo/progress.json",
             "data/MNIST/raw/train-images-idx3-ubyte"]
    cached = [".pytest_cache/v/x", "qan_ray.egg-info/PKG-INFO", "qan_ray/__pycache__/x.pyc"]
    for rel in kept + heavy + cached:
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        (tree / rel).write_text(rel)
    if gitignore:
        shutil.copy(REPO / ".gitignore", tree / ".gitignore")

    create_package(str(tree), tmp_path / "pkg.zip", include_gitignore=gitignore,
                   excludes=excludes)
    with zipfile.ZipFile(tmp_path / "pkg.zip") as z:
        files = {n for n in z.namelist() if not n.endswith("/")}

    assert files == set(kept) | ({".gitignore"} if gitignore else set(cached))
