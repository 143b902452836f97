#!/usr/bin/env bash
# The Secrets the manifests reference, created once and never written to the repository:
#   mlflow/mlflow-postgres   username=mlflow, password=<random, 32 hex>; kept when it exists
#                            (PostgreSQL keeps the password it was initialized with)
#   mlflow/mlflow-s3         AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY for MLflow's artifacts
#   kubeflow/sftpipe-s3      the same keys, for the pipeline's steps (data_uri, base_model)
#   mlflow/mlflow-auth       the MLflow server's admin (admin-username=admin, admin-password
#                            <random>) and flask-secret-key <random>; kept when it exists
#   kubeflow/sftpipe-mlflow  MLFLOW_TRACKING_USERNAME/PASSWORD the steps log in to MLflow with
#                            (the admin here; on a shared cluster create a user of their own)
# The S3 keys are S3_ACCESS_KEY_ID/S3_SECRET_ACCESS_KEY when set, else those of KFP's own
# object store (Secret kubeflow/mlpipeline-minio-artifact).
# kubectl context: $KUBE_CONTEXT (default: the kind cluster's). Idempotent.
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

need kubectl od
workdir="$(mktemp -d)"
trap 'rm -rf "$workdir"' EXIT
umask 077

# Apply a generic Secret from an env file (values never on a command line).
put_secret() {
    local namespace="$1" name="$2" env_file="$3"
    k -n "$namespace" create secret generic "$name" --from-env-file="$env_file" \
        --dry-run=client -o yaml | k apply -f - >/dev/null
    log "secret $namespace/$name is set"
}

k create namespace mlflow --dry-run=client -o yaml | k apply -f - >/dev/null

if k -n mlflow get secret mlflow-postgres >/dev/null 2>&1; then
    log "secret mlflow/mlflow-postgres exists (kept)"
else
    password="$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')"
    printf 'username=mlflow\npassword=%s\n' "$password" >"$workdir/postgres.env"
    put_secret mlflow mlflow-postgres "$workdir/postgres.env"
fi

access_key="${S3_ACCESS_KEY_ID:-}"
secret_key="${S3_SECRET_ACCESS_KEY:-}"
if [ -z "$access_key" ] || [ -z "$secret_key" ]; then
    access_key="$(k -n kubeflow get secret mlpipeline-minio-artifact \
        -o jsonpath='{.data.accesskey}' | base64 --decode)" ||
        die "no S3 credentials: set S3_ACCESS_KEY_ID/S3_SECRET_ACCESS_KEY or install KFP first"
    secret_key="$(k -n kubeflow get secret mlpipeline-minio-artifact \
        -o jsonpath='{.data.secretkey}' | base64 --decode)"
fi
printf 'AWS_ACCESS_KEY_ID=%s\nAWS_SECRET_ACCESS_KEY=%s\n' "$access_key" "$secret_key" \
    >"$workdir/s3.env"
put_secret mlflow mlflow-s3 "$workdir/s3.env"
put_secret kubeflow sftpipe-s3 "$workdir/s3.env"

if k -n mlflow get secret mlflow-auth >/dev/null 2>&1; then
    log "secret mlflow/mlflow-auth exists (kept)"
else
    admin_password="$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')"
    flask_key="$(od -An -N32 -tx1 /dev/urandom | tr -d ' \n')"
    printf 'admin-username=admin\nadmin-password=%s\nflask-secret-key=%s\n' \
        "$admin_password" "$flask_key" >"$workdir/auth.env"
    put_secret mlflow mlflow-auth "$workdir/auth.env"
fi
admin_user="$(k -n mlflow get secret mlflow-auth -o jsonpath='{.data.admin-username}' | base64 --decode)"
admin_password="$(k -n mlflow get secret mlflow-auth -o jsonpath='{.data.admin-password}' |
    base64 --decode)"
printf 'MLFLOW_TRACKING_USERNAME=%s\nMLFLOW_TRACKING_PASSWORD=%s\n' "$admin_user" "$admin_password" \
    >"$workdir/mlflow.env"
put_secret kubeflow sftpipe-mlflow "$workdir/mlflow.env"
