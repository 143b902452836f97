"""The MLflow server of docker/k8s/mlflow, run on this machine exactly as its Deployment says.

The container's command, args and environment are taken from the rendered manifest (the
ConfigMap through envFrom, Secret and ConfigMap keys through valueFrom, `$(VAR)` expanded as
the kubelet does), with the cluster's host names swapped for local servers: a real
PostgreSQL (initdb + pg_ctl on a free port, as the StatefulSet's backend) and the real
SeaweedFS of tests/fixtures (KFP's object store). The init container's bucket script runs
first, also as written. Then the server must answer the way the pipeline steps and the probes
reach it: `/health` under the pod IP without a user, the REST API under the Service's DNS
name only with the admin's user and password (MLflow's basic-auth app, users in the same
PostgreSQL), artifacts proxied into the bucket, runs stored in PostgreSQL, and foreign Host
headers refused. The database password is in the server's environment, not its command line.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from deploy_helpers import K8S, render
from fixtures.postgres import Postgres, postgres_cluster
from fixtures.servers import ServerProcess, free_port

SERVICE_HOST = "mlflow.mlflow.svc.cluster.local:5000"  # MLFLOW_TRACKING_URI of the steps
POD_IP_HOST = "10.244.0.17:5000"  # what the kubelet's probes send


@pytest.fixture(scope="module")
def postgres() -> Iterator[Postgres]:
    """A throwaway PostgreSQL on a free loopback port whose user has a password, as the
    StatefulSet's (as `postgres` when we are root)."""
    with postgres_cluster("mlflow", password=uuid.uuid4().hex) as pg:
        yield pg


def container_env(
    container: dict[str, Any],
    config_maps: dict[str, dict[str, str]],
    secrets: dict[str, dict[str, str]],
) -> dict[str, str]:
    """The environment the kubelet would give the container (envFrom, then env in order)."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(config_maps[source["configMapRef"]["name"]])
        else:
            env.update(secrets[source["secretRef"]["name"]])
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = expand(item["value"], env)
        else:
            ref = item["valueFrom"]
            if "secretKeyRef" in ref:
                env[item["name"]] = secrets[ref["secretKeyRef"]["name"]][ref["secretKeyRef"]["key"]]
            else:
                cm = ref["configMapKeyRef"]
                env[item["name"]] = config_maps[cm["name"]][cm["key"]]
    return env


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' `$(VAR)` expansion in command, args and env values."""
    return re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), text)


