"""Static checks of cluster/: `ray up` YAMLs, KubeRay manifests, cluster/submit.sh, the image.

No Ray session and no cloud: the `ray up` files go through Ray's own offline validator
(`prepare_config` fills in the provider's defaults.yaml shipped with Ray, `validate_config`
checks ray-schema.json and the node-type bounds). The KubeRay manifests are validated against
KubeRay v1.7.0's RayJob CRD schema (vendored under tests/schemas/, Apache-2.0), and the RayJob's
submitter script is composed as KubeRay v1.7.0 composes it and run with stub `ray`/`qan`
commands, to see where each `qan` call runs. submit.sh is run in a subprocess (usage errors,
dry run). The Dockerfile is checked against the Ray pin in pyproject.toml.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import re
import shlex
import subprocess
from pathlib import Path
from typing import Any, NamedTuple

import jsonschema
import pytest
import ray
import yaml
from packaging.requirements import Requirement
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "cluster"
RAY_UP_FILES = ["aws.yaml", "gcp.yaml", "onprem.yaml"]
CLOUD_FILES = ["aws.yaml", "gcp.yaml"]
KUBERAY_FILES = ["raycluster.yaml", "rayjob.yaml"]
RAY_IMAGE = "rayproject/ray:2.60.0-py311-gpu"
# The image built from the Dockerfile; YOUR-ORG is a placeholder (see cluster/README.md).
QAN_IMAGE = "ghcr.io/YOUR-ORG/qan-ray:0.1.0"
RAYJOB_SCHEMA = Path(__file__).resolve().parent / "schemas" / "rayjob-v1.7.0.openapi.json"
SUBMIT = CLUSTER / "submit.sh"


def _load(name: str) -> dict[str, Any]:
    with open(CLUSTER / name) as f:
        return yaml.safe_load(f)


def _prepared(name: str) -> dict[str, Any]:
    """The config as `ray up` sees it after merging Ray's per-provider defaults."""
    return prepare_config(_load(name))


def _kuberay_docs(name: str) -> list[dict[str, Any]]:
    with open(CLUSTER / "kuberay" / name) as f:
        return [doc for doc in yaml.safe_load_all(f) if doc]


def _ray_resource(name: str) -> dict[str, Any]:
    (doc,) = [d for d in _kuberay_docs(name) if d["apiVersion"] == "ray.io/v1"]
    return doc


def _cluster_spec(name: str) -> dict[str, Any]:
    doc = _ray_resource(name)
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


def _pod_specs(spec: dict[str, Any]) -> list[dict[str, Any]]:
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return [group["template"]["spec"] for group in groups]


