"""docker/scripts/build_image.py without an engine: the pip settings it hands a build (served
local sources, the CA certificate as a secret), the one line it makes of a failed build's log,
and the tag it builds to. The builds themselves: test_containers.py (-m container)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "docker" / "scripts" / "build_image.py"


@pytest.fixture(scope="module")
def build_image():
    spec = importlib.util.spec_from_file_location("build_image", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def sources(build_image):
    served = build_image.LocalSources()
    served.start()
    yield served
    served.stop()


def fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()


def test_local_pip_sources_are_served_and_the_rest_kept(build_image, sources, tmp_path):
    index = tmp_path / "mirror" / "simple"
    (index / "six").mkdir(parents=True)
    (tmp_path / "mirror" / "files").mkdir()
    (tmp_path / "mirror" / "files" / "six-1.17.0-py3-none-any.whl").write_bytes(b"wheel")
    (index / "six" / "index.html").write_text(
        '<a href="../../files/six-1.17.0-py3-none-any.whl">six</a>'
    )
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl").write_bytes(b"t")
    (wheels / "torchvision-0.29.0-cp311-cp311-manylinux_2_28_x86_64.whl").write_bytes(b"v")
    cert = tmp_path / "ca.crt"
    cert.write_text("-----BEGIN CERTIFICATE-----\n")
    settings = {
        "index-url": "https://pypi.example/simple",
        "extra-index-url": f"{index.as_uri()} {tmp_path / 'missing'}",
        "find-links": str(wheels),
        "cert": str(cert),
        "timeout": "180",
    }

    text, find_links = build_image.build_pip_conf(settings, sources)

    lines = dict(line.split(" = ", 1) for line in text.splitlines()[1:])
    assert text.startswith("[global]\n")
    assert lines["index-url"] == "https://pypi.example/simple"  # remote: as it is
    assert lines["extra-index-url"] == sources.url("s0/simple")  # the missing folder: dropped
    assert lines["find-links"] == sources.url("s1/")
    assert lines["cert"] == "/run/secrets/pip_cert" and lines["timeout"] == "180"
    assert str(cert) not in text and str(tmp_path) not in text  # no path of this machine
    assert find_links == [wheels]
    # The index's relative links resolve on the server as they do on disk.
    page = fetch(sources.url("s0/simple/six/"))
    assert "six-1.17.0" in page
    assert fetch(sources.url("s0/files/six-1.17.0-py3-none-any.whl")) == "wheel"
    # A find-links folder as a PEP 503 index of one project (what TORCH_INDEX_URL points at).
    torch_page = fetch(sources.url("links1/torch/"))
    assert "torch-2.13.0%2Bcpu" in torch_page and "torchvision" not in torch_page
    with pytest.raises(urllib.error.HTTPError):
        fetch(sources.url("s9/anything"))  # only the folders handed over are served


def test_pip_failure_is_named_by_step_and_cause(build_image):
    log = "\n".join(
        [
            "#6 [builder 2/9] RUN --mount=type=secret,id=pip_conf --mount=type=secret,id=pip_cert"
            '     python3.11 -m venv /opt/venv     && pip install --no-deps "torch==0.0.1"',
            "#6 3.1 Looking in indexes: http://127.0.0.1:38517/links0/",
            "#6 4.2 ERROR: Could not find a version that satisfies the requirement torch==0.0.1",
            "#6 4.2 ERROR: No matching distribution found for torch==0.0.1",
            "#6 ERROR: executor failed running [/bin/sh -c python3.11 -m venv]: exit code: 1",
            "------",
            " > [builder 2/9] RUN --mount=type=secret,id=pip_conf python3.11 -m venv:",
            "------",
        ]
    )
    line = build_image.failed_step(log)
    assert line.startswith("[builder 2/9] RUN python3.11 -m venv /opt/venv")
    assert line.endswith("ERROR: No matching distribution found for torch==0.0.1")
    assert "--mount" not in line


def test_only_the_engine_dropping_the_build_is_built_again(build_image):
    """The log of a real failure on this machine (dockerd 20.10, parallel stages); a failing
    step is never retried."""
    dropped = "\n".join(
        [
            "#6 [builder 2/9] RUN --mount=type=secret,id=pip_conf python3.11 -m venv /opt/venv",
            "#6 ERROR: rpc error: code = Internal desc = unexpected EOF",
            "#5 [runtime 2/4] RUN groupadd --gid 10001 sftpipe",
            "#5 CANCELED",
            "rpc error: code = Internal desc = unexpected EOF",
        ]
    )
    assert build_image.engine_dropped(dropped)
    step_failed = dropped.replace(
        "#5 CANCELED", "#5 ERROR: executor failed running [/bin/sh -c groupadd]: exit code: 1"
    )
    assert not build_image.engine_dropped(step_failed)
    assert not build_image.engine_dropped("#6 ERROR: executor failed running [x]: exit code: 1")
    assert not build_image.engine_dropped("")


def test_unknown_base_image_is_named(build_image):
    log = (
        "#3 [internal] load metadata for docker.io/sftpipe-test/no-such-base:0\n"
        "#3 ERROR: pull access denied, repository does not exist or may require authorization\n"
        "------\n > [internal] load metadata for docker.io/sftpipe-test/no-such-base:0:\n------\n"
        "failed to solve with frontend dockerfile.v0: failed to create LLB definition: pull "
        "access denied, repository does not exist or may require authorization\n"
    )
    line = build_image.failed_step(log)
    assert line.startswith("[internal] load metadata for docker.io/sftpipe-test/no-such-base:0")
    assert "pull access denied" in line


def test_the_image_is_built_under_a_temporary_tag(build_image):
    args = ["-f", "docker/Dockerfile", "--build-arg", "A=1", "-t", "repo/x:1.0", "."]
    assert build_image.option_value(args, "-t", "--tag") == (5, "repo/x:1.0")
    assert build_image.option_value(["--tag=repo/x:1"], "-t", "--tag") == (0, "repo/x:1")
    assert build_image.option_value(["."], "-t", "--tag") is None


def test_missing_engine_is_one_line(tmp_path):
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "docker", "build", "-t", "x:1", "."],
        env={"PATH": "/usr/bin:/bin", "DOCKER_HOST": f"unix://{tmp_path}/none.sock"},
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert done.returncode == 1
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("sftpipe: error: "), line
    # Without a docker client it says so; with one, that no engine answers at that socket.
    assert "no docker client" in line or f"no Docker engine answers at unix://{tmp_path}" in line
