"""Which container a step runs in, recorded with its results: proof that a step ran in its
image (the local Docker runner, a cluster pod) and not in the launching Python environment.

Recorded as the MLflow tag `sftpipe.container.<step>` of the pipeline run's MLflow run: a JSON
object with the container id, the image (reference@id, from SFTPIPE_CONTAINER_IMAGE, which
`sftpipe run --runner docker` sets; a pod has no such variable), the uid and the hostname.
"""

from __future__ import annotations

import json
import os
import re
import socket
from pathlib import Path

IMAGE_ENV = "SFTPIPE_CONTAINER_IMAGE"
TAG_PREFIX = "sftpipe.container."
_MARKERS = (Path("/.dockerenv"), Path("/run/.containerenv"))  # docker, podman
_ID = re.compile(r"\b([0-9a-f]{64})\b")


def container_id() -> str:
    """The engine's id of this container: Docker bind-mounts its own per-container files
    (hostname, resolv.conf) from `<data-root>/containers/<id>/`, on cgroup v1 and v2 alike;
    the cgroup path names it too on cgroup v1 and in Kubernetes pods."""
    for source in ("/proc/self/mountinfo", "/proc/self/cgroup"):
        try:
            text = Path(source).read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        found = re.search(r"/containers/([0-9a-f]{64})/", text) or _ID.search(text)
        if found:
            return found[1]
    return ""


def identity() -> dict[str, str | int] | None:
    """This process's container, or None when it does not run in one that can be named: a
    machine that is itself a container (a CI sandbox, a dev container) runs the subprocess
    runner's steps with a container marker but neither a container id nor an image."""
    in_container = any(m.exists() for m in _MARKERS) or "KUBERNETES_SERVICE_HOST" in os.environ
    found_id, image = container_id(), os.environ.get(IMAGE_ENV, "")
    if not in_container or not (found_id or image):
        return None
    return {
        "container_id": found_id,
        "image": image,
        "uid": os.getuid(),
        "hostname": socket.gethostname(),
    }


def describe(step: str, found: dict[str, str | int]) -> str:
    image = found["image"] or "an image the pod spec names"
    short = str(found["container_id"])[:12]
    return f"[{step}] ran in container {short} of {image} (uid {found['uid']})"


def as_tag(step: str, found: dict[str, str | int]) -> tuple[str, str]:
    return f"{TAG_PREFIX}{step}", json.dumps(found, sort_keys=True)
