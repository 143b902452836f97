#!/usr/bin/env bash
# `make kind-up`: a kind cluster (docker/kind/cluster.yaml) with Kubeflow Pipelines (pinned
# release, official manifests, SeaweedFS object store), MLflow + PostgreSQL and the pipeline's
# settings (docker/k8s/overlays/kind); waits until all of it is ready and prints the URLs.
# Idempotent: whatever is already up is kept (a rerun takes seconds).
# Needs the MLflow image built (`make images-mlflow`; `make kind-up` does it first).
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

need docker kind kubectl git
docker info >/dev/null 2>&1 || die "the Docker engine is not running"
docker image inspect "$MLFLOW_IMAGE" >/dev/null 2>&1 ||
    die "image $MLFLOW_IMAGE is not built (run: make images-mlflow)"

if cluster_exists; then
    log "kind cluster $KIND_CLUSTER is up"
    kind export kubeconfig --name "$KIND_CLUSTER" >/dev/null 2>&1
else
    log "creating kind cluster $KIND_CLUSTER (docker/kind/cluster.yaml)"
    kind create cluster --name "$KIND_CLUSTER" --config "$REPO_ROOT/docker/kind/cluster.yaml" \
        ${KIND_NODE_IMAGE:+--image "$KIND_NODE_IMAGE"} --wait 180s
fi

log "Kubeflow Pipelines $(kfp_version) (docker/k8s/kfp)"
k apply -k "$K8S_DIR/kfp/cluster-scoped"
k wait --for condition=established --timeout=120s crd/applications.app.k8s.io
k apply -k "$K8S_DIR/kfp/platform"

log "MLflow + PostgreSQL (docker/k8s/overlays/kind)"
kind load docker-image --name "$KIND_CLUSTER" "$MLFLOW_IMAGE"
KUBE_CONTEXT="$KUBE_CONTEXT" "$SCRIPTS_DIR/secrets.sh"
render "$K8S_DIR/overlays/kind" | k apply -f -

log "waiting for KFP (the first start pulls its images: 5-15 minutes)"
k -n kubeflow wait --for=condition=Available deployment --all --timeout=30m
log "waiting for MLflow"
k -n mlflow rollout status statefulset/mlflow-postgres --timeout=10m
k -n mlflow rollout status deployment/mlflow --timeout=10m

cat <<INFO
[sftpipe] kind cluster $KIND_CLUSTER is ready (kubectl context $KUBE_CONTEXT)
    KFP UI:         $KFP_URL   (also the API: sftpipe submit --host $KFP_URL)
    MLflow UI:      $MLFLOW_URL   (registered models: $MLFLOW_URL/#/models)
    inside the cluster, steps use MLFLOW_TRACKING_URI=http://mlflow.mlflow.svc.cluster.local:5000
    without the port mappings:
      kubectl --context $KUBE_CONTEXT -n kubeflow port-forward svc/ml-pipeline-ui 8080:80
      kubectl --context $KUBE_CONTEXT -n mlflow port-forward svc/mlflow 5080:5000
INFO
