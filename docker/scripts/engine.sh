#!/usr/bin/env bash
# A private Docker engine for the image targets and the container tests: dockerd on its own
# socket, data root, exec root and pid file under one folder, so it never touches a system
# engine. No bridge and no iptables rules: containers use host networking (loopback servers).
#
#   engine.sh start [DIR]   start it (idempotent), print `export DOCKER_HOST=unix://DIR/docker.sock`
#   engine.sh stop [DIR]    stop it by its pid file
#   engine.sh status [DIR]  exit 0 when it answers
#
# DIR defaults to $SFTPIPE_ENGINE_DIR or /tmp/sftpipe-docker (kept short: dockerd's containerd
# socket lives under it and unix socket paths are limited to 108 bytes).
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

action="${1:-}"
dir="${2:-${SFTPIPE_ENGINE_DIR:-/tmp/sftpipe-docker}}"
socket="unix://$dir/docker.sock"
pidfile="$dir/dockerd.pid"
logfile="$dir/dockerd.log"

answers() { DOCKER_HOST="$socket" "$(docker_client)" version >/dev/null 2>&1; }

case "$action" in
start)
    command -v dockerd >/dev/null 2>&1 ||
        die "dockerd is not installed (Debian: apt-get install docker.io)"
    [ "$(id -u)" -eq 0 ] || die "dockerd needs root here (or use your own engine: export DOCKER_HOST)"
    mkdir -p "$dir"
    if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null && answers; then
        log "engine already running (pid $(cat "$pidfile"))"
    else
        setsid dockerd --host "$socket" --data-root "$dir/data" --exec-root "$dir/exec" \
            --pidfile "$pidfile" --bridge none --iptables=false --ip-masq=false \
            >"$logfile" 2>&1 </dev/null &
        waited=0
        until answers; do
            kill -0 "$!" 2>/dev/null || die "dockerd exited at start; read $logfile"
            [ "$waited" -lt 600 ] || die "dockerd did not answer within 60 s; read $logfile"
            sleep 0.1
            waited=$((waited + 1))
        done
        log "engine up (pid $(cat "$pidfile"), log $logfile)"
    fi
    echo "export DOCKER_HOST=$socket"
    ;;
stop)
    if [ -f "$pidfile" ]; then
        pid="$(cat "$pidfile")"
        if kill "$pid" 2>/dev/null; then
            # dockerd removes its pid file when it has shut down (containers stopped first).
            waited=0
            while kill -0 "$pid" 2>/dev/null && [ "$waited" -lt 300 ]; do
                sleep 0.1
                waited=$((waited + 1))
            done
        fi
        rm -f "$pidfile"
    fi
    # dockerd leaves its default network namespace mounted: unmount it so the folder can go.
    for netns in "$dir"/exec/netns/*; do
        if [ -e "$netns" ]; then
            umount "$netns" 2>/dev/null || true
        fi
    done
    log "engine stopped ($dir kept: rm -rf it to drop the images)"
    ;;
status)
    answers
    ;;
*)
    die "usage: engine.sh start|stop|status [DIR]"
    ;;
esac