def _run_submit(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {
        k: v for k, v in os.environ.items() if k != "RAY_ADDRESS" and not k.startswith("QAN_")
    }
    return subprocess.run(
        ["bash", str(SUBMIT), *args],
        capture_output=True,
        text=True,
        env={**clean, **env},
        timeout=30,
    )


def _dry_run(*args: str, **env: str) -> tuple[list[str], list[str]]:
    """(`ray job submit` options, entrypoint argv) of a QAN_DRY_RUN=1 call."""
    proc = _run_submit(*args, QAN_DRY_RUN="1", QAN_SUBMISSION_ID="test-id", **env)
    assert proc.returncode == 0, proc.stderr
    argv = shlex.split(proc.stdout)
    sep = argv.index("--")
    return argv[:sep], argv[sep + 1 :]


def _option(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


# --- ray up YAMLs ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", RAY_UP_FILES)
def test_ray_up_config_passes_ray_validator(name: str) -> None:
    config = _prepared(name)

    validate_config(config)

    assert config["head_node_type"] in config["available_node_types"]
    assert config["cluster_name"].startswith("qan-ray")


@pytest.mark.parametrize("name", RAY_UP_FILES)
def test_ray_up_config_keeps_token_auth_on(name: str) -> None:
    config = _prepared(name)

    assert "RAY_AUTH_MODE=disabled" not in json.dumps(config)
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        assert "export RAY_AUTH_MODE=token;" in " ".join(config[key]), key
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"


@pytest.mark.parametrize("name", RAY_UP_FILES)
def test_ray_up_config_binds_dashboard_to_localhost(name: str) -> None:
    head_start = " ".join(_prepared(name)["head_start_ray_commands"])

    assert "--dashboard-host=127.0.0.1" in head_start
    assert "0.0.0.0" not in head_start


@pytest.mark.parametrize("name", CLOUD_FILES)
def test_cloud_config_has_cpu_head_and_gpu_worker_types(name: str) -> None:
    config = _prepared(name)
    node_types = config["available_node_types"]
    head = node_types[config["head_node_type"]]
    workers = {k: v for k, v in node_types.items() if k != config["head_node_type"]}

    assert head["resources"] == {"CPU": 0}
    assert head["max_workers"] == 0
    assert len(workers) == 2
    for node_type in workers.values():
        assert node_type["resources"]["GPU"] == 1
        assert 0 <= node_type["min_workers"] <= node_type["max_workers"]
    assert sum(t["max_workers"] for t in workers.values()) == config["max_workers"]


@pytest.mark.parametrize("name", CLOUD_FILES)
def test_cloud_config_runs_ray_260_images(name: str) -> None:
    docker = _load(name)["docker"]

    assert docker["image"] == RAY_IMAGE
    assert docker["head_image"] == "rayproject/ray:2.60.0-py311"
    assert "--env=RAY_AUTH_MODE=token" in docker["run_options"]


@pytest.mark.parametrize(
    ("name", "install"),
    [
        ("aws.yaml", "pip install -e ~/qan-ray"),
        ("gcp.yaml", "pip install -e ~/qan-ray"),
        ("onprem.yaml", "~/qan-venv/bin/pip install -e ~/qan-ray"),
    ],
)
def test_ray_up_config_installs_synced_project(name: str, install: str) -> None:
    config = _prepared(name)

    assert config["file_mounts"]["~/qan-ray"] == "."
    assert config["rsync_filter"] == [".gitignore"]
    assert install in config["head_setup_commands"]
    assert install in config["worker_setup_commands"]


def test_onprem_config_uses_local_provider_with_listed_hosts() -> None:
    raw = _load("onprem.yaml")
    config = _prepared("onprem.yaml")
    (node_type,) = config["available_node_types"].values()

    assert raw["provider"]["type"] == "local"
    assert raw["provider"]["head_ip"]
    assert (
        node_type["min_workers"]
        == node_type["max_workers"]
        == len(raw["provider"]["worker_ips"])
        == 2
    )


def test_validator_rejects_top_level_typo() -> None:
    broken = _load("aws.yaml")
    broken["max_worker"] = broken.pop("max_workers")

    with pytest.raises(jsonschema.ValidationError, match="'max_worker' was unexpected"):
        validate_config(prepare_config(broken))


def test_validator_rejects_node_type_typo() -> None:
    broken = _load("gcp.yaml")
    trainer = broken["available_node_types"]["gpu_trainer"]
    trainer["min_worker"] = trainer.pop("min_workers")

    with pytest.raises(jsonschema.ValidationError, match="'min_worker' was unexpected"):
        validate_config(prepare_config(broken))


def test_validator_rejects_missing_provider() -> None:
    broken = _load("aws.yaml")
    del broken["provider"]

    with pytest.raises(jsonschema.ValidationError, match="'provider' is a required property"):
        validate_config(broken)


def test_validator_rejects_min_workers_above_global_max() -> None:
    broken = _load("aws.yaml")
    broken["available_node_types"]["gpu.trainer"]["min_workers"] = 20

    with pytest.raises(ValueError, match="smaller than the sum of `min_workers`"):
        validate_config(prepare_config(broken))


# --- submit.sh ------------------------------------------------------------------------------


def test_submit_sh_passes_bash_syntax_check() -> None:
    proc = subprocess.run(["bash", "-n", str(SUBMIT)], capture_output=True, text=True)

    assert (proc.returncode, proc.stderr) == (0, "")


def test_submit_sh_without_subcommand_prints_usage_and_fails() -> None:
    proc = _run_submit()

    assert proc.returncode == 2
    assert "error: missing subcommand" in proc.stderr
    assert "usage: cluster/submit.sh <train|evaluate|tune|compare>" in proc.stderr
    assert proc.stdout == ""


def test_submit_sh_unknown_subcommand_prints_usage_and_fails() -> None:
    proc = _run_submit("frobnicate", "--task", "digits-mlp")

    assert proc.returncode == 2
    assert "error: unknown subcommand 'frobnicate'" in proc.stderr
    assert "usage: cluster/submit.sh" in proc.stderr


def test_submit_sh_dry_run_builds_job_submit_for_train() -> None:
    submit, entrypoint = _dry_run("train", "--task", "digits-mlp", "--episodes", "2")
    runtime_env = json.loads(_option(submit, "--runtime-env-json"))

    assert submit[:3] == ["ray", "job", "submit"]
    assert _option(submit, "--address") == "http://127.0.0.1:8265"
    assert _option(submit, "--working-dir") == "."
    assert _option(submit, "--submission-id") == "test-id"
    assert "--no-wait" in submit
    assert runtime_env["env_vars"] == {"PYTHONUNBUFFERED": "1"}
    assert "pip" not in runtime_env
    assert entrypoint == [
        "qan",
        "train",
        "--task",
        "digits-mlp",
        "--episodes",
        "2",
        "--out",
        "/home/ray/results/train/test-id",
    ]


def test_submit_sh_dry_run_sends_tune_storage_to_cloud_uri() -> None:
    submit, entrypoint = _dry_run(
        "tune",
        "--task",
        "digits-mlp",
        "--scheduler",
        "qan",
        QAN_RESULTS="s3://bucket/qan/",
        QAN_WAIT="1",
        RAY_ADDRESS="http://127.0.0.1:18265",
    )

    assert _option(submit, "--address") == "http://127.0.0.1:18265"
    assert "--no-wait" not in submit
    assert entrypoint == [
        "qan",
        "tune",
        "--task",
        "digits-mlp",
        "--scheduler",
        "qan",
        "--storage-path",
        "s3://bucket/qan/tune",
    ]


def test_submit_sh_dry_run_keeps_user_out_and_adds_pip() -> None:
    submit, entrypoint = _dry_run(
        "compare",
        "--task",
        "digits-mlp",
        "--seeds",
        "3",
        "--out=/mnt/results/mine",
        QAN_PIP="qan-ray @ git+https://example.com/qan-ray.git@main; torch",
    )
    runtime_env = json.loads(_option(submit, "--runtime-env-json"))

    assert runtime_env["pip"] == ["qan-ray @ git+https://example.com/qan-ray.git@main", "torch"]
    assert entrypoint == [
        "qan",
        "compare",
        "--task",
        "digits-mlp",
        "--seeds",
        "3",
        "--out=/mnt/results/mine",
        "--storage-path",
        "/home/ray/results/tune",
    ]


# --- KubeRay manifests ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "kind"), [("raycluster.yaml", "RayCluster"), ("rayjob.yaml", "RayJob")]
)
def test_kuberay_manifest_has_required_fields(name: str, kind: str) -> None:
    doc = _ray_resource(name)
    spec = _cluster_spec(name)
    head = spec["headGroupSpec"]

    assert doc["kind"] == kind
    assert doc["metadata"]["name"]
    assert spec["rayVersion"] == _dockerfile_ray_version()
    assert isinstance(head["rayStartParams"], dict)
    assert [g["groupName"] for g in spec["workerGroupSpecs"]] == ["gpu-learner", "gpu-trainer"]
    for group in spec["workerGroupSpecs"]:
        assert isinstance(group["rayStartParams"], dict)
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    for pod in _pod_specs(spec):
        assert [c["image"] for c in pod["containers"]] == [QAN_IMAGE]


@pytest.mark.parametrize("name", KUBERAY_FILES)
def test_kuberay_gpu_limits_only_on_worker_groups(name: str) -> None:
    spec = _cluster_spec(name)
    head_limits = spec["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]

    assert "nvidia.com/gpu" not in head_limits["limits"]
    for group in spec["workerGroupSpecs"]:
        (container,) = group["template"]["spec"]["containers"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"


@pytest.mark.parametrize("name", KUBERAY_FILES)
def test_kuberay_keeps_token_auth_on_and_head_private(name: str) -> None:
    spec = _cluster_spec(name)
    kinds = {d["kind"] for d in _kuberay_docs(name)}

    assert spec["authOptions"] == {"mode": "token"}
    assert spec["headGroupSpec"]["serviceType"] == "ClusterIP"
    assert not spec["headGroupSpec"].get("enableIngress", False)
    assert "Ingress" not in kinds
    # The operator sets RAY_AUTH_MODE / RAY_AUTH_TOKEN; a manual env entry could override it.
    assert "RAY_AUTH_MODE" not in json.dumps(_kuberay_docs(name))


@pytest.mark.parametrize("name", KUBERAY_FILES)
def test_kuberay_pods_mount_results_pvc_from_manifest(name: str) -> None:
    (pvc,) = [d for d in _kuberay_docs(name) if d["kind"] == "PersistentVolumeClaim"]
    (account,) = [d for d in _kuberay_docs(name) if d["kind"] == "ServiceAccount"]

    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    for pod in _pod_specs(_cluster_spec(name)):
        (volume,) = pod["volumes"]
        (mount,) = pod["containers"][0]["volumeMounts"]
        assert volume["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
        assert (mount["name"], mount["mountPath"]) == (volume["name"], "/mnt/results")
        assert pod["serviceAccountName"] == account["metadata"]["name"]


def test_rayjob_uses_image_small_submitter_and_cleans_up_cluster() -> None:
    spec = _ray_resource("rayjob.yaml")["spec"]
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    submitter = spec["submitterPodTemplate"]["spec"]
    (container,) = submitter["containers"]

    # qan-ray comes from the image: nothing installed per job.
    assert runtime_env == {"env_vars": {"PYTHONUNBUFFERED": "1"}}
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] > 0
    assert spec["submissionMode"] == "K8sJobMode"  # SidecarMode rejects submitterPodTemplate
    # The submitter only runs the `ray job` CLI: the CPU image of the same Ray version, small
    # resources, and no command (KubeRay only fills in its script when command is empty).
    assert container["image"] == f"rayproject/ray:{_dockerfile_ray_version()}-py311"
    assert "command" not in container and "args" not in container
    assert submitter["restartPolicy"] == "Never"
    assert container["resources"]["limits"] == {"cpu": "1", "memory": "1Gi"}


# --- KubeRay: the submitter's script, composed as KubeRay v1.7.0 does ----------------------

# The RayJob entrypoint before this was fixed: `&&` ended the `ray job submit` words in the
# submitter's script, so `qan compare` ran in the submitter pod. Kept as a regression fixture.
OLD_ENTRYPOINT = (
    "qan train --task digits-mlp --action-mode lr --episodes 20 --num-actors 4"
    " --learner-gpus 1 --gpus-per-actor 1 --out /mnt/results/train"
    " && qan compare --task digits-mlp --seeds 0,1,2 --out /mnt/results/compare"
    " --storage-path /mnt/results/tune"
)
OLD_RUNTIME_ENV_YAML = (
    'pip:\n  - "qan-ray @ git+https://github.com/YOUR-ORG/qan-ray.git@main"\n'
    'env_vars:\n  PYTHONUNBUFFERED: "1"\n'
)
# What the operator puts in RayJob.status before it creates the submitter Job: the head
# Service address (FetchHeadServiceURL) and `<rayjob name>-<5 random chars>` (GenerateRayJobId).
DASHBOARD_URL = "qan-digits-x7k2q-head-svc.default.svc.cluster.local:8265"
JOB_ID = "qan-digits-x7k2q"
GO_HEALTH_COMMAND = (
    "python -c \"import urllib.request; r=urllib.request.urlopen('%s', timeout=%d); "
    "exit(0 if b'success' in r.read() else 1)\""
)
# Stubs: each call appends "name NUL argc NUL argv... NUL" to $TRACE. `ray job status` fails
# (nothing submitted yet, so the script takes the submit branch); everything else succeeds.
STUB = """#!/bin/bash
printf '%s\\0' "${0##*/}" "$#" "$@" >> "$TRACE"
if [ "${0##*/} $1 $2" = "ray job status" ]; then exit 1; fi
exit 0
"""


def _go_quote(text: str) -> str:
    """Go's strconv.Quote: double quotes, backslash escapes, printable runes kept."""
    named = {"\a": "\\a", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t",
             "\v": "\\v", '"': '\\"', "\\": "\\\\"}
    out = []
    for ch in text:
        if ch in named:
            out.append(named[ch])
        elif ch.isprintable():
            out.append(ch)
        elif ord(ch) < 0x80:
            out.append(f"\\x{ord(ch):02x}")
        elif ord(ch) <= 0xFFFF:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(f"\\U{ord(ch):08x}")
    return '"' + "".join(out) + '"'


def _yaml_to_json(text: str) -> str:
    """sigs.k8s.io/yaml.YAMLToJSON + encoding/json: sorted keys, compact, HTML-escaped."""
    encoded = json.dumps(yaml.safe_load(text), sort_keys=True, separators=(",", ":"),
                         ensure_ascii=False)
    for char, escape in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"),
                         ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        encoded = encoded.replace(char, escape)
    return encoded


def _kuberay_submitter_container(rayjob: dict[str, Any]) -> list[str]:
    """argv of the K8sJobMode submitter container, as KubeRay v1.7.0 builds it.

    A line-by-line port of `BuildJobSubmitCommand` (ray-operator/controllers/ray/common/job.go)
    for K8sJobMode, and of `configureSubmitterContainer` (rayjob_controller.go): the command
    words are joined with single spaces, the entrypoint pasted in raw (only trimmed), and the
    result run as `/bin/bash -ce -- <script>` (`utils.GetContainerCommand([]string{"e"})`).
    """
    spec = rayjob["spec"]
    assert spec.get("submissionMode", "K8sJobMode") == "K8sJobMode"
    address = DASHBOARD_URL if DASHBOARD_URL.startswith("http://") else "http://" + DASHBOARD_URL
    # utils.BasePythonHealthCommand with (RayDashboardGCSHealthPath, ...TimeoutSeconds = 10)
    health = GO_HEALTH_COMMAND.replace("%s", address + "/api/gcs_healthz").replace("%d", "10")
    cmd = ["until", health, ">/dev/null", "2>&1", ";", "do", "echo",
           _go_quote(f"Waiting for Ray Dashboard GCS to become healthy at {address} ..."),
           ";", "sleep", "2", ";", "done", ";"]
    cmd += ["if", "!", "ray", "job", "status", "--address", address, JOB_ID, ">/dev/null",
            "2>&1", ";", "then"]
    cmd += ["ray", "job", "submit", "--address", address, "--no-wait"]
    if spec.get("runtimeEnvYAML"):
        cmd += ["--runtime-env-json", _go_quote(_yaml_to_json(spec["runtimeEnvYAML"]))]
    if spec.get("metadata"):
        cmd += ["--metadata-json", _go_quote(json.dumps(spec["metadata"], sort_keys=True,
                                                        separators=(",", ":")))]
    cmd += ["--submission-id", JOB_ID]
    if spec.get("entrypointNumCpus", 0) > 0:
        cmd += ["--entrypoint-num-cpus", f"{spec['entrypointNumCpus']:f}"]
    if spec.get("entrypointNumGpus", 0) > 0:
        cmd += ["--entrypoint-num-gpus", f"{spec['entrypointNumGpus']:f}"]
    if spec.get("entrypointResources"):
        cmd += ["--entrypoint-resources", _go_quote(spec["entrypointResources"])]
    cmd += ["--", spec["entrypoint"].strip(), ";"]
    cmd += ["fi", ";", "ray", "job", "logs", "--address", address, "--follow", JOB_ID]
    return ["/bin/bash", "-ce", "--", " ".join(cmd)]


def _read_trace(path: Path) -> list[list[str]]:
    """The stub calls recorded in `path`: [[name, arg1, ...], ...]."""
    if not path.exists():
        return []
    fields = path.read_bytes().decode().split("\0")[:-1]
    calls = []
    while fields:
        name, argc, *fields = fields
        calls.append([name, *fields[: int(argc)]])
        fields = fields[int(argc) :]
    return calls


def _run_traced(argv: list[str], stubs: Path, trace: Path) -> list[list[str]]:
    proc = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        env={"PATH": f"{stubs}:{os.environ['PATH']}", "TRACE": str(trace), "LC_ALL": "C"},
        timeout=30,
    )
    assert (proc.returncode, proc.stderr) == (0, ""), proc.stderr
    return _read_trace(trace)


class SubmitRun(NamedTuple):
    submitter: list[list[str]]  # calls made in the submitter pod
    entrypoint: list[str]  # the argv `ray job submit` got after its `--`
    cluster: list[list[str]]  # calls made by the Ray job's entrypoint on the cluster


def _submit_dry_run(rayjob: dict[str, Any], tmp_path: Path) -> SubmitRun:
    """Where each command of a RayJob runs, with stub `ray`, `python` and `qan` on PATH.

    1. The submitter pod: KubeRay's script (above) under bash, exactly as the container runs
       it. Every call it makes is recorded; a `qan` call here runs outside the Ray cluster.
    2. The Ray cluster: what `ray job submit` got after its `--` is joined with `shlex.join`
       (Ray 2.60's job CLI) and run with `/bin/sh -c` (the JobSupervisor's `shell=True`).
    """
    stubs = tmp_path / "bin"
    stubs.mkdir()
    for name in ("ray", "python", "qan"):
        (stubs / name).write_text(STUB)
        (stubs / name).chmod(0o755)
    submitter = _run_traced(_kuberay_submitter_container(rayjob), stubs, tmp_path / "pod")
    submits = [c for c in submitter if c[:3] == ["ray", "job", "submit"]]
    assert len(submits) == 1, submitter
    (submit,) = submits
    entrypoint = submit[submit.index("--") + 1 :]
    cluster = _run_traced(["/bin/sh", "-c", shlex.join(entrypoint)], stubs, tmp_path / "job")
    return SubmitRun(submitter, entrypoint, cluster)


def _options(argv: list[str]) -> dict[str, str]:
    return dict(zip(argv[::2], argv[1::2], strict=True))


def test_rayjob_submitter_runs_every_qan_call_on_the_ray_cluster(tmp_path: Path) -> None:
    rayjob = _ray_resource("rayjob.yaml")

    run = _submit_dry_run(rayjob, tmp_path)
    (submit,) = [c for c in run.submitter if c[:3] == ["ray", "job", "submit"]]
    address = "http://" + DASHBOARD_URL

    # The submitter pod: the health probe, then status / submit / logs, and nothing else.
    assert [c[:3] for c in run.submitter] == [
        ["python", "-c", "import urllib.request; r=urllib.request.urlopen("
         f"'{address}/api/gcs_healthz', timeout=10); exit(0 if b'success' in r.read() else 1)"],
        ["ray", "job", "status"],
        ["ray", "job", "submit"],
        ["ray", "job", "logs"],
    ]
    assert [c for c in run.submitter if c[0] == "qan"] == []
    sep = submit.index("--")
    assert submit[3:sep] == [
        "--address", address, "--no-wait",
        "--runtime-env-json", '{"env_vars":{"PYTHONUNBUFFERED":"1"}}',
        "--submission-id", JOB_ID,
    ]  # fmt: skip
    # One word after `--`: the whole `bash -c '...'` reaches the Ray job.
    assert run.entrypoint[:2] == ["bash", "-c"] and len(run.entrypoint) == 3
    assert run.submitter[-1] == ["ray", "job", "logs", "--address", address, "--follow",
                                    JOB_ID]
    # The Ray job: every qan call, in order, inside the one entrypoint after `--`.
    assert [c[:2] for c in run.cluster] == [["qan", "train"], ["qan", "compare"]]
    train, compare = (_options(c[2:]) for c in run.cluster)
    assert {k: train[k] for k in ("--task", "--episodes", "--num-actors", "--out")} == {
        "--task": "digits-mlp",
        "--episodes": "20",
        "--num-actors": "4",
        "--out": "/mnt/results/train",
    }
    assert {k: compare[k] for k in ("--task", "--seeds", "--policy", "--out")} == {
        "--task": "digits-mlp",
        "--seeds": "0,1,2",
        "--policy": train["--out"],
        "--out": "/mnt/results/compare",
    }
    assert compare["--storage-path"].startswith("/mnt/results/")


def test_submitter_dry_run_catches_the_old_and_entrypoint(tmp_path: Path) -> None:
    old = copy.deepcopy(_ray_resource("rayjob.yaml"))
    old["spec"]["entrypoint"] = OLD_ENTRYPOINT
    old["spec"]["runtimeEnvYAML"] = OLD_RUNTIME_ENV_YAML

    run = _submit_dry_run(old, tmp_path)
    (submit,) = [c for c in run.submitter if c[:3] == ["ray", "job", "submit"]]

    # Only `qan train` reached `ray job submit`; `qan compare` ran in the submitter pod,
    # between the submit and the log follow.
    assert [c[:2] for c in run.cluster] == [["qan", "train"]]
    assert [c[:2] for c in run.submitter if c[0] == "qan"] == [["qan", "compare"]]
    assert [c[:3] for c in run.submitter[2:]] == [
        ["ray", "job", "submit"], ["qan", "compare", "--task"], ["ray", "job", "logs"]]
    assert json.loads(submit[submit.index("--runtime-env-json") + 1]) == yaml.safe_load(
        OLD_RUNTIME_ENV_YAML)


def test_rayjob_qan_calls_parse_with_the_real_cli(tmp_path: Path) -> None:
    from qan_ray.cli import build_parser

    parser = build_parser()
    run = _submit_dry_run(_ray_resource("rayjob.yaml"), tmp_path)

    train, compare = (parser.parse_args(call[1:]) for call in run.cluster)
    assert (train.command, compare.command) == ("train", "compare")
    assert (train.meta_num_actors, train.meta_gpus_per_actor, train.meta_learner_gpus) == (4, 1, 1)
    assert compare.seeds == "0,1,2" and compare.storage_path.startswith("/mnt/results/")
    assert compare.protocol_policy == train.out


# --- KubeRay: offline validation against the CRD schema (KubeRay v1.7.0) --------------------

# ObjectMeta is not part of a CRD's schema (the API server validates it); the fields a manifest
# may set, with the API server's name rules.
DNS1123_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
DNS1123_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
OBJECT_META: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 253, "pattern": DNS1123_SUBDOMAIN},
        "generateName": {"type": "string"},
        "namespace": {"type": "string", "maxLength": 63, "pattern": DNS1123_LABEL},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
        "finalizers": {"type": "array", "items": {"type": "string"}},
        "ownerReferences": {"type": "array", "items": {"type": "object"}},
    },
    "additionalProperties": False,
    "anyOf": [{"required": ["name"]}, {"required": ["generateName"]}],
}
INT_RANGES = {"int32": (-(2**31), 2**31 - 1), "int64": (-(2**63), 2**63 - 1)}


