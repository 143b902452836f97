"""The images built for real on a Docker engine, and the whole pipeline run step by step in
them (KFP's DockerRunner via `sftpipe run --runner docker`), against real SeaweedFS and MLflow
servers on loopback reached with host networking.

Marker `container`: only with `-m container` (.ci/run runs them after `make test`). The
engine, the Debian base image and the builds come from tests/fixtures/docker_engine.py.
Figures (build times, sizes, run times) go to build/container-figures.json.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
from fixtures.pipeline_input import conversations, upload

pytestmark = [pytest.mark.container, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
REPOSITORY = "sftpipe-test/sftpipe"
TAG = "ci"
IMAGE = f"{REPOSITORY}:{TAG}"
IMAGE_UID = 10001
FIGURES = REPO / "build" / "container-figures.json"
FAST = dict(
    max_steps=30,
    learning_rate=3e-3,
    eval_every=10,
    max_length=64,
    micro_batch_size=8,
    num_samples=2,
    max_new_tokens=8,
    mlflow_experiment="containers",
)
STEPS = ("clean", "tokenize", "finetune", "evaluate", "register")
CUDA_ONLY = {"bitsandbytes"}  # Dockerfile.cuda's own step after the shared ones (QLoRA)


def record(**figures: object) -> None:
    FIGURES.parent.mkdir(parents=True, exist_ok=True)
    known = json.loads(FIGURES.read_text()) if FIGURES.exists() else {}
    FIGURES.write_text(json.dumps(known | figures, indent=2, sort_keys=True) + "\n")


@dataclass(frozen=True)
class Built:
    image: str
    image_id: str
    seconds: float
    size_mb: float


def _built(docker_engine, image: str, seconds: float) -> Built:
    done = docker_engine.docker("image", "inspect", "--format", "{{.Id}} {{.Size}}", image)
    assert done.returncode == 0, done.stderr
    image_id, size = done.stdout.split()
    return Built(image, image_id, seconds, int(size) / 1e6)


@pytest.fixture(scope="session")
def cpu_image(docker_engine, base_image, build_image) -> Built:
    start = time.perf_counter()
    done = build_image("docker/Dockerfile", IMAGE, "--build-arg", f"PYTHON_IMAGE={base_image}")
    assert done.returncode == 0, done.stderr
    built = _built(docker_engine, IMAGE, time.perf_counter() - start)
    record(cpu_image_build_s=round(built.seconds, 1), cpu_image_mb=round(built.size_mb))
    return built


def test_cpu_image_runs_as_non_root_with_a_consistent_install(docker_engine, cpu_image):
    inspect = json.loads(docker_engine.docker("image", "inspect", cpu_image.image).stdout)[0]
    assert inspect["Config"]["User"] == f"{IMAGE_UID}:{IMAGE_UID}"
    assert inspect["Config"]["Entrypoint"] is None
    assert inspect["Config"]["Cmd"] == ["sftpipe", "--help"]

    def run(*command: str) -> subprocess.CompletedProcess[str]:
        return docker_engine.docker("run", "--rm", "--network", "none", cpu_image.image, *command)

    helped = run()  # the default command
    assert helped.returncode == 0 and "usage: sftpipe" in helped.stdout, helped.stderr
    who = run("id", "-u")
    assert who.stdout.strip() == str(IMAGE_UID)
    checked = run("pip", "check")
    assert checked.returncode == 0 and "No broken requirements" in checked.stdout, checked.stdout
    imports = run(
        "python3", "-c", "import sftpipe.kfp_glue.steps, kfp, torch; print(torch.__version__)"
    )
    assert imports.returncode == 0 and imports.stdout.strip().endswith("+cpu"), imports.stderr


def test_build_time_pip_settings_stay_out_of_the_image(docker_engine, cpu_image):
    """The build's pip settings came as secrets: no layer, label or variable keeps them."""
    history = docker_engine.docker("history", "--no-trunc", cpu_image.image).stdout
    inspect = docker_engine.docker("image", "inspect", cpu_image.image).stdout
    for text in (history, inspect):
        assert "127.0.0.1" not in text and "pip_conf" not in text and "/opt/pypi" not in text
    found = docker_engine.docker(
        "run",
        "--rm",
        "--network",
        "none",
        cpu_image.image,
        "sh",
        "-c",
        "ls /run/secrets /etc/pip.conf /opt/venv/pip.conf $HOME/.config/pip 2>/dev/null; "
        "python3 -m pip config list",
    )
    # Only the image's own settings (ENV PIP_NO_CACHE_DIR, PIP_DISABLE_PIP_VERSION_CHECK).
    leaked = [
        line
        for line in found.stdout.splitlines()
        if not line.startswith((":env:.no-cache-dir=", ":env:.disable-pip-version-check="))
    ]
    assert not leaked, found.stdout


