#!/usr/bin/env bash
# `make kind-down`: delete the kind cluster and everything in it (the images stay in Docker).
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

need kind
if cluster_exists; then
    kind delete cluster --name "$KIND_CLUSTER"
else
    log "no kind cluster $KIND_CLUSTER"
fi