def _k8s_to_json_schema(node: dict[str, Any], path: str, cel: list[str]) -> dict[str, Any]:
    """A Kubernetes structural schema node as plain JSON Schema (jsonschema's Draft 2020-12).

    - `x-kubernetes-int-or-string`: integer or string (the string branch keeps `pattern`);
    - `nullable`: null is allowed, otherwise null is a type error (the API server would prune
      the field, so it never reaches the operator);
    - `x-kubernetes-preserve-unknown-fields`: unlisted fields allowed; everywhere else an object
      allows only its listed `properties` (`additionalProperties: false`; the API server prunes
      unlisted fields silently), and maps keep their `additionalProperties` schema;
    - `x-kubernetes-embedded-resource`: apiVersion, kind and ObjectMeta metadata;
    - `x-kubernetes-list-type: set` -> uniqueItems; `map` keeps `x-kubernetes-list-map-keys`,
      checked by `_list_map_keys`;
    - `format: int32/int64` -> the integer range;
    - `x-kubernetes-validations` (CEL) are dropped and their paths collected in `cel`.
    """
    out = {k: v for k, v in node.items() if not k.startswith("x-kubernetes-")}
    out.pop("nullable", None)
    if "x-kubernetes-validations" in node:
        cel.append(path)
    if "x-kubernetes-list-map-keys" in node:
        out["x-kubernetes-list-map-keys"] = node["x-kubernetes-list-map-keys"]
    if node.get("x-kubernetes-list-type") == "set":
        out["uniqueItems"] = True
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("format") in INT_RANGES and node.get("type") == "integer":
        out["minimum"], out["maximum"] = INT_RANGES[node["format"]]
    if "properties" in node:
        out["properties"] = {
            key: _k8s_to_json_schema(sub, f"{path}.{key}", cel)
            for key, sub in node["properties"].items()
        }
    if node.get("x-kubernetes-embedded-resource"):
        out.setdefault("properties", {})
        out["properties"].setdefault("apiVersion", {"type": "string"})
        out["properties"].setdefault("kind", {"type": "string"})
        out["properties"]["metadata"] = OBJECT_META
        out["required"] = sorted({*out.get("required", []), "apiVersion", "kind"})
    if isinstance(node.get("items"), dict):
        out["items"] = _k8s_to_json_schema(node["items"], f"{path}[]", cel)
    if isinstance(node.get("additionalProperties"), dict):
        out["additionalProperties"] = _k8s_to_json_schema(
            node["additionalProperties"], f"{path}{{}}", cel
        )
    if (
        out.get("type") == "object"
        and not node.get("x-kubernetes-preserve-unknown-fields")
        and "additionalProperties" not in node
    ):
        out["additionalProperties"] = False
    if node.get("nullable"):
        if "type" in out:
            out["type"] = [out["type"], "null"]
        if "anyOf" in out:
            out["anyOf"] = [*out["anyOf"], {"type": "null"}]
    return out


