"""Restricted pods for the pipeline's steps (the compiled kfp-kubernetes platform spec).

KFP 2.17's compiler itself adds allowPrivilegeEscalation: false, drop ALL and the
RuntimeDefault seccomp profile to every executor; what the platform spec can add is the user:
non-root, the images' own uid (docker/Dockerfile*), and emptyDirs where the steps write (/tmp
and $HOME), so that a read-only root file system, which KFP cannot set, can be enforced by an
admission policy without breaking them. The TrainJob's nodes get the same, and the read-only
root too (tests/library/kfp_glue/test_trainjob.py).
"""

import re
from pathlib import Path

import pytest
import yaml
from kfp import compiler
from sftpipe.pipelines.cluster import ClusterOptions
from sftpipe.pipelines.sft_pipeline import build_pipeline

from sftpipe.kfp_glue.trainjob import NODE_UID, WRITABLE_DIRS

DOCKER = Path(__file__).parents[2] / "docker"


@pytest.fixture(scope="module", params=["gpu", "no-gpu-sharded"])
def executors(request, tmp_path_factory):
    sharded = ClusterOptions(gpu=False, clean_shards=3)
    options = ClusterOptions() if request.param == "gpu" else sharded
    path = tmp_path_factory.mktemp("yaml") / "pipeline.yaml"
    compiler.Compiler().compile(build_pipeline(options), str(path))
    spec, platform = yaml.safe_load_all(path.read_text())
    return spec, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def test_every_step_runs_as_the_images_non_root_user(executors):
    spec, platform = executors
    assert set(platform) == set(spec["deploymentSpec"]["executors"])  # none left out
    for label, config in platform.items():
        assert config["securityContext"] == {
            "runAsUser": str(NODE_UID),
            "runAsGroup": str(NODE_UID),
            "runAsNonRoot": True,
        }, label
        mounts = {m["mountPath"]: m["volumeName"] for m in config["emptyDirMounts"]}
        assert mounts == {path: name for name, path in WRITABLE_DIRS.items()}, label


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.cuda"])
def test_the_uid_and_home_are_the_images_own(dockerfile):
    text = (DOCKER / dockerfile).read_text()
    assert re.findall(r"^USER (\d+):(\d+)$", text, re.M)[-1] == (str(NODE_UID), str(NODE_UID))
    assert f"HOME={WRITABLE_DIRS['home']}" in text
