"""Static checks of the cluster services in docker/k8s (MLflow + PostgreSQL, the pipeline's
settings in KFP's namespace, the kind overlay, the demo-data Job) and of the KFP pin.

Every local kustomization is rendered with `kubectl kustomize` (offline) and every object is
validated against the Kubernetes OpenAPI schemas of the kind node's version and of the newest
version `kubernetes-validate` knows, strictly (unknown fields fail). The KFP install itself
comes from the official manifests on GitHub at a pinned release: it cannot render here, so
the tests check that the pin is one version, used everywhere, and the same as the kfp SDK's.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from deploy_helpers import (
    K8S,
    KIND_CONFIG,
    REMOTE,
    REPO,
    SCRIPTS,
    containers,
    kind_node_minor,
    kustomizations,
    pod_spec,
    render,
    require_tool,
)
from sftpipe.pipelines import cluster

FOLDERS = kustomizations()
IDS = [str(f.relative_to(K8S)) for f in FOLDERS]
OVERLAYS = {name: K8S / "overlays" / name for name in ("kind", "cluster")}
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
MLFLOW_IMAGE = f"ghcr.io/sftpipe/sftpipe-mlflow:{VERSION}"
STEP_IMAGE = f"ghcr.io/sftpipe/sftpipe:{VERSION}"
# The Secrets the manifests may reference; docker/scripts/secrets.sh makes exactly these.
SECRETS = {("mlflow", "mlflow-postgres"), ("mlflow", "mlflow-s3"), ("kubeflow", "sftpipe-s3")}
SECRETISH = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY|CREDENTIAL", re.I)


def constraint(name: str) -> str:
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line.lower().startswith(name.lower() + "=="):
            return line.split("==", 1)[1]
    raise AssertionError(f"{name} is not pinned in constraints.txt")


def everything() -> list[dict[str, Any]]:
    """The objects `make local-run` applies from this repository: kind overlay + demo."""
    return render(OVERLAYS["kind"]) + render(K8S / "demo")


def test_every_folder_is_a_kustomization():
    assert {"mlflow", "kfp-env", "demo", "overlays/kind", "overlays/cluster"} <= set(IDS)
    for folder in K8S.rglob("*"):
        if folder.is_dir() and any(folder.glob("*.yaml")):
            assert (folder / "kustomization.yaml").exists(), f"{folder} has no kustomization"


@pytest.mark.parametrize("folder", FOLDERS, ids=IDS)
def test_renders_and_validates_against_the_kubernetes_schemas(folder: Path):
    objects = render(folder)
    assert objects, f"{folder} renders nothing"
    versions = {f"{kind_node_minor()}.0", kubernetes_validate.latest_version()}
    for obj in objects:
        name = f"{obj['kind']}/{obj['metadata']['name']}"
        for version in sorted(versions):
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{folder.relative_to(K8S)}: {name} invalid for {version}: {exc}")


@pytest.mark.parametrize("folder", FOLDERS, ids=IDS)
def test_workloads_run_as_non_root_with_requests_and_pinned_images(folder: Path):
    for obj in render(folder):
        spec = pod_spec(obj)
        if spec is None:
            continue
        pod_ctx = spec.get("securityContext", {})
        assert spec.get("automountServiceAccountToken") is False, obj["metadata"]["name"]
        assert pod_ctx.get("seccompProfile", {}).get("type") == "RuntimeDefault"
        for c in containers(spec):
            where = f"{obj['kind']}/{obj['metadata']['name']}/{c['name']}"
            ctx = {**pod_ctx, **c.get("securityContext", {})}
            assert ctx.get("runAsNonRoot") is True, f"{where}: not runAsNonRoot"
            assert ctx.get("runAsUser", 0) > 0, f"{where}: no non-root runAsUser"
            assert ctx.get("allowPrivilegeEscalation") is False, where
            assert ctx.get("capabilities", {}).get("drop") == ["ALL"], where
            requests = c.get("resources", {}).get("requests", {})
            assert {"cpu", "memory"} <= set(requests), f"{where}: no cpu/memory requests"
            assert "memory" in c["resources"].get("limits", {}), f"{where}: no memory limit"
            image = c["image"]
            tag = image.rsplit("/", 1)[-1].partition(":")[2]
            assert tag and tag != "latest", f"{where}: image {image} is not pinned"


def test_no_secret_values_in_the_manifests():
    for folder in FOLDERS:
        for obj in render(folder):
            assert obj["kind"] != "Secret", f"{folder}: a Secret is committed"
            if obj["kind"] == "ConfigMap":
                for key in obj.get("data", {}):
                    assert not SECRETISH.search(key) or key == "MLFLOW_SERVER_ALLOWED_HOSTS", key
            spec = pod_spec(obj)
            for c in containers(spec) if spec else []:
                for env in c.get("env", []):
                    if SECRETISH.search(env["name"]):
                        assert "value" not in env, f"{env['name']} inlined in {folder}"
                        assert "secretKeyRef" in env.get("valueFrom", {}), env["name"]


def _refs(obj: dict[str, Any], kind: str) -> set[tuple[str, str]]:
    """(namespace, name) of every Secret or ConfigMap a workload reads."""
    spec = pod_spec(obj)
    if spec is None:
        return set()
    ns = obj["metadata"]["namespace"]
    key_ref, from_ref, volume = {
        "Secret": ("secretKeyRef", "secretRef", "secret"),
        "ConfigMap": ("configMapKeyRef", "configMapRef", "configMap"),
    }[kind]
    names: set[str] = set()
    for c in containers(spec):
        names |= {
            e["valueFrom"][key_ref]["name"]
            for e in c.get("env", [])
            if key_ref in e.get("valueFrom", {})
        }
        names |= {e[from_ref]["name"] for e in c.get("envFrom", []) if from_ref in e}
    for v in spec.get("volumes", []):
        if volume in v:
            names.add(v[volume].get("name") or v[volume].get("secretName"))
    return {(ns, n) for n in names}


def test_secret_and_config_map_references_resolve():
    objects = everything()
    config_maps = {
        (o["metadata"]["namespace"], o["metadata"]["name"]): o.get("data", {})
        for o in objects
        if o["kind"] == "ConfigMap"
    }
    secrets_used: set[tuple[str, str]] = set()
    for obj in objects:
        secrets_used |= _refs(obj, "Secret")
        for ref in _refs(obj, "ConfigMap"):
            assert ref in config_maps, f"{obj['metadata']['name']} reads missing ConfigMap {ref}"
        spec = pod_spec(obj)
        for c in containers(spec) if spec else []:
            for env in c.get("env", []):
                ref = env.get("valueFrom", {}).get("configMapKeyRef")
                if ref:
                    key = (obj["metadata"]["namespace"], ref["name"])
                    assert ref["key"] in config_maps[key], f"{ref['name']} has no {ref['key']}"
    assert secrets_used == SECRETS
    script = (SCRIPTS / "secrets.sh").read_text()
    made = set(re.findall(r"put_secret (\S+) (\S+) ", script))
    assert made == SECRETS, "docker/scripts/secrets.sh does not make exactly the Secrets used"


def test_services_select_pods_that_exist():
    objects = everything()
    pods = [
        (o["metadata"]["namespace"], o["spec"]["template"]["metadata"]["labels"])
        for o in objects
        if pod_spec(o) is not None and o["kind"] != "Job"
    ]
    upstream = {("kubeflow", "ml-pipeline-ui-nodeport")}  # selects KFP's own UI pods
    for svc in (o for o in objects if o["kind"] == "Service"):
        key = (svc["metadata"]["namespace"], svc["metadata"]["name"])
        if key in upstream:
            assert svc["spec"]["selector"] == {"app": "ml-pipeline-ui"}
            continue
        selector = svc["spec"]["selector"].items()
        assert any(ns == key[0] and selector <= labels.items() for ns, labels in pods), key


def test_mlflow_server_serves_postgres_and_proxied_s3_artifacts():
    (deploy,) = [o for o in render(K8S / "mlflow") if o["kind"] == "Deployment"]
    (server,) = deploy["spec"]["template"]["spec"]["containers"]
    args = server["command"] + server["args"]
    assert args[:2] == ["mlflow", "server"]
    options = dict(a.split("=", 1) for a in args if a.startswith("--") and "=" in a)
    assert options["--backend-store-uri"].startswith("postgresql+psycopg2://")
    assert "$(POSTGRES_PASSWORD)" in options["--backend-store-uri"]
    assert re.fullmatch(r"s3://\$\(MLFLOW_BUCKET\)/\w+", options["--artifacts-destination"])
    assert "--serve-artifacts" in args
    env_names = {e["name"] for e in server["env"]}
    for var in re.findall(r"\$\((\w+)\)", " ".join(args)):
        assert var in env_names, f"$({var}) is not defined in env (Kubernetes would not expand it)"
    port = server["ports"][0]["name"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert server[probe]["httpGet"] == {"path": "/health", "port": port}, probe
    (postgres,) = [o for o in render(K8S / "mlflow") if o["kind"] == "StatefulSet"]
    pg = postgres["spec"]["template"]["spec"]["containers"][0]
    assert "pg_isready" in " ".join(pg["readinessProbe"]["exec"]["command"])
    assert "pg_isready" in " ".join(pg["livenessProbe"]["exec"]["command"])
    claim = postgres["spec"]["volumeClaimTemplates"][0]
    assert claim["metadata"]["name"] in {m["name"] for m in pg["volumeMounts"]}
    assert {
        p["port"]
        for p in next(
            o
            for o in render(K8S / "mlflow")
            if o["metadata"]["name"] == "mlflow" and o["kind"] == "Service"
        )["spec"]["ports"]
    } == {5000}


def test_pipeline_settings_match_what_compile_references():
    env = next(o for o in render(K8S / "kfp-env") if o["kind"] == "ConfigMap")
    options = cluster.ClusterOptions()
    assert env["metadata"] == {**env["metadata"], "name": options.env_config_map}
    assert env["metadata"]["namespace"] == "kubeflow"
    assert set(cluster.ENV_REQUIRED_KEYS) <= set(env["data"])
    assert set(env["data"]) <= set(cluster.ENV_REQUIRED_KEYS) | set(cluster.ENV_OPTIONAL_KEYS)
    assert env["data"]["MLFLOW_TRACKING_URI"] == "http://mlflow.mlflow.svc.cluster.local:5000"
    assert ("kubeflow", options.s3_secret) in SECRETS
    config = next(o for o in render(K8S / "mlflow") if o["kind"] == "ConfigMap")
    hosts = config["data"]["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")
    assert "mlflow.mlflow.svc.cluster.local:*" in hosts


def test_kind_ports_and_urls_agree():
    kind = yaml.safe_load(KIND_CONFIG.read_text())
    (node,) = kind["nodes"]
    mappings = {m["containerPort"]: m for m in node["extraPortMappings"]}
    node_ports = {
        o["metadata"]["name"]: o["spec"]["ports"][0]["nodePort"]
        for o in render(OVERLAYS["kind"])
        if o["kind"] == "Service" and o["spec"].get("type") == "NodePort"
    }
    assert node_ports == {"ml-pipeline-ui-nodeport": 30080, "mlflow-nodeport": 30500}
    common = (SCRIPTS / "common.sh").read_text()
    for service, url_var in (
        ("ml-pipeline-ui-nodeport", "KFP_URL"),
        ("mlflow-nodeport", "MLFLOW_URL"),
    ):
        mapping = mappings[node_ports[service]]
        assert mapping["listenAddress"] == "127.0.0.1"
        assert f'{url_var}="http://localhost:{mapping["hostPort"]}"' in common
    assert kind["name"] == "sftpipe"


def test_images_are_the_ones_make_builds():
    images = {c["image"] for o in everything() if pod_spec(o) for c in containers(pod_spec(o))}
    assert {MLFLOW_IMAGE, STEP_IMAGE} <= images
    common = (SCRIPTS / "common.sh").read_text()
    assert 'DEFAULT_SFTPIPE_IMAGE="ghcr.io/sftpipe/sftpipe:$VERSION"' in common
    assert 'DEFAULT_MLFLOW_IMAGE="ghcr.io/sftpipe/sftpipe-mlflow:$VERSION"' in common
    cluster_images = yaml.safe_load((OVERLAYS["cluster"] / "kustomization.yaml").read_text())
    assert cluster_images["images"][0]["newTag"] == VERSION


def test_mlflow_dockerfile_passes_hadolint(tmp_path: Path):
    hadolint = require_tool("hadolint")
    done = subprocess.run(
        [hadolint, "--format", "json", "--no-color", str(K8S / "mlflow" / "Dockerfile")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"HOME": str(tmp_path), "PATH": os.environ.get("PATH", ""), "NO_COLOR": "1"},
        timeout=60,
    )
    findings = json.loads(done.stdout or "[]")
    assert not findings, findings
    assert "hadolint ignore" not in (K8S / "mlflow" / "Dockerfile").read_text()


def test_mlflow_image_pins_the_constraints():
    dockerfile = (K8S / "mlflow" / "Dockerfile").read_text()
    pins = dict(re.findall(r"\b(mlflow|boto3|psycopg2-binary)==([\w.]+)", dockerfile))
    assert set(pins) == {"mlflow", "boto3", "psycopg2-binary"}
    for name, version in pins.items():
        assert version == constraint(name), f"{name}=={version} differs from constraints.txt"
    assert "-c constraints.txt" in dockerfile
    assert re.search(r"^USER 10001:10001$", dockerfile, re.M)
    (deploy,) = [o for o in render(K8S / "mlflow") if o["kind"] == "Deployment"]
    assert deploy["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == 10001


def test_kfp_release_is_pinned_once_and_matches_the_sdk():
    refs = {}
    for path in sorted(REMOTE.rglob("kustomization.yaml")):
        (resource,) = yaml.safe_load(path.read_text())["resources"]
        match = re.fullmatch(
            r"https://github\.com/kubeflow/pipelines//manifests/kustomize/"
            r"(cluster-scoped-resources|env/platform-agnostic)\?ref=(\S+)",
            resource,
        )
        assert match, f"{path}: unexpected KFP resource {resource}"
        refs[match.group(1)] = match.group(2)
    assert set(refs) == {"cluster-scoped-resources", "env/platform-agnostic"}
    (release,) = set(refs.values())
    assert release == constraint("kfp") == constraint("kfp-server-api")
    # Nothing else names another KFP release: scripts use these folders, the docs this version.
    texts = [REPO / "README.md", REPO / "Makefile", *SCRIPTS.glob("*.sh")]
    for path in texts:
        for ref in re.findall(r"kubeflow/pipelines\S*\?ref=([\w.\-]+)", path.read_text()):
            assert ref == release, f"{path.name} refers to KFP {ref}, not {release}"
    readme = (REPO / "README.md").read_text()
    assert f"Kubeflow Pipelines {release}" in readme
    kind_up = (SCRIPTS / "kind-up.sh").read_text()
    assert 'apply -k "$K8S_DIR/kfp/cluster-scoped"' in kind_up
    assert 'apply -k "$K8S_DIR/kfp/platform"' in kind_up
    assert "crd/applications.app.k8s.io" in kind_up


def test_demo_job_uploads_with_the_pipeline_settings():
    objects = render(K8S / "demo")
    (job,) = [o for o in objects if o["kind"] == "Job"]
    (c,) = job["spec"]["template"]["spec"]["containers"]
    assert c["command"][:2] == ["python3", "/scripts/upload_demo.py"]
    assert {"sftpipe-env", "sftpipe-s3"} <= {
        (e.get("configMapRef") or e.get("secretRef"))["name"] for e in c["envFrom"]
    }
    (script_cm,) = [o for o in objects if o["kind"] == "ConfigMap"]
    assert script_cm["data"]["upload_demo.py"] == (K8S / "demo" / "upload_demo.py").read_text()
    local_run = (SCRIPTS / "local-run.sh").read_text()
    prefix = c["command"][2]
    assert f'DEMO_PREFIX="{prefix}"' in local_run