def _list_map_keys(
    validator: Any, keys: list[str], instance: Any, schema: dict[str, Any]
) -> Any:
    """`x-kubernetes-list-type: map`: no two items may have the same key fields (after the
    schema's defaults, as the API server applies them first)."""
    if not validator.is_type(instance, "array"):
        return
    props = schema.get("items", {}).get("properties", {})
    seen: dict[tuple[Any, ...], int] = {}
    for index, item in enumerate(instance):
        if not isinstance(item, dict):
            continue
        key = tuple(item.get(k, props.get(k, {}).get("default")) for k in keys)
        if key in seen:
            yield jsonschema.ValidationError(
                f"items {seen[key]} and {index} have the same {dict(zip(keys, key))}"
            )
        seen.setdefault(key, index)


K8sValidator = jsonschema.validators.extend(
    jsonschema.Draft202012Validator, {"x-kubernetes-list-map-keys": _list_map_keys}
)


@functools.cache
def _crd_schemas() -> tuple[dict[str, dict[str, Any]], dict[str, list[str]]]:
    """({kind: JSON Schema}, {kind: paths of fields with CEL rules}) from the vendored CRD."""
    raw = json.loads(RAYJOB_SCHEMA.read_text())
    cel: list[str] = []
    rayjob = _k8s_to_json_schema(raw, "", cel)
    rayjob["properties"]["metadata"] = OBJECT_META
    # RayJob.spec.rayClusterSpec is RayCluster.spec (one Go type, one generated schema).
    raycluster = {
        "type": "object",
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": OBJECT_META,
            "spec": rayjob["properties"]["spec"]["properties"]["rayClusterSpec"],
        },
        "additionalProperties": False,
    }
    schemas = {}
    for kind, schema in (("RayJob", rayjob), ("RayCluster", raycluster)):
        schema = copy.deepcopy(schema)
        schema["properties"]["apiVersion"] = {"const": "ray.io/v1"}
        schema["properties"]["kind"] = {"const": kind}
        schema["required"] = ["apiVersion", "kind", "metadata", "spec"]
        schemas[kind] = schema
    # The translation is valid JSON Schema (the RayCluster schema is a part of the RayJob's;
    # checking against the metaschema takes seconds, so once).
    K8sValidator.check_schema(schemas["RayJob"])
    prefix = ".spec.rayClusterSpec."
    cel_paths = {
        "RayJob": cel,
        "RayCluster": [".spec." + p[len(prefix) :] for p in cel if p.startswith(prefix)],
    }
    return schemas, cel_paths


