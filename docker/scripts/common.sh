# shellcheck shell=bash disable=SC2034  # its variables are used by the scripts that source it
# Sourced by the other docker/scripts/*.sh: names, tool checks, and kubectl pinned to the kind
# cluster's context (never whatever context happens to be current).

set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
K8S_DIR="$REPO_ROOT/docker/k8s"
SCRIPTS_DIR="$REPO_ROOT/docker/scripts"
VERSION="$(sed -n 's/^version = "\(.*\)"$/\1/p' "$REPO_ROOT/pyproject.toml")"

KIND_CLUSTER="${KIND_CLUSTER:-sftpipe}"
KUBE_CONTEXT="${KUBE_CONTEXT:-kind-$KIND_CLUSTER}"

# The images the manifests name; `make images` may build them under other names
# (SFTPIPE_IMAGE_REPOSITORY/SFTPIPE_IMAGE_TAG), render() swaps those in.
DEFAULT_SFTPIPE_IMAGE="ghcr.io/sftpipe/sftpipe:$VERSION"
DEFAULT_MLFLOW_IMAGE="ghcr.io/sftpipe/sftpipe-mlflow:$VERSION"
SFTPIPE_IMAGE="${SFTPIPE_IMAGE:-$DEFAULT_SFTPIPE_IMAGE}"
MLFLOW_IMAGE="${MLFLOW_IMAGE:-$DEFAULT_MLFLOW_IMAGE}"

# Published by docker/kind/cluster.yaml (NodePorts of docker/k8s/overlays/kind).
KFP_URL="http://localhost:8080"
MLFLOW_URL="http://localhost:5080"

log() { printf '[sftpipe] %s\n' "$*" >&2; }
die() {
    printf 'sftpipe: error: %s\n' "$*" >&2
    exit 1
}

need() {
    local tool
    for tool in "$@"; do
        command -v "$tool" >/dev/null 2>&1 ||
            die "$tool is not installed (docs/kubernetes.md lists what is needed)"
    done
}

# The docker client to build with: $DOCKER if set, else the first `docker` on PATH that builds
# with BuildKit (it has buildx, or it is a 20.10-22.x client with BuildKit built in). A newer
# client without buildx (some distributions' docker-cli) cannot build these Dockerfiles.
docker_client() {
    if [ -n "${DOCKER:-}" ]; then
        echo "$DOCKER"
        return
    fi
    local candidate major
    while IFS= read -r candidate; do
        if "$candidate" buildx version >/dev/null 2>&1; then
            echo "$candidate"
            return
        fi
        major="$("$candidate" version --format '{{.Client.Version}}' 2>/dev/null | cut -d. -f1)"
        if [ -n "$major" ] && [ "$major" -lt 23 ] 2>/dev/null; then
            echo "$candidate"
            return
        fi
    done < <(type -ap docker | awk '!seen[$0]++')
    die "no docker client that builds with BuildKit (install buildx, or Debian's docker.io)"
}

k() { kubectl --context "$KUBE_CONTEXT" "$@"; }

cluster_exists() { kind get clusters 2>/dev/null | grep -qx "$KIND_CLUSTER"; }

# The KFP release pinned in docker/k8s/kfp (the ?ref= of its remote resources).
kfp_version() { sed -n 's/.*?ref=\(.*\)$/\1/p' "$K8S_DIR/kfp/platform/kustomization.yaml"; }

# `kubectl kustomize DIR` with the images that were built instead of the default names.
render() {
    kubectl kustomize "$1" | sed \
        -e "s#image: $DEFAULT_SFTPIPE_IMAGE\$#image: $SFTPIPE_IMAGE#" \
        -e "s#image: $DEFAULT_MLFLOW_IMAGE\$#image: $MLFLOW_IMAGE#"
}

# Wait until a Job succeeds (0) or fails (1: prints its last log lines), at most $3 seconds.
wait_job() {
    local namespace="$1" job="$2" timeout="$3" waited=0 succeeded failed
    while [ "$waited" -lt "$timeout" ]; do
        succeeded="$(k -n "$namespace" get job "$job" -o jsonpath='{.status.succeeded}')"
        failed="$(k -n "$namespace" get job "$job" -o jsonpath='{.status.conditions[?(@.type=="Failed")].status}')"
        if [ "$succeeded" = "1" ]; then
            return 0
        fi
        if [ "$failed" = "True" ]; then
            k -n "$namespace" logs "job/$job" --tail=30 >&2 || true
            return 1
        fi
        sleep 5
        waited=$((waited + 5))
    done
    k -n "$namespace" logs "job/$job" --tail=30 >&2 || true
    return 1
}