def test_rebuild_takes_every_layer_from_the_cache(
    docker_engine, base_image, build_image, cpu_image
):
    start = time.perf_counter()
    done = build_image("docker/Dockerfile", IMAGE, "--build-arg", f"PYTHON_IMAGE={base_image}")
    seconds = time.perf_counter() - start
    assert done.returncode == 0, done.stderr
    rebuilt = _built(docker_engine, IMAGE, seconds)
    assert rebuilt.image_id == cpu_image.image_id  # nothing rebuilt: the same image
    record(cpu_image_cached_build_s=round(seconds, 1))


def test_cuda_dockerfile_python_layer_on_the_debian_base(
    docker_engine, base_image, build_image, cpu_image
):
    """Dockerfile.cuda with the CUDA base swapped for the Debian one (CPU-only check): the
    same dependency set, user, command and step module; its install layers come from the CPU
    image's cache."""
    image = f"{REPOSITORY}:{TAG}-cuda-check"
    start = time.perf_counter()
    done = build_image(
        "docker/Dockerfile.cuda",
        image,
        "--build-arg",
        f"CUDA_IMAGE={base_image}",
        "--build-arg",
        "PYTHON_STAGE=python-in-base",
        "--build-arg",
        "TORCH_CUDA=none",
        torch_variant="cpu",  # this machine's CPU wheel, as for the CPU image
    )
    seconds = time.perf_counter() - start
    assert done.returncode == 0, done.stderr
    log = (docker_engine.logs / (image.replace("/", "_").replace(":", "_") + ".log")).read_text()
    install = re.search(
        r"^#(\d+) \[builder \d+/\d+\] RUN .*pip install --no-cache-dir -c", log, re.M
    )
    assert install and re.search(rf"^#{install[1]} CACHED", log, re.M), "install not from cache"
    built = _built(docker_engine, image, seconds)
    record(cuda_check_build_s=round(seconds, 1), cuda_check_image_mb=round(built.size_mb))
    inspect = json.loads(docker_engine.docker("image", "inspect", image).stdout)[0]
    assert inspect["Config"]["User"] == f"{IMAGE_UID}:{IMAGE_UID}"
    assert inspect["Config"]["Entrypoint"] is None
    assert inspect["Config"]["Cmd"] == ["sftpipe", "--help"]
    checked = docker_engine.docker(
        "run",
        "--rm",
        "--network",
        "none",
        image,
        "sh",
        "-c",
        "pip check && python -c 'import sftpipe.kfp_glue.steps' && id -u",
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout.strip().endswith(str(IMAGE_UID))
    cpu_set = docker_engine.docker("run", "--rm", "--network", "none", IMAGE, "pip", "freeze")
    cuda_set = docker_engine.docker("run", "--rm", "--network", "none", image, "pip", "freeze")
    # The CPU image's pinned set (torch from the same wheel), plus the CUDA-only extras.
    cpu_pins, cuda_pins = set(cpu_set.stdout.split()), set(cuda_set.stdout.split())
    assert cpu_pins <= cuda_pins, cpu_pins - cuda_pins
    assert {p.split("==")[0] for p in cuda_pins - cpu_pins} <= CUDA_ONLY, cuda_pins - cpu_pins
    docker_engine.docker("rmi", image)


def test_failed_build_names_the_step_and_leaves_no_image(docker_engine, base_image, build_image):
    image = f"{REPOSITORY}:broken"
    done = build_image(
        "docker/Dockerfile",
        image,
        "--build-arg",
        f"PYTHON_IMAGE={base_image}",
        # No such torch, and its index a loopback port where nothing listens (the local
        # find-links would otherwise still serve 2.13.0): pip fails inside the build.
        "--build-arg",
        "TORCH_VERSION=0.0.1",
        "--build-arg",
        "TORCH_INDEX_URL=http://127.0.0.1:9/simple",
        timeout=600,
    )
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"sftpipe: error: building {image} from docker/Dockerfile failed at ")
    assert re.search(r"\[builder \d+/\d+\] RUN python3.11 -m venv", last), last
    assert "No matching distribution found for torch==0.0.1" in last, last
    assert "; read " in last, last
    assert docker_engine.docker("image", "inspect", image).returncode != 0
    listed = docker_engine.docker("images", "--format", "{{.Repository}}:{{.Tag}}").stdout
    assert "building" not in listed


