#!/usr/bin/env bash
# `make local-run` (after kind-up and kind-load): the demo inputs into the cluster's object
# store, then the pipeline compiled for kind (no GPU, CPU image, laptop-sized requests) and
# submitted to KFP; prints the run's URL. Extra arguments go to `sftpipe submit`
# (e.g. --wait, --learning-rate 5e-5, --param max_steps=200).
# Idempotent: the demo upload is skipped once done; every call submits one new run.
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

need kind kubectl curl
SFTPIPE="${SFTPIPE:-$REPO_ROOT/.venv/bin/sftpipe}"
[ -x "$SFTPIPE" ] || die "$SFTPIPE not found (run: make install)"
cluster_exists || die "no kind cluster $KIND_CLUSTER (run: make kind-up)"

DEMO_PREFIX="s3://sftpipe/demo"
PACKAGE="$REPO_ROOT/build/sftpipe-sft-kind.yaml"

log "demo inputs -> $DEMO_PREFIX (Job kubeflow/sftpipe-demo-data)"
if [ "$(k -n kubeflow get job sftpipe-demo-data -o jsonpath='{.status.succeeded}' 2>/dev/null)" != "1" ]; then
    k -n kubeflow delete job sftpipe-demo-data --ignore-not-found
    render "$K8S_DIR/demo" | k apply -f -
    wait_job kubeflow sftpipe-demo-data 1800 || die "the demo data Job failed (logs above)"
fi

log "compiling for kind -> ${PACKAGE#"$REPO_ROOT"/}"
SFTPIPE_IMAGE_REPOSITORY="${SFTPIPE_IMAGE%:*}" SFTPIPE_IMAGE_TAG="${SFTPIPE_IMAGE##*:}" \
    "$SFTPIPE" compile --output "$PACKAGE" --no-gpu --image-pull-policy IfNotPresent \
    --cpu-request finetune=2 --memory-request finetune=6G --memory-request evaluate=3G

log "waiting for the KFP API at $KFP_URL"
for _ in $(seq 60); do
    curl -fsS -o /dev/null "$KFP_URL/apis/v2beta1/healthz" && break
    sleep 5
done

"$SFTPIPE" submit --host "$KFP_URL" --package "$PACKAGE" --experiment sftpipe-demo \
    --param "data_uri=$DEMO_PREFIX/chat.jsonl" \
    --param "base_model=$DEMO_PREFIX/smollm2-135m-instruct" \
    --param max_steps=60 --param eval_every=20 "$@"
log "MLflow UI: $MLFLOW_URL (experiment sftpipe, registered models: $MLFLOW_URL/#/models)"
