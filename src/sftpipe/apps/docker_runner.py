"""`sftpipe run --runner docker`: every step in its container image, on KFP's DockerRunner.

The pipeline is the one `sftpipe run` runs; each task starts a container of its component's
image (`sftpipe.components.images`: SFTPIPE_IMAGE_REPOSITORY / SFTPIPE_IMAGE_TAG) on the
engine that DOCKER_HOST names, with:
- host networking: MLflow and S3 on this machine's loopback are reached as they are;
- the work folder (pipeline root, SQLite MLflow store, error file) and the local data and
  model folders of the run bind-mounted at their own paths (the inputs read-only);
- the image's own non-root user (uid 10001, group 0) when this process is root, else this
  process's uid with group 0 (the image's home is group-0 writable): files written into the
  work folder stay this user's to read and delete;
- the environment that tracking and storage read (MLFLOW_*, AWS_*, SFTPIPE_*, offline switches)
  and SFTPIPE_CONTAINER_IMAGE (the image reference and id), which each step records.

Two gaps of KFP 2.17's DockerRunner are closed here: it pulls an image it does not find (no
registry answers offline; a missing image is one line saying how to build it), and it removes
the container as it exits, so a step whose container is gone before its exit code is read
counts as succeeded: containers are removed only after their exit code was read.
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path
from typing import Any

from sftpipe.errors import SftpipeError
from sftpipe.kfp_glue.container import IMAGE_ENV

IMAGE_USER = 10001  # docker/Dockerfile's user
PASSED_PREFIXES = ("MLFLOW_", "AWS_", "SFTPIPE_")
PASSED_NAMES = (
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "HF_HUB_DISABLE_TELEMETRY",
    "DO_NOT_TRACK",
    "TOKENIZERS_PARALLELISM",
)
# Paths on this machine that mean nothing in the container.
NOT_PASSED = ("AWS_CA_BUNDLE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE")


def engine() -> Any:
    """A client of the engine DOCKER_HOST names, or one line saying how to start one."""
    import docker

    host = os.environ.get("DOCKER_HOST", "the default socket")
    try:
        client = docker.from_env()
        client.ping()
    except Exception as exc:  # docker raises DockerException subclasses and requests errors
        raise SftpipeError(
            "docker",
            f"no Docker engine answers at {host} ({type(exc).__name__})",
            "start one: `make engine-up` and export the DOCKER_HOST it prints",
        ) from None
    return client


def image_id(client: Any, image: str) -> str | None:
    import docker

    try:
        return client.images.get(image).id
    except docker.errors.ImageNotFound:
        return None


def container_environment(image_ref: str) -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if (key.startswith(PASSED_PREFIXES) or key in PASSED_NAMES) and key not in NOT_PASSED
    }
    env[IMAGE_ENV] = image_ref
    return env


def local_folders(values: dict[str, Any]) -> list[Path]:
    """The local files and folders a run reads (data, base model): mounted read-only."""
    found = []
    for key in ("data_uri", "base_model", "checkpoint_uri"):
        value = str(values.get(key) or "")
        if value and "://" not in value and Path(value).exists():
            found.append(Path(value).resolve())
    return found


def run_user() -> str:
    uid = os.getuid()
    return f"{uid if uid != 0 else IMAGE_USER}:0"


def _readable_by(path: Path, uid: int) -> bool:
    """Whether a process of `uid` and group 0 (the containers' user) may read `path`."""
    st = path.stat()
    need = (stat.S_IRUSR | stat.S_IXUSR) if path.is_dir() else stat.S_IRUSR
    if st.st_uid == uid:
        return st.st_mode & need == need
    if st.st_gid == 0:
        return st.st_mode & (need >> 3) == need >> 3
    return st.st_mode & (need >> 6) == need >> 6


def make_readable(inputs: list[Path], cache: Path) -> None:
    """The containers' user must read the run's local inputs. Files sftpipe made itself (the
    demo's converted model and data in its cache; `save_pretrained` writes weights 0600) are
    opened to group 0; anything else that is not readable is one line saying what to do."""
    uid = int(run_user().split(":")[0])
    for root in inputs:
        for path in [root, *(root.rglob("*") if root.is_dir() else [])]:
            if _readable_by(path, uid):
                continue
            if cache in path.parents and path.stat().st_gid == 0:
                path.chmod(
                    path.stat().st_mode | (stat.S_IRGRP | (stat.S_IXGRP if path.is_dir() else 0))
                )
                continue
            # Group 0 is the containers' group: for a file of group 0 its group bits decide.
            bits = "g+r" if path.stat().st_gid == 0 else "o+r"
            raise SftpipeError(
                str(path),
                f"not readable by the containers' user (uid {uid}, group 0)",
                f"chmod {bits}{'X' if path.is_dir() else ''} it, or put it on S3",
            )


def share_with_group(workdir: Path) -> None:
    """Let the containers' group 0 write the work folder's top-level files and folders that this
    (root) process made: the pipeline root, the SQLite store, the logs."""
    if os.getuid() != 0:
        return
    for path in [workdir, *workdir.iterdir()]:
        if path.is_dir() or path.suffix in (".db", ".txt"):
            path.chmod(path.stat().st_mode | stat.S_IRWXG)


def make_runner(
    workdir: Path,
    pipeline_root: Path,
    values: dict[str, Any],
    cache: Path,
    announce: Any = print,
) -> tuple[Any, str]:
    """A kfp.local.DockerRunner for this run, and where its steps run (for error lines).
    Checks the engine and the image first. `cache` is `sftpipe run`'s cache folder (passed
    in: apps.local imports this module)."""
    from docker.types import Mount
    from kfp import local

    from sftpipe.components.images import CPU_IMAGE

    client = engine()
    cpu_id = image_id(client, CPU_IMAGE)
    client.close()
    if cpu_id is None:
        raise SftpipeError(
            CPU_IMAGE,
            "image not built on this engine (no registry is asked)",
            "build it: `make images`, or set SFTPIPE_IMAGE_REPOSITORY/SFTPIPE_IMAGE_TAG to one "
            "that is (docker/README.md)",
        )
    install_container_launcher(CPU_IMAGE)
    # Made here, not by the engine: a bind-mount source that does not exist is created root-only.
    pipeline_root.mkdir(parents=True, exist_ok=True)
    share_with_group(workdir)
    inputs = [p for p in local_folders(values) if workdir not in p.parents and p != workdir]
    make_readable(inputs, cache.resolve())
    mounts = [Mount(str(workdir), str(workdir), type="bind")]
    mounts += [Mount(str(p), str(p), type="bind", read_only=True) for p in inputs]
    announce(f"[sftpipe] docker runner: steps run in {CPU_IMAGE} ({cpu_id[7:19]}), host network")
    runner = local.DockerRunner(
        network_mode="host",
        user=run_user(),
        mounts=mounts,
        environment=container_environment(f"{CPU_IMAGE}@{cpu_id}"),
    )
    return runner, f"container image {CPU_IMAGE}"


def install_container_launcher(fallback_image: str) -> None:
    """Replace KFP's container launch (see the module docstring). A component image that is not
    on the engine, such as finetune's CUDA image on a machine without one, runs in
    `fallback_image` (the local runner gives containers no GPU anyway), said on the console."""
    from kfp.local import docker_task_handler as handler

    def run_container(
        client: Any, image: str, command: list[str], volumes: dict[str, Any], **run_args: Any
    ) -> int:
        import docker

        chosen = image if ":" in image.rsplit("/", 1)[-1] else f"{image}:latest"
        if image_id(client, chosen) is None:
            if image_id(client, fallback_image) is None:
                raise SftpipeError(chosen, "image not built on this engine", "make images")
            print(f"[sftpipe] {chosen} is not on this engine: running in {fallback_image}")
            chosen = fallback_image
            env = dict(run_args.get("environment") or {})
            env[IMAGE_ENV] = f"{fallback_image}@{image_id(client, fallback_image)}"
            run_args["environment"] = env
        container = client.containers.run(
            image=chosen,
            command=command,
            detach=True,
            volumes=volumes,
            auto_remove=False,
            **run_args,
        )
        try:
            for chunk in container.logs(stream=True, follow=True):
                print(chunk.decode(errors="replace"), end="")
            code = int(container.wait()["StatusCode"])
            if code != 0:
                print(f"[sftpipe] container {container.short_id} of {chosen} exited with {code}")
            return code
        finally:
            with contextlib.suppress(docker.errors.APIError):
                container.remove(force=True)

    handler.run_docker_container = run_container
