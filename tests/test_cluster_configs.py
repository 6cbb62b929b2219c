"""Static checks of cluster/: `ray up` YAMLs, KubeRay manifests and cluster/submit.sh.

No Ray session and no cloud: the `ray up` files go through Ray's own offline validator
(`prepare_config` fills in the provider's defaults.yaml shipped with Ray, `validate_config`
checks ray-schema.json and the node-type bounds), the KubeRay files are checked for the fields
the ray.io/v1 CRDs need, and submit.sh is run in a subprocess (usage errors, dry run).
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER = Path(__file__).resolve().parent.parent / "cluster"
RAY_UP_FILES = ["aws.yaml", "gcp.yaml", "onprem.yaml"]
CLOUD_FILES = ["aws.yaml", "gcp.yaml"]
KUBERAY_FILES = ["raycluster.yaml", "rayjob.yaml"]
RAY_IMAGE = "rayproject/ray:2.60.0-py311-gpu"
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


def _qan_calls(entrypoint: str) -> list[tuple[str, dict[str, str]]]:
    """`qan A --x 1 && qan B --y 2` -> [("A", {"--x": "1"}), ("B", {"--y": "2"})]."""
    calls = []
    for part in entrypoint.split("&&"):
        argv = shlex.split(part)
        assert argv[0] == "qan", part
        opts = dict(zip(argv[2::2], argv[3::2], strict=True))
        calls.append((argv[1], opts))
    return calls


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
    assert spec["rayVersion"] == "2.60.0"
    assert isinstance(head["rayStartParams"], dict)
    assert [g["groupName"] for g in spec["workerGroupSpecs"]] == ["gpu-learner", "gpu-trainer"]
    for group in spec["workerGroupSpecs"]:
        assert isinstance(group["rayStartParams"], dict)
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    for pod in _pod_specs(spec):
        assert [c["image"] for c in pod["containers"]] == [RAY_IMAGE]


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


def test_rayjob_entrypoint_trains_then_compares_into_pvc() -> None:
    spec = _ray_resource("rayjob.yaml")["spec"]

    (train, train_opts), (compare, compare_opts) = _qan_calls(spec["entrypoint"])

    assert train == "train"
    assert {k: train_opts[k] for k in ("--task", "--episodes", "--num-actors", "--out")} == {
        "--task": "digits-mlp",
        "--episodes": "20",
        "--num-actors": "4",
        "--out": "/mnt/results/train",
    }
    assert compare == "compare"
    assert {k: compare_opts[k] for k in ("--task", "--seeds", "--out")} == {
        "--task": "digits-mlp",
        "--seeds": "0,1,2",
        "--out": "/mnt/results/compare",
    }
    assert compare_opts["--storage-path"].startswith("/mnt/results/")


def test_rayjob_installs_project_and_cleans_up_cluster() -> None:
    spec = _ray_resource("rayjob.yaml")["spec"]
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])

    assert [p.split(" @ ")[0] for p in runtime_env["pip"]] == ["qan-ray"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] > 0
    assert spec["submissionMode"] == "K8sJobMode"


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


def test_rayjob_entrypoint_commands_parse_with_the_real_cli() -> None:
    import shlex

    from qan_ray.cli import build_parser

    parser = build_parser()
    entrypoint = _ray_resource("rayjob.yaml")["spec"]["entrypoint"]
    parsed = [parser.parse_args(shlex.split(part.strip())[1:])
              for part in entrypoint.split("&&") if part.strip().startswith("qan ")]
    assert [a.command for a in parsed] == ["train", "compare"]
    train, compare = parsed
    assert (train.meta_num_actors, train.meta_gpus_per_actor, train.meta_learner_gpus) == (4, 1, 1)
    assert compare.seeds == "0,1,2" and compare.storage_path.startswith("/mnt/results/")