def _schema_errors(doc: dict[str, Any]) -> list[jsonschema.ValidationError]:
    schemas, _ = _crd_schemas()
    assert doc.get("kind") in schemas, doc.get("kind")
    errors = K8sValidator(schemas[doc["kind"]]).iter_errors(doc)
    return sorted(errors, key=lambda e: list(map(str, e.absolute_path)))


def _where(error: jsonschema.ValidationError) -> str:
    return ".".join(str(p) for p in error.absolute_path)


def _has_path(doc: Any, path: str) -> bool:
    """Whether `doc` sets `path` (".spec.deletionStrategy", "[]" for any list item)."""
    nodes = [doc]
    for part in path.replace("[]", ".[]").strip(".").split("."):
        if part == "[]":
            nodes = [item for node in nodes if isinstance(node, list) for item in node]
        else:
            nodes = [node[part] for node in nodes if isinstance(node, dict) and part in node]
    return bool(nodes)


@pytest.mark.parametrize("name", KUBERAY_FILES)
def test_kuberay_manifest_matches_crd_schema(name: str) -> None:
    doc = _ray_resource(name)

    assert [f"{_where(e)}: {e.message}" for e in _schema_errors(doc)] == []


@pytest.mark.parametrize("name", KUBERAY_FILES)
def test_kuberay_manifest_sets_no_field_with_unchecked_cel_rules(name: str) -> None:
    doc = _ray_resource(name)
    cel_paths = _crd_schemas()[1][doc["kind"]]

    assert ".spec.managedBy" in cel_paths  # the schema does carry CEL rules
    assert [p for p in cel_paths if _has_path(doc, p)] == []


