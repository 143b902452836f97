#!/usr/bin/env bash
# `make base-image`: a Python 3.11 base image made from Debian bookworm's own packages, for
# machines that reach a Debian mirror but no image registry (python:3.11-slim cannot be
# pulled there). debootstrap (minbase) + python3, python3-venv, ca-certificates, then
# `docker import`. The Dockerfiles take it as a build arg:
#   docker build --build-arg PYTHON_IMAGE=<this image> -f docker/Dockerfile ...
#
# Usage: debian-base.sh IMAGE   (e.g. sftpipe-base/python:3.11-bookworm)
# The mirror: $DEBIAN_MIRROR, else the Debian mirror of this machine's apt sources. Needs root
# (debootstrap) and a running engine (DOCKER_HOST). The image gets its name only once it was
# imported whole: a failed run leaves no image under IMAGE.
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

image="${1:-}"
[ -n "$image" ] || die "usage: debian-base.sh IMAGE"
suite=bookworm
need debootstrap tar
[ "$(id -u)" -eq 0 ] || die "debootstrap needs root"
docker="$(docker_client)"
"$docker" version >/dev/null 2>&1 ||
    die "no Docker engine answers (DOCKER_HOST=${DOCKER_HOST:-unset}); start one: make engine-up"

# The first http(s) Debian archive of apt's sources that serves $suite (deb822 or one-line).
apt_mirror() {
    local file
    for file in /etc/apt/sources.list.d/*.sources; do
        [ -f "$file" ] || continue
        awk -v suite="$suite" '
            /^URIs:/ { uri = $2 } /^Suites:/ { suites = $0 }
            /^$/ { if (uri ~ /debian\/?$/ && suites ~ (" " suite "( |$)")) { print uri; exit } uri = ""; suites = "" }
            END { if (uri ~ /debian\/?$/ && suites ~ (" " suite "( |$)")) print uri }
        ' "$file"
    done
    cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null |
        awk -v suite="$suite" '$1 == "deb" && $3 == suite && $2 ~ /debian\/?$/ { print $2 }'
}
mirror="${DEBIAN_MIRROR:-$(apt_mirror 2>/dev/null | head -n 1 || true)}"
[ -n "$mirror" ] || die "no Debian $suite mirror in apt's sources: set DEBIAN_MIRROR"

work="$(mktemp -d "${TMPDIR:-/tmp}/sftpipe-base.XXXXXX")"
trap 'rm -rf "$work"' EXIT
logfile="${BASE_LOG:-$work.log}"
log "debootstrap $suite from $mirror (log: $logfile)"
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    "$suite" "$work/root" "$mirror" >"$logfile" 2>&1 ||
    die "debootstrap of the base image failed (image $image not made); read $logfile"
chroot "$work/root" python3 -c 'import sys, venv, ensurepip; assert sys.version_info[:2] == (3, 11)' ||
    die "the debootstrapped root has no working Python 3.11 (image $image not made); read $logfile"
# No apt lists or package cache in the image.
rm -rf "$work/root/var/lib/apt/lists/"* "$work/root/var/cache/apt/"*.bin "$work/root/var/cache/apt/archives/"*.deb

staging="$image-importing-$$"
tar -C "$work/root" --numeric-owner -c . |
    "$docker" import --change 'CMD ["python3"]' \
        --change 'ENV LANG=C.UTF-8 PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --message "debootstrap --variant=minbase $suite + python3 (sftpipe docker/scripts/debian-base.sh)" \
        - "$staging" >/dev/null ||
    die "docker import of the base image failed (image $image not made)"
"$docker" tag "$staging" "$image"
"$docker" rmi "$staging" >/dev/null
log "base image $image: $("$docker" image inspect --format '{{.Size}}' "$image" | awk '{printf "%.0f MB", $1 / 1e6}')"
