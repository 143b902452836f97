#!/usr/bin/env bash
# `make kind-load`: copy the built images into the kind cluster's node (no registry needed).
# Usage: kind-load.sh IMAGE...   Idempotent: kind skips an image the node already has.
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

need docker kind
[ "$#" -gt 0 ] || die "usage: kind-load.sh IMAGE..."
cluster_exists || die "no kind cluster $KIND_CLUSTER (run: make kind-up)"
for image in "$@"; do
    docker image inspect "$image" >/dev/null 2>&1 || die "image $image is not built (run: make images)"
    kind load docker-image --name "$KIND_CLUSTER" "$image"
done