def test_schema_rejects_unknown_field() -> None:
    doc = copy.deepcopy(_ray_resource("raycluster.yaml"))
    # A case typo: the API server would drop the field and the cluster would not autoscale.
    doc["spec"]["enableInTreeAutoScaling"] = doc["spec"].pop("enableInTreeAutoscaling")

    (error,) = _schema_errors(doc)

    assert _where(error) == "spec"
    assert error.validator == "additionalProperties"
    assert error.message == (
        "Additional properties are not allowed ('enableInTreeAutoScaling' was unexpected)"
    )


def test_schema_rejects_unknown_auth_mode() -> None:
    doc = copy.deepcopy(_ray_resource("rayjob.yaml"))
    doc["spec"]["rayClusterSpec"]["authOptions"]["mode"] = "tokens"

    (error,) = _schema_errors(doc)

    assert _where(error) == "spec.rayClusterSpec.authOptions.mode"
    assert error.validator == "enum"
    assert error.message == "'tokens' is not one of ['disabled', 'token']"


def test_schema_rejects_string_for_integer() -> None:
    doc = copy.deepcopy(_ray_resource("rayjob.yaml"))
    doc["spec"]["rayClusterSpec"]["workerGroupSpecs"][1]["maxReplicas"] = "8"

    (error,) = _schema_errors(doc)

    assert _where(error) == "spec.rayClusterSpec.workerGroupSpecs.1.maxReplicas"
    assert error.validator == "type"
    assert error.message == "'8' is not of type 'integer'"


