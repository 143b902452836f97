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
# The Secrets the manifests may reference; docker/scripts/secrets.sh makes exactly these, and
# the one the compiled pipeline's steps read MLflow's user from (ClusterOptions.mlflow_secret).
SECRETS = {
    ("mlflow", "mlflow-postgres"),
    ("mlflow", "mlflow-s3"),
    ("mlflow", "mlflow-auth"),
    ("kubeflow", "sftpipe-s3"),
}
PIPELINE_SECRETS = {("kubeflow", cluster.ClusterOptions().mlflow_secret)}
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
    assert made == SECRETS | PIPELINE_SECRETS, "secrets.sh does not make exactly the Secrets used"


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
    # No user or password on the command line (`ps`, the pod's spec): libpq reads PGUSER and
    # PGPASSWORD from the environment, which the Secret fills.
    assert (
        options["--backend-store-uri"]
        == "postgresql+psycopg2://mlflow-postgres:5432/$(POSTGRES_DB)"
    )
    env = {e["name"]: e for e in server["env"]}
    for var, key in (("PGUSER", "username"), ("PGPASSWORD", "password")):
        assert env[var]["valueFrom"]["secretKeyRef"] == {"name": "mlflow-postgres", "key": key}
    assert not re.search(r"\$\((PG|POSTGRES_(USER|PASSWORD))", " ".join(args))
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
    config = next(
        o
        for o in render(K8S / "mlflow")
        if o["kind"] == "ConfigMap" and o["metadata"]["name"] == "mlflow-server"
    )
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
    pins = dict(re.findall(r"\b(mlflow|boto3|psycopg2-binary|flask-wtf)==([\w.]+)", dockerfile))
    assert set(pins) == {"mlflow", "boto3", "psycopg2-binary", "flask-wtf"}  # flask-wtf: [auth]
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


def test_mlflow_asks_for_a_user():
    """MLflow's basic-auth app: the admin from Secret mlflow-auth, users in the tracking
    database (no password in the mounted config), a fixed session key for every worker."""
    objects = render(K8S / "mlflow")
    (deploy,) = [o for o in objects if o["kind"] == "Deployment"]
    pod = deploy["spec"]["template"]["spec"]
    (server,) = pod["containers"]
    assert "--app-name=basic-auth" in server["args"]
    env = {e["name"]: e for e in server["env"]}
    for var, key in (
        ("MLFLOW_AUTH_ADMIN_USERNAME", "admin-username"),
        ("MLFLOW_AUTH_ADMIN_PASSWORD", "admin-password"),
        ("MLFLOW_FLASK_SERVER_SECRET_KEY", "flask-secret-key"),
    ):
        assert env[var]["valueFrom"]["secretKeyRef"] == {"name": "mlflow-auth", "key": key}
    (mount,) = [m for m in server["volumeMounts"] if m["name"] == "auth-config"]
    assert env["MLFLOW_AUTH_CONFIG_PATH"]["value"] == f"{mount['mountPath']}/basic_auth.ini"
    assert mount["readOnly"] is True
    (volume,) = [v for v in pod["volumes"] if v["name"] == "auth-config"]
    config_maps = {o["metadata"]["name"]: o["data"] for o in objects if o["kind"] == "ConfigMap"}
    ini = config_maps[volume["configMap"]["name"]]["basic_auth.ini"]
    import configparser

    parser = configparser.ConfigParser()
    parser.read_string(ini)
    settings = dict(parser["mlflow"])
    database = config_maps["mlflow-server"]["POSTGRES_DB"]
    assert settings["database_uri"] == f"postgresql+psycopg2://mlflow-postgres:5432/{database}"
    assert not SECRETISH.search(ini.replace("authorization_function", "")), "a secret in the ini"
    assert settings["default_permission"] in ("READ", "NO_PERMISSIONS")


def _admits(policy, namespace_labels, pod_labels, port):
    """Whether an Ingress NetworkPolicy admits a pod with these labels to `port`."""
    for rule in policy["spec"].get("ingress", []):
        if rule.get("ports") and all(p["port"] != port for p in rule["ports"]):
            continue
        peers = rule.get("from")
        if peers is None:
            return True
        for peer in peers:
            ns_sel = peer.get("namespaceSelector")
            pod_sel = peer.get("podSelector")
            ns_ok = (
                ns_sel is not None
                and ns_sel.get("matchLabels", {}).items() <= namespace_labels.items()
            )
            ns_ok = ns_ok or (
                ns_sel is None
                and namespace_labels.get("kubernetes.io/metadata.name")
                == policy["metadata"]["namespace"]
            )
            pod_ok = pod_sel is None or pod_sel.get("matchLabels", {}).items() <= pod_labels.items()
            if ns_ok and pod_ok:
                return True
    return False


def test_only_the_pipelines_pods_and_the_ui_reach_mlflow():
    """The `mlflow` NetworkPolicy: the pods that carry the label pipelines/cluster.py and the
    TrainJob's nodes get (any namespace), and namespaces labelled for the UI; nobody else. The
    kind overlay adds the UI's NodePort, the cluster overlay does not."""
    from sftpipe.kfp_glue.trainjob import MLFLOW_CLIENT_LABEL

    base = [o for o in render(K8S / "mlflow") if o["kind"] == "NetworkPolicy"]
    (policy,) = [p for p in base if p["metadata"]["name"] == "mlflow"]
    assert policy["spec"]["podSelector"] == {"matchLabels": {"app.kubernetes.io/name": "mlflow"}}
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    step = dict([MLFLOW_CLIENT_LABEL])
    kubeflow = {"kubernetes.io/metadata.name": "kubeflow"}
    profile = {"kubernetes.io/metadata.name": "team-a"}
    assert _admits(policy, kubeflow, step, 5000)
    assert _admits(policy, profile, step, 5000)  # multi-user KFP: the profile's namespace
    assert _admits(policy, {"sftpipe.io/mlflow-ui": "allowed"}, {"app": "ingress-nginx"}, 5000)
    assert not _admits(policy, kubeflow, {"app": "ml-pipeline-ui"}, 5000)
    assert not _admits(policy, profile, {"app": "notebook"}, 5000)
    assert not _admits(policy, kubeflow, step, 5432)
    for name, overlay in OVERLAYS.items():
        rendered = render(overlay)
        policies = {
            p["metadata"]["name"]: p
            for p in rendered
            if p["kind"] == "NetworkPolicy" and p["metadata"]["namespace"] == "mlflow"
        }
        assert {"mlflow", "mlflow-postgres"} <= set(policies), name
        assert ("mlflow-ui-from-host" in policies) == (name == "kind"), name