def test_unbuildable_base_is_one_line(docker_engine, build_image):
    image = f"{REPOSITORY}:no-base"
    done = build_image(
        "docker/Dockerfile",
        image,
        "--build-arg",
        "PYTHON_IMAGE=sftpipe-test/no-such-base:0",
        timeout=300,
    )
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"sftpipe: error: building {image} from docker/Dockerfile failed at ")
    assert "no-such-base" in last and "read " in last, last
    assert docker_engine.docker("image", "inspect", image).returncode != 0


# ---------------------------------------------------------------------------------------------
# The pipeline in containers


def sftpipe_run(runner, workdir, env, **values):
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in values.items()]
    command = [sys.executable, "-m", "sftpipe.apps.cli", "run", "--runner", runner]
    command += ["--workdir", str(workdir), *flags]
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1500)
    return done, time.perf_counter() - start


def run_env(docker_engine) -> dict[str, str]:
    return {
        **os.environ,
        "DOCKER_HOST": docker_engine.host,
        "SFTPIPE_IMAGE_REPOSITORY": REPOSITORY,
        "SFTPIPE_IMAGE_TAG": TAG,
    }


def test_pipeline_runs_every_step_in_its_container(
    docker_engine, cpu_image, seaweedfs, s3_env, mlflow_env, tiny_model_s3_uri, tmp_path
):
    from mlflow.tracking import MlflowClient

    lines = [json.dumps(row) for row in conversations()] + ['{"broken', '{"messages": []}']
    data_uri, data_digest = upload(seaweedfs, s3_env, "data/chat.jsonl", lines)
    env = run_env(docker_engine)
    names = {
        runner: f"containers-{runner}-{uuid.uuid4().hex[:8]}" for runner in ("docker", "subprocess")
    }
    common = FAST | dict(data_uri=data_uri, base_model=tiny_model_s3_uri)

    done, docker_s = sftpipe_run(
        "docker", tmp_path / "docker", env, model_name=names["docker"], **common
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    done_sub, subprocess_s = sftpipe_run(
        "subprocess", tmp_path / "subprocess", env, model_name=names["subprocess"], **common
    )
    assert done_sub.returncode == 0, (done_sub.stdout + done_sub.stderr)[-3000:]
    record(
        pipeline_docker_runner_s=round(docker_s, 1),
        pipeline_subprocess_runner_s=round(subprocess_s, 1),
    )

    client = MlflowClient()
    versions = {}
    for runner, name in names.items():
        version = client.get_model_version_by_alias(name, "champion")
        assert version.version == "1" and set(version.aliases) == {"champion", "challenger"}
        versions[runner] = version
    tags = versions["docker"].tags
    assert tags["sftpipe.data.input_digest"] == data_digest
    assert tags["sftpipe.data.source"] == data_uri
    assert tags["sftpipe.base_model"] == tiny_model_s3_uri
    assert len(tags["sftpipe.config_digest"]) == 16 and tags["sftpipe.pipeline_run_id"]
    assert tags["sftpipe.code_version"].startswith("0.1.0")
    assert tags["sftpipe.gate"].startswith("passed (tuned vs base): ")

    # The same registered result as the subprocess runner: same code, data, seed and torch
    # build; both sums run in fp32 on this CPU, so only the last bits may differ.
    sub_tags = versions["subprocess"].tags
    for key in ("tuned_validation_loss", "base_validation_loss"):
        assert float(tags[key]) == pytest.approx(float(sub_tags[key]), rel=1e-4), key
    same = ("input_digest", "cleaned_digest", "train_digest", "validation_digest")
    for key in [f"sftpipe.data.{k}" for k in same] + ["sftpipe.base_model_digest"]:
        assert tags[key] == sub_tags[key], key  # the data stages wrote the same bytes
    run = client.get_run(versions["docker"].run_id)
    sub_run = client.get_run(versions["subprocess"].run_id)
    assert run.data.metrics["clean.rows_quarantined"] == 2
    timing = ("second", "_s", "rss", "memory", "_mb", "time", "per_", "rate")
    for key, value in sub_run.data.metrics.items():
        if key.startswith(("clean.", "tokenize.")) and not any(w in key for w in timing):
            assert run.data.metrics.get(key) == pytest.approx(value, rel=1e-4), key

    # Each step ran in a container of the built image, as the image's non-root user.
    image_id = _built(docker_engine, IMAGE, 0).image_id  # the image under the tag now
    containers = {}
    for step in STEPS:
        raw = run.data.tags.get(f"sftpipe.container.{step}")
        assert raw, f"{step}: no container recorded"
        found = json.loads(raw)
        assert found["image"] == f"{IMAGE}@{image_id}", found
        assert re.fullmatch(r"[0-9a-f]{64}", found["container_id"]), found
        assert found["uid"] == IMAGE_UID
        containers[step] = found["container_id"]
    assert len(set(containers.values())) == len(STEPS)  # one container per step
    assert not any(k.startswith("sftpipe.container.") for k in sub_run.data.tags)
    # The containers are gone (removed once their exit code was read).
    left = docker_engine.docker("ps", "-aq").stdout.split()
    assert not any(c.startswith(tuple(left)) for c in containers.values() if left)


def test_failing_step_in_its_container_is_one_line(
    docker_engine, cpu_image, seaweedfs, s3_env, mlflow_env, tiny_model_s3_uri, tmp_path
):
    data_uri, _ = upload(seaweedfs, s3_env, "data/bad.jsonl", ["{nope"] * 5 + ["[1]"])
    done, _ = sftpipe_run(
        "docker",
        tmp_path / "work",
        run_env(docker_engine),
        data_uri=data_uri,
        base_model=tiny_model_s3_uri,
        **FAST,
    )
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"sftpipe: error: [clean] {data_uri}: 6 of 6 rows are bad"), last
    assert f"container image {IMAGE}" in last and "log: " in last, last
    log = Path(last.rsplit("log: ", 1)[1].rstrip(")"))
    assert log.is_file() and "ERROR [clean]" in log.read_text()
    assert "Traceback" not in done.stdout + done.stderr
    assert not list((tmp_path / "work" / "pipeline_root").glob("*/clean/cleaned"))


def test_image_not_built_is_one_line(docker_engine, tmp_path):
    env = run_env(docker_engine) | {"SFTPIPE_IMAGE_TAG": "never-built"}
    done, _ = sftpipe_run("docker", tmp_path / "work", env, data_uri="/nonexistent", **FAST)
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert last == (
        f"sftpipe: error: {REPOSITORY}:never-built: image not built on this engine (no registry "
        "is asked) (build it: `make images`, or set SFTPIPE_IMAGE_REPOSITORY/SFTPIPE_IMAGE_TAG "
        "to one that is (docker/README.md))"
    ), last
