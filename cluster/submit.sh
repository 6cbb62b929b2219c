#!/usr/bin/env bash
# Submit a qan-ray run to a running Ray cluster as a Ray job (Ray 2.60 job API).
#
#   cluster/submit.sh train   --task digits-mlp --episodes 20 --num-actors 4
#   cluster/submit.sh tune    --task digits-mlp --scheduler qan
#   cluster/submit.sh compare --task digits-mlp --seeds 0,1,2
#
# The job API must be reachable on RAY_ADDRESS; it is never exposed publicly, so open a tunnel
# first: `ray dashboard cluster/aws.yaml` (ray up clusters) or
# `kubectl port-forward svc/qan-ray-head-svc 8265:8265` (KubeRay). See cluster/README.md.
set -euo pipefail

readonly SUBCOMMANDS="train evaluate tune compare"

usage() {
    cat <<'EOF'
usage: cluster/submit.sh <train|evaluate|tune|compare> [qan options ...]

Submits `qan <subcommand> [qan options ...]` with the repository as the job's working dir,
adds --out / --storage-path under $QAN_RESULTS unless you pass them, and prints the
submission id and the commands to watch it and fetch its results.

environment:
  RAY_ADDRESS        job API address            (default http://127.0.0.1:8265)
  QAN_RESULTS        results root on the cluster: a path on the head / shared volume
                     (default /home/ray/results) or a cloud URI (s3://bucket/qan, gs://...)
  QAN_SUBMISSION_ID  submission id              (default qan-<subcommand>-<UTC time>)
  QAN_WAIT=1         stream the job's logs until it ends (default: return at once)
  QAN_PIP            pip requirements for the job's runtime env, separated by ';'
                     (only for images without qan-ray installed, e.g.
                     'qan-ray @ git+https://github.com/YOUR-ORG/qan-ray.git@main')
  QAN_DRY_RUN=1      print the `ray job submit` command instead of running it
EOF
}

die_usage() {
    echo "error: $1" >&2
    usage >&2
    exit 2
}

# JSON string literal for one bash string (escapes backslash and double quote).
json_str() {
    local s=${1//\\/\\\\}
    s=${s//\"/\\\"}
    printf '"%s"' "$s"
}

# True if the qan arguments already contain the given option (--opt or --opt=value).
has_opt() {
    local opt=$1 arg
    shift
    for arg in "$@"; do
        if [[ $arg == "$opt" || $arg == "$opt="* ]]; then
            return 0
        fi
    done
    return 1
}

if [[ $# -eq 0 ]]; then
    die_usage "missing subcommand (one of: ${SUBCOMMANDS// /, })"
fi
case $1 in
    -h | --help)
        usage
        exit 0
        ;;
    train | evaluate | tune | compare) ;;
    *) die_usage "unknown subcommand '$1' (expected one of: ${SUBCOMMANDS// /, })" ;;
esac

cmd=$1
shift
address=${RAY_ADDRESS:-http://127.0.0.1:8265}
results=${QAN_RESULTS:-/home/ray/results}
results=${results%/}
submission_id=${QAN_SUBMISSION_ID:-qan-${cmd}-$(date -u +%Y%m%d-%H%M%S)}

# Where this run's outputs go, unless the caller chose: --out for the run's own files,
# --storage-path for Ray Tune (which needs storage every node can write: a cloud URI or a
# shared volume on multi-node clusters).
qan_args=("$@")
out_dir="$results/$cmd/$submission_id"
case $cmd in
    train | evaluate)
        has_opt --out "${qan_args[@]}" || qan_args+=(--out "$out_dir")
        ;;
    tune)
        has_opt --storage-path "${qan_args[@]}" || qan_args+=(--storage-path "$results/tune")
        out_dir="$results/tune"
        ;;
    compare)
        has_opt --out "${qan_args[@]}" || qan_args+=(--out "$out_dir")
        has_opt --storage-path "${qan_args[@]}" || qan_args+=(--storage-path "$results/tune")
        ;;
esac

# Never upload the venv, .git, run folders or datasets, even where .gitignore is not honoured
# (RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1); tests/test_cluster_e2e.py checks the package.
runtime_env='{"env_vars": {"PYTHONUNBUFFERED": "1"}, "excludes": [".git", ".venv", "runs", "/data"]'
if [[ -n ${QAN_PIP:-} ]]; then
    pip_json=""
    IFS=';' read -r -a pip_reqs <<<"$QAN_PIP"
    for req in "${pip_reqs[@]}"; do
        req=${req#"${req%%[![:space:]]*}"}
        req=${req%"${req##*[![:space:]]}"}
        [[ -z $req ]] && continue
        pip_json+="${pip_json:+, }$(json_str "$req")"
    done
    runtime_env+=", \"pip\": [$pip_json]"
fi
runtime_env+='}'

submit=(ray job submit --address "$address" --working-dir . --runtime-env-json "$runtime_env"
    --submission-id "$submission_id")
[[ ${QAN_WAIT:-0} == 1 ]] || submit+=(--no-wait)
submit+=(-- qan "$cmd" "${qan_args[@]}")

# The working dir "." is the repository root, whatever directory this was called from.
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [[ ${QAN_DRY_RUN:-0} == 1 ]]; then
    printf '%q ' "${submit[@]}"
    echo
    exit 0
fi

if ! command -v ray >/dev/null 2>&1; then
    echo "error: the 'ray' CLI is not on PATH; install it with: pip install 'ray[default]==2.60.0'" >&2
    exit 1
fi

# Clusters built from cluster/ keep token auth on; the client must send the token too
# (~/.ray/auth_token, or RAY_AUTH_TOKEN for KubeRay's generated Secret).
if [[ ${RAY_AUTH_MODE:-} == disabled ]]; then
    echo "note: RAY_AUTH_MODE=disabled in this shell; the clusters in cluster/ require a token" >&2
fi
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}

"${submit[@]}"

cat <<EOF

submission id: $submission_id
results:       $out_dir

watch:
  export RAY_AUTH_MODE=token RAY_ADDRESS=$address
  ray job status $submission_id
  ray job logs --follow $submission_id
  ray job stop $submission_id          # to cancel

fetch results:
EOF
case $results in
    s3://*) echo "  aws s3 sync $out_dir ./results/${out_dir#"$results"/}" ;;
    gs://*) echo "  gcloud storage rsync --recursive $out_dir ./results/${out_dir#"$results"/}" ;;
    *://*) echo "  copy $out_dir with your storage provider's CLI" ;;
    *)
        cat <<EOF
  ray up cluster:  ray rsync-down cluster/aws.yaml $out_dir ./results/   (or gcp.yaml / onprem.yaml)
  KubeRay:         kubectl cp \$(kubectl get pod -l ray.io/node-type=head -o name | head -n1 | cut -d/ -f2):$out_dir ./results/${out_dir#"$results"/}
EOF
        ;;
esac