def test_mlflow_server_runs_as_deployed(postgres: Postgres, seaweedfs: Any, tmp_path: Path):
    objects = render(K8S / "mlflow")
    (deployment,) = [o for o in objects if o["kind"] == "Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    (server,) = pod["containers"]
    config_maps = {
        o["metadata"]["name"]: dict(o["data"]) for o in objects if o["kind"] == "ConfigMap"
    }
    bucket = f"mlflow-{uuid.uuid4().hex[:8]}"
    cluster_endpoint = config_maps["mlflow-server"]["MLFLOW_S3_ENDPOINT_URL"]
    assert cluster_endpoint == "http://minio-service.kubeflow.svc.cluster.local:9000"
    config_maps["mlflow-server"].update(
        MLFLOW_S3_ENDPOINT_URL=seaweedfs.endpoint_url, MLFLOW_BUCKET=bucket
    )
    admin = ("admin", uuid.uuid4().hex)
    secrets = {  # what docker/scripts/secrets.sh puts in them
        "mlflow-postgres": {"username": postgres.user, "password": postgres.password},
        "mlflow-auth": {
            "admin-username": admin[0],
            "admin-password": admin[1],
            "flask-secret-key": uuid.uuid4().hex,
        },
        "mlflow-s3": {
            "AWS_ACCESS_KEY_ID": seaweedfs.access_key,
            "AWS_SECRET_ACCESS_KEY": seaweedfs.secret_key,
        },
    }
    base = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_"))}
    # As in the image: the venv (mlflow, boto3, psycopg2) first on PATH.
    base["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{base.get('PATH', '')}"

    # The init container: creates the bucket, and is a no-op the second time.
    init_env = {**base, **container_env(init, config_maps, secrets)}
    for expected in ("created", "exists"):
        done = subprocess.run(
            [*init["command"], *init["args"]],
            env=init_env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        assert f"bucket {bucket} {expected}" in done.stdout
    s3 = seaweedfs.client()
    s3.head_bucket(Bucket=bucket)

    env = {**base, **container_env(server, config_maps, secrets), "HOME": str(tmp_path)}
    env["MPLCONFIGDIR"] = str(tmp_path / "matplotlib")
    local_db = f"//127.0.0.1:{postgres.port}/"
    # The ConfigMap mlflow-auth, as mounted at MLFLOW_AUTH_CONFIG_PATH, with the local database.
    (mount,) = [m for m in server["volumeMounts"] if m["name"] == "auth-config"]
    ini = config_maps["mlflow-auth"]["basic_auth.ini"]
    assert env["MLFLOW_AUTH_CONFIG_PATH"] == f"{mount['mountPath']}/basic_auth.ini"
    env["MLFLOW_AUTH_CONFIG_PATH"] = str(tmp_path / "basic_auth.ini")
    Path(env["MLFLOW_AUTH_CONFIG_PATH"]).write_text(
        ini.replace("//mlflow-postgres:5432/", local_db)
    )
    port = free_port()
    argv = [expand(a, env) for a in [*server["command"], *server["args"]]]
    assert postgres.password not in " ".join(argv), "the password is on the command line"
    assert "--app-name=basic-auth" in argv
    argv = [
        a.replace("//mlflow-postgres:5432/", local_db)
        .replace("--host=0.0.0.0", "--host=127.0.0.1")
        .replace("--port=5000", f"--port={port}")
        for a in argv
    ]
    assert argv[:2] == ["mlflow", "server"]
    proc = ServerProcess(
        "MLflow (as deployed)", argv, tmp_path / "mlflow.log", env=env, cwd=tmp_path
    )
    url = f"http://127.0.0.1:{port}"
    try:

        def health() -> bool:
            try:
                probe = server["readinessProbe"]["httpGet"]["path"]
                response = requests.get(url + probe, headers={"Host": POD_IP_HOST}, timeout=2)
                return response.status_code == 200
            except requests.RequestException:
                return False

        proc.wait_until(health, 120, "the readiness probe passes")

        as_steps = {"Host": SERVICE_HOST}
        anonymous = requests.get(
            f"{url}/api/2.0/mlflow/experiments/search?max_results=1", headers=as_steps, timeout=30
        )
        assert anonymous.status_code == 401, anonymous.status_code
        wrong = requests.get(
            f"{url}/api/2.0/mlflow/experiments/search?max_results=1",
            headers=as_steps,
            auth=(admin[0], "not-the-password"),
            timeout=30,
        )
        assert wrong.status_code == 401, wrong.status_code
        created = requests.post(
            f"{url}/api/2.0/mlflow/experiments/create",
            json={"name": "deploy-test"},
            headers=as_steps,
            auth=admin,
            timeout=30,
        )
        assert created.status_code == 200, created.text
        experiment_id = created.json()["experiment_id"]
        experiment = requests.get(
            f"{url}/api/2.0/mlflow/experiments/get",
            params={"experiment_id": experiment_id},
            headers=as_steps,
            auth=admin,
            timeout=30,
        ).json()["experiment"]
        assert experiment["artifact_location"].startswith("mlflow-artifacts:")

        uploaded = requests.put(
            f"{url}/api/2.0/mlflow-artifacts/artifacts/{experiment_id}/r1/artifacts/hello.txt",
            data=b"hello from a pipeline step",
            headers=as_steps,
            auth=admin,
            timeout=30,
        )
        assert uploaded.status_code == 200, uploaded.text
        key = f"artifacts/{experiment_id}/r1/artifacts/hello.txt"
        assert s3.get_object(Bucket=bucket, Key=key)["Body"].read() == b"hello from a pipeline step"

        foreign = requests.get(
            f"{url}/api/2.0/mlflow/experiments/search?max_results=1",
            headers={"Host": "attacker.example.com"},
            auth=admin,
            timeout=30,
        )
        assert foreign.status_code in (400, 403), foreign.status_code

        import psycopg2

        with contextlib.closing(
            psycopg2.connect(
                host="127.0.0.1",
                port=postgres.port,
                user=postgres.user,
                password=postgres.password,
                dbname="mlflow",
            )
        ) as conn:
            cursor = conn.cursor()
            cursor.execute("SELECT name FROM experiments")
            assert "deploy-test" in {row[0] for row in cursor.fetchall()}
            cursor.execute("SELECT username FROM users")  # the auth app's, same database
            assert [row[0] for row in cursor.fetchall()] == [admin[0]]
    finally:
        proc.stop()
        assert "Traceback" not in proc.log_tail(400), proc.log_tail(60)
