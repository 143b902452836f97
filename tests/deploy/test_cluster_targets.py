"""The cluster targets of the Makefile and the scripts behind them (docker/scripts).

No Docker engine or cluster here, so:
- `make -n` shows each target's real commands (docker build, the scripts), which must pass
  `bash -n` and shellcheck, as must every script;
- the scripts are run for real with fakes of docker, kind, kubectl, git and curl first on
  PATH (`kubectl kustomize` goes to the real kubectl). The fakes keep a little state (clusters,
  Secrets, Job status) and log every call, so the tests check what a user's machine would be
  asked to do, in which order, and that a second run reuses what the first one made.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from deploy_helpers import REPO, SCRIPTS, require_tool

TARGETS = ("images", "kind-up", "kind-load", "local-run", "kind-down")
SCRIPT_FILES = sorted(SCRIPTS.glob("*.sh"))


def make_n(target: str) -> list[str]:
    done = subprocess.run(
        ["make", "--no-print-directory", "-n", target],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "MAKEFLAGS": ""},
    )
    assert done.returncode == 0, f"make -n {target}: {done.stderr}"
    return [line for line in done.stdout.splitlines() if line.strip()]


@pytest.mark.parametrize("target", TARGETS)
def test_target_exists_and_runs_real_commands(target: str):
    lines = make_n(target)
    assert lines, f"make {target} does nothing"
    commands = [line for line in lines if not line.lstrip().startswith("#")]
    assert not all(c.lstrip().startswith(("echo", "@echo", "printf")) for c in commands)
    joined = "\n".join(commands)
    expected = {
        "images": [
            r"docker build -f docker/Dockerfile .* -t ghcr.io/sftpipe/sftpipe:\S+ \.$",
            r"docker build -f docker/k8s/mlflow/Dockerfile .* -t "
            r"ghcr.io/sftpipe/sftpipe-mlflow:\S+ \.$",
        ],
        "kind-up": [
            r"docker build -f docker/k8s/mlflow/Dockerfile",
            r"docker/scripts/kind-up\.sh$",
        ],
        "kind-load": [
            r"docker/scripts/kind-load\.sh ghcr.io/sftpipe/sftpipe:\S+ "
            r"ghcr.io/sftpipe/sftpipe-mlflow:\S+$"
        ],
        "local-run": [r"make .*kind-up$", r"make .*kind-load$", r"docker/scripts/local-run\.sh"],
        "kind-down": [r"docker/scripts/kind-down\.sh$"],
    }[target]
    for pattern in expected:
        assert re.search(pattern, joined, re.M), f"make {target}: no command like {pattern}"
    for script in re.findall(r"docker/scripts/[\w-]+\.sh", joined):
        assert os.access(REPO / script, os.X_OK), f"{script} is not executable"


@pytest.mark.parametrize("target", TARGETS)
def test_recipes_are_valid_shell(target: str, tmp_path: Path):
    shellcheck = require_tool("shellcheck")
    recipe = tmp_path / "recipe.sh"
    recipe.write_text("#!/usr/bin/env bash\n" + "\n".join(make_n(target)) + "\n")
    done = subprocess.run(["bash", "-n", str(recipe)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    done = subprocess.run(
        [shellcheck, "-s", "bash", "-e", "SC2046", str(recipe)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout


def test_scripts_pass_shellcheck():
    shellcheck = require_tool("shellcheck")
    done = subprocess.run(
        [shellcheck, "-x", *map(str, SCRIPT_FILES)], capture_output=True, text=True, cwd=REPO
    )
    assert done.returncode == 0, done.stdout
    for script in SCRIPT_FILES:
        text = script.read_text()
        if script.name == "common.sh":
            assert "set -euo pipefail" in text
            continue
        assert os.access(script, os.X_OK), script.name
        assert text.startswith("#!/usr/bin/env bash\n"), script.name
        assert 'source "$(dirname "${BASH_SOURCE[0]}")/common.sh"' in text, script.name
        # kubectl only through k(), which pins the context (render() only runs kustomize).
        bare = re.search(r"^\s*kubectl\b(?! --context)", text, re.M)
        assert not bare, f"{script.name} calls kubectl without the context"


# ---------------------------------------------------------------------------------------------
# The scripts, run with fake tools

FAKE = r'''#!PYTHON
"""A fake of docker/kind/kubectl/git/curl/sftpipe: logs the call, answers from state.json."""
import base64, fcntl, json, os, subprocess, sys
from pathlib import Path

tool, args = Path(sys.argv[0]).name, sys.argv[1:]
home = Path(os.environ["FAKE_HOME"])
stdin = sys.stdin.read() if "-f" in args and "-" in args else ""
lock = open(home / "state.lock", "w")  # pipes run two fakes at once: one at a time
fcntl.flock(lock, fcntl.LOCK_EX)
state = json.loads((home / "state.json").read_text())
entry = {"tool": tool, "args": args}
if stdin:
    entry["applied"] = [
        line.split(":", 1)[1].strip() for line in stdin.splitlines() if line.startswith("kind:")
    ]
    entry["images"] = [
        line.split(":", 1)[1].strip()
        for line in stdin.splitlines()
        if line.strip().startswith("image:")
    ]
    if "Job" in entry["applied"]:
        state["job"] = "1"  # the Job "runs" at once
if tool == "sftpipe":
    entry["env"] = {k: os.environ.get(k) for k in ("SFTPIPE_IMAGE_REPOSITORY", "SFTPIPE_IMAGE_TAG")}
for arg in args:
    if arg.startswith("--from-env-file="):
        entry["env_file"] = Path(arg.split("=", 1)[1]).read_text()
with open(home / "calls.jsonl", "a") as log:
    log.write(json.dumps(entry) + "\n")
code, out = 0, ""
if tool == "kind":
    if args[:2] == ["get", "clusters"]:
        out = "\n".join(state["clusters"])
    elif args[:2] == ["create", "cluster"]:
        state["clusters"].append(args[args.index("--name") + 1])
    elif args[:2] == ["delete", "cluster"]:
        state["clusters"].remove(args[args.index("--name") + 1])
elif tool == "docker" and args[:2] == ["image", "inspect"]:
    code = 0 if args[2] in state["images"] else 1
elif tool == "kubectl":
    if "kustomize" in args:
        done = subprocess.run([os.environ["REAL_KUBECTL"], *args[args.index("kustomize"):]])
        sys.exit(done.returncode)
    if "get" in args and "secret" in args:
        name = args[args.index("secret") + 1]
        if name == "mlpipeline-minio-artifact":
            key = "accesskey" if "accesskey" in " ".join(args) else "secretkey"
            out = base64.b64encode(("kfp-" + key).encode()).decode()
        else:
            code = 0 if name in state["secrets"] else 1
    elif "get" in args and "job" in args:
        out = state["job"] if "succeeded" in " ".join(args) else ""
    elif "create" in args and "secret" in args:
        state["secrets"].append(args[args.index("generic") + 1])
        out = "kind: Secret\n"
    elif "create" in args and "namespace" in args:
        out = "kind: Namespace\n"
(home / "state.json").write_text(json.dumps(state))
if out:
    print(out)
sys.exit(code)
'''


class Fakes:
    def __init__(self, tmp_path: Path) -> None:
        self.home = tmp_path
        self.bin = tmp_path / "bin"
        self.bin.mkdir()
        fake = self.bin / "fake"
        fake.write_text(FAKE.replace("PYTHON", sys.executable, 1))
        fake.chmod(0o755)
        for tool in ("docker", "kind", "kubectl", "git", "curl", "sftpipe"):
            (self.bin / tool).symlink_to(fake)
        self.state({"clusters": [], "images": [], "secrets": [], "job": ""})

    def state(self, value: dict[str, Any] | None = None) -> dict[str, Any]:
        path = self.home / "state.json"
        if value is not None:
            path.write_text(json.dumps(value))
        return json.loads(path.read_text())

    def run(self, script: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        (self.home / "calls.jsonl").write_text("")
        environment = {
            "PATH": f"{self.bin}:/usr/bin:/bin",
            "HOME": str(self.home),
            "FAKE_HOME": str(self.home),
            "REAL_KUBECTL": require_tool("kubectl"),
            "SFTPIPE": str(self.bin / "sftpipe"),
            **env,
        }
        return subprocess.run(
            [str(SCRIPTS / script), *args],
            capture_output=True,
            text=True,
            env=environment,
            timeout=120,
        )

    def calls(self) -> list[dict[str, Any]]:
        text = (self.home / "calls.jsonl").read_text()
        return [json.loads(line) for line in text.splitlines()]

    def commands(self) -> list[str]:
        return [" ".join([c["tool"], *c["args"]]) for c in self.calls()]


@pytest.fixture
def fakes(tmp_path: Path) -> Fakes:
    if not shutil.which("bash"):
        pytest.skip("bash is not installed")
    return Fakes(tmp_path)


def index(commands: list[str], pattern: str) -> int:
    for i, command in enumerate(commands):
        if re.search(pattern, command):
            return i
    raise AssertionError(f"no call like {pattern!r} in:\n" + "\n".join(commands))


def env_files(calls: list[dict[str, Any]]) -> dict[str, str]:
    """Secret name -> the env file it was created from."""
    return {
        c["args"][c["args"].index("generic") + 1]: c["env_file"] for c in calls if "env_file" in c
    }


def test_kind_up_installs_in_order_and_reuses_the_cluster(fakes: Fakes):
    mlflow_image = "ghcr.io/sftpipe/sftpipe-mlflow:0.1.0"
    done = fakes.run("kind-up.sh")
    assert done.returncode == 1 and "make images-mlflow" in done.stderr  # image not built
    fakes.state({**fakes.state(), "images": [mlflow_image]})

    done = fakes.run("kind-up.sh")
    assert done.returncode == 0, done.stderr
    c = fakes.commands()
    ctx = "kubectl --context kind-sftpipe"
    steps = [
        r"^kind create cluster --name sftpipe --config \S+/docker/kind/cluster\.yaml",
        rf"^{ctx} apply -k \S+/docker/k8s/kfp/cluster-scoped$",
        rf"^{ctx} wait --for condition=established .*crd/applications\.app\.k8s\.io",
        rf"^{ctx} apply -k \S+/docker/k8s/kfp/platform$",
        rf"^kind load docker-image --name sftpipe {mlflow_image}$",
        rf"^{ctx} -n mlflow create secret generic mlflow-postgres",
        rf"^{ctx} -n kubeflow create secret generic sftpipe-s3",
        r"^kubectl kustomize \S+/docker/k8s/overlays/kind$",
        rf"^{ctx} -n kubeflow wait --for=condition=Available deployment --all",
        rf"^{ctx} -n mlflow rollout status deployment/mlflow",
    ]
    positions = [index(c, step) for step in steps]
    assert positions == sorted(positions), "kind-up runs its steps out of order"
    (overlay,) = [
        i for i, call in enumerate(fakes.calls()) if "StatefulSet" in call.get("applied", [])
    ]
    assert positions[-3] < overlay < positions[-2], "the overlay is not applied after the secrets"
    applied = set(fakes.calls()[overlay]["applied"])
    assert {"StatefulSet", "Deployment", "NetworkPolicy", "ConfigMap", "Namespace"} <= applied
    assert "http://localhost:8080" in done.stdout and "http://localhost:5080" in done.stdout
    secrets = env_files(fakes.calls())
    assert re.fullmatch(r"username=mlflow\npassword=[0-9a-f]{32}\n", secrets["mlflow-postgres"])
    assert secrets["sftpipe-s3"] == (
        "AWS_ACCESS_KEY_ID=kfp-accesskey\nAWS_SECRET_ACCESS_KEY=kfp-secretkey\n"
    )

    again = fakes.run("kind-up.sh")  # idempotent: no new cluster, the password is kept
    assert again.returncode == 0, again.stderr
    c = fakes.commands()
    assert not any(x.startswith("kind create") for x in c)
    assert not any("create secret generic mlflow-postgres" in x for x in c)
    assert "kind cluster sftpipe is up" in again.stderr


def test_secrets_take_given_s3_keys_for_an_existing_cluster(fakes: Fakes):
    done = fakes.run(
        "secrets.sh", KUBE_CONTEXT="prod", S3_ACCESS_KEY_ID="AK", S3_SECRET_ACCESS_KEY="SK"
    )
    assert done.returncode == 0, done.stderr
    calls = fakes.calls()
    assert all(c["args"][:2] == ["--context", "prod"] for c in calls if c["tool"] == "kubectl")
    made = env_files(calls)
    assert made["mlflow-s3"] == made["sftpipe-s3"]
    assert made["sftpipe-s3"] == "AWS_ACCESS_KEY_ID=AK\nAWS_SECRET_ACCESS_KEY=SK\n"
    assert not any("mlpipeline-minio-artifact" in " ".join(c["args"]) for c in calls)
    assert "AK" not in " ".join(" ".join(c["args"]) for c in calls), "a key on a command line"


def test_kind_load_and_local_run_and_kind_down(fakes: Fakes):
    images = ["ghcr.io/sftpipe/sftpipe:0.1.0", "ghcr.io/sftpipe/sftpipe-mlflow:0.1.0"]
    done = fakes.run("kind-load.sh", *images)
    assert done.returncode == 1 and "make kind-up" in done.stderr  # no cluster yet
    fakes.state({**fakes.state(), "clusters": ["sftpipe"], "images": images})
    done = fakes.run("kind-load.sh", *images)
    assert done.returncode == 0, done.stderr
    assert [c for c in fakes.commands() if c.startswith("kind load")] == [
        f"kind load docker-image --name sftpipe {image}" for image in images
    ]

    fakes.state({**fakes.state(), "job": "1"})  # demo data uploaded before: reused
    done = fakes.run("local-run.sh", "--wait")
    assert done.returncode == 0, done.stderr
    c = fakes.commands()
    assert not any("apply -f -" in x for x in c), "the finished demo Job was recreated"
    compile_call = c[index(c, r"^sftpipe compile ")]
    for flag in ("--no-gpu", "--image-pull-policy IfNotPresent", "--memory-request finetune="):
        assert flag in compile_call
    submit = c[index(c, r"^sftpipe submit ")]
    assert "--host http://localhost:8080" in submit and submit.endswith("--wait")
    assert "--param data_uri=s3://sftpipe/demo/chat.jsonl" in submit
    assert (
        index(c, "^sftpipe compile")
        < index(c, "^curl .*/apis/v2beta1/healthz")
        < index(c, "^sftpipe submit")
    )

    fakes.state({**fakes.state(), "job": ""})  # not done yet: (re)created and waited for
    fakes.run("local-run.sh")
    c = fakes.commands()
    assert index(c, "delete job sftpipe-demo-data --ignore-not-found") < index(c, "apply -f -")
    job_calls = [call for call in fakes.calls() if call.get("applied")]
    assert {"Job", "ConfigMap"} <= set(job_calls[0]["applied"])

    assert fakes.run("kind-down.sh").returncode == 0
    assert fakes.commands()[-1] == "kind delete cluster --name sftpipe"
    again = fakes.run("kind-down.sh")
    assert again.returncode == 0 and "no kind cluster" in again.stderr
    assert not any(x.startswith("kind delete") for x in fakes.commands())


def test_images_built_under_other_names_are_swapped_in(fakes: Fakes):
    image = "registry.local:5000/team/sft:abc"
    fakes.state({**fakes.state(), "clusters": ["sftpipe"], "job": ""})
    done = fakes.run("local-run.sh", SFTPIPE_IMAGE=image)
    assert done.returncode == 0, done.stderr
    (job,) = [c for c in fakes.calls() if "Job" in c.get("applied", [])]
    assert job["images"] == [image]
    compile_call = next(c for c in fakes.calls() if c["args"][:1] == ["compile"])
    assert compile_call["env"] == {
        "SFTPIPE_IMAGE_REPOSITORY": "registry.local:5000/team/sft",
        "SFTPIPE_IMAGE_TAG": "abc",
    }