def test_schema_translation_of_kubernetes_extensions() -> None:
    doc = copy.deepcopy(_ray_resource("raycluster.yaml"))
    head = doc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    head["resources"]["limits"]["cpu"] = 4  # int-or-string: an integer quantity is fine
    assert _schema_errors(doc) == []

    head["resources"]["requests"]["memory"] = "16 GiB"  # not a quantity
    head["ports"].append({"containerPort": 8265, "name": "dashboard-again"})  # same key
    doc["spec"]["workerGroupSpecs"][0]["rayStartParams"]["num-gpus"] = 1  # map of strings
    doc["metadata"]["name"] = "Qan_Ray"  # not a DNS-1123 name
    errors = {(_where(e), e.validator) for e in _schema_errors(doc)}

    assert errors == {
        ("metadata.name", "pattern"),
        ("spec.headGroupSpec.template.spec.containers.0.ports", "x-kubernetes-list-map-keys"),
        ("spec.headGroupSpec.template.spec.containers.0.resources.requests.memory", "pattern"),
        ("spec.workerGroupSpecs.0.rayStartParams.num-gpus", "type"),
    }


# --- the image --------------------------------------------------------------------------------


def _dockerfile_lines() -> list[str]:
    text = (ROOT / "Dockerfile").read_text()
    return [line.strip() for line in text.splitlines() if line.strip() and line[0] != "#"]


def _dockerfile_ray_version() -> str:
    (base,) = [line for line in _dockerfile_lines() if line.startswith("FROM ")]
    match = re.fullmatch(r"FROM rayproject/ray:(\d+\.\d+\.\d+)-py311-gpu", base)
    assert match, base
    return match.group(1)


def test_dockerfile_builds_on_the_pinned_ray_as_non_root() -> None:
    pyproject = (ROOT / "pyproject.toml").read_text()
    (ray_pin,) = [Requirement(r) for r in re.findall(r'^\s*"(ray\[[^"]*)"', pyproject, re.M)]
    (project_version,) = re.findall(r'^version = "([^"]+)"', pyproject, re.M)
    version = _dockerfile_ray_version()
    lines = _dockerfile_lines()
    users = [line.split()[1] for line in lines if line.startswith("USER ")]

    assert ray_pin.specifier.contains(version), (version, str(ray_pin.specifier))
    assert QAN_IMAGE.endswith(f":{project_version}")
    assert version == ray.__version__  # the version the tests (and the venv) run
    assert users and users[-1] == "ray" and "root" not in users
    assert "RUN pip install --no-cache-dir . && qan --help > /dev/null" in lines
    copied = {
        src
        for line in lines
        if line.startswith("COPY ")
        for src in line.split()[1:-1]
        if not src.startswith("--")
    }
    assert copied == {"pyproject.toml", "README.md", "qan_ray/", "trainables/", "policies/"}
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", "runs", "data"} <= set(ignored)


@pytest.mark.parametrize("name", CLOUD_FILES)
def test_ray_up_images_match_the_dockerfile_ray_version(name: str) -> None:
    docker = _load(name)["docker"]

    assert docker["image"] == f"rayproject/ray:{_dockerfile_ray_version()}-py311-gpu"


# --- placeholders -----------------------------------------------------------------------------

# Every value a user must replace, per file. Each is listed in that file's header comment and in
# cluster/README.md ("Placeholders"); the pattern catches new ones that are not listed.
PLACEHOLDERS = {
    "aws.yaml": ["qan-ray-worker", "<account-id>"],
    "gcp.yaml": ["my-gcp-project", "qan-ray-worker"],
    "onprem.yaml": ["192.168.0.10", "192.168.0.11", "192.168.0.12", "~/.ssh/id_ed25519"],
    "kuberay/raycluster.yaml": [QAN_IMAGE, "<account-id>", "<project>", "storageClassName"],
    "kuberay/rayjob.yaml": [QAN_IMAGE, "<account-id>", "<project>", "storageClassName"],
}
PLACEHOLDER_PATTERN = re.compile(r"YOUR-[A-Z]+|my-[a-z-]*project|<[a-z][a-z-]*>|192\.168\.\S+")


def _header_and_body(text: str) -> tuple[str, str]:
    lines = text.splitlines(keepends=True)
    n = next(i for i, line in enumerate(lines) if not line.startswith("#"))
    return "".join(lines[:n]), "".join(lines[n:])


@pytest.mark.parametrize("name", sorted(PLACEHOLDERS))
def test_every_placeholder_is_listed_at_the_top_and_in_the_readme(name: str) -> None:
    header, body = _header_and_body((CLUSTER / name).read_text())
    readme = (CLUSTER / "README.md").read_text()
    section = readme[readme.index("\n## Placeholders") :].split("\n## ")[1]
    listed = PLACEHOLDERS[name]

    assert [p for p in listed if p not in body] == []
    assert [p for p in listed if p not in header] == []
    assert [p for p in listed if p not in section] == []
    found = set(PLACEHOLDER_PATTERN.findall(body))
    assert [p for p in found if not any(p in q for q in listed)] == []
