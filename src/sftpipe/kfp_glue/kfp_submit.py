"""Submit a compiled pipeline to a Kubeflow Pipelines API server and follow the run.

A small client of the KFP v2beta1 REST API (the one the KFP UI and `kfp.Client` use):

    GET  /apis/v2beta1/experiments?filter=...   find the experiment by name
    POST /apis/v2beta1/experiments              or create it
    POST /apis/v2beta1/runs                     the run: pipeline spec inline, parameters
    GET  /apis/v2beta1/runs/{run_id}            its state, polled by `--wait`

Authentication, in this order: a bearer token (`--token`, `--token-file`, or $KFP_TOKEN), or
the credentials of a kubeconfig context (`--kube-context`), which also gives the endpoint when
`--host` is left out: the API server's service proxy to `ml-pipeline` in the KFP namespace.

Every failure is one `SftpipeError` line: unreachable endpoint, rejected credentials, a package
the server refuses (HTTP 4xx with the server's message), a run that ends badly.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import requests
import yaml

from sftpipe.errors import SftpipeError

API = "/apis/v2beta1"
TOKEN_ENV = "KFP_TOKEN"
# Run states (kfp_server_api V2beta1RuntimeState) that end a run, and the exit status each
# gives `sftpipe submit --wait`.
EXIT_STATUS = {"SUCCEEDED": 0, "SKIPPED": 0, "FAILED": 1, "CANCELED": 1}
CONNECT_TIMEOUT_S, READ_TIMEOUT_S = 10, 60
POLL_RETRIES = 5  # consecutive failed polls tolerated by --wait (API restarts, blips)
# EQUALS in the Filter proto (backend/api/v2beta1/filter.proto), as kfp.Client sends it.
FILTER_EQUALS = 1


@dataclass
class Endpoint:
    """Where the KFP API is and how to authenticate to it."""

    base_url: str
    ui_url: str
    headers: dict[str, str] = field(default_factory=dict)
    verify: bool | str = True
    cert: tuple[str, str] | None = None
    refresh: Callable[[], dict[str, str]] | None = None  # fresh auth headers (kube exec tokens)

    def run_url(self, run_id: str) -> str:
        return f"{self.ui_url.rstrip('/')}/#/runs/details/{run_id}"


def connect(
    host: str = "",
    *,
    token: str = "",
    token_file: Path | None = None,
    kube_context: str | None = None,
    kfp_namespace: str = "kubeflow",
    ca_cert: str = "",
    insecure: bool = False,
    ui_url: str = "",
) -> Endpoint:
    """The endpoint for `sftpipe submit`'s options (see the module docstring)."""
    if token_file is not None:
        try:
            token = token_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise SftpipeError(
                str(token_file), f"cannot read the token file ({exc})", "check --token-file"
            ) from None
    token = token or os.environ.get(TOKEN_ENV, "")
    verify: bool | str = ca_cert or not insecure
    if kube_context is not None:
        endpoint = _from_kubeconfig(kube_context, kfp_namespace, host)
        if token:
            endpoint.headers["Authorization"] = f"Bearer {token}"
            endpoint.refresh = None
        if ca_cert or insecure:
            endpoint.verify = verify
    elif not host:
        raise SftpipeError(
            "sftpipe submit", "no KFP endpoint", "pass --host URL or --kube-context NAME"
        )
    else:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        endpoint = Endpoint(_with_scheme(host), _with_scheme(host), headers, verify)
    if ui_url:
        endpoint.ui_url = _with_scheme(ui_url)
    return endpoint


def _with_scheme(url: str) -> str:
    url = url.rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise SftpipeError(url, "not an http(s) URL", "write it as http://host:port or https://...")
    return url


def _from_kubeconfig(context: str, namespace: str, host: str) -> Endpoint:
    """Credentials (and, without --host, the service-proxy URL) of a kubeconfig context."""
    from kubernetes import client, config

    configuration = client.Configuration()
    try:
        # KUBECONFIG read now (the kubernetes package reads it once, at import).
        config.load_kube_config(
            config_file=os.environ.get("KUBECONFIG") or None,
            client_configuration=configuration,
            context=context or None,
        )
    except Exception as exc:  # kubernetes raises ConfigException, TypeError, OSError, ...
        raise SftpipeError(
            f"kube context {context or '(current)'}",
            f"cannot load the kubeconfig ({' '.join(str(exc).split())})",
            "check `kubectl config get-contexts` and KUBECONFIG",
        ) from None

    def auth_headers() -> dict[str, str]:
        if configuration.refresh_api_key_hook is not None:
            configuration.refresh_api_key_hook(configuration)
        value = configuration.get_api_key_with_prefix("authorization")
        return {"Authorization": value} if value else {}

    proxy = f"{configuration.host}/api/v1/namespaces/{namespace}/services/ml-pipeline:http/proxy"
    cert = (
        (configuration.cert_file, configuration.key_file)
        if configuration.cert_file and configuration.key_file
        else None
    )
    verify: bool | str = configuration.ssl_ca_cert or bool(configuration.verify_ssl)
    base = _with_scheme(host) if host else proxy
    return Endpoint(base, base, auth_headers(), verify, cert, auth_headers)


class KfpApi:
    """The few v2beta1 calls `sftpipe submit` makes."""

    def __init__(self, endpoint: Endpoint, session: requests.Session | None = None) -> None:
        self.endpoint = endpoint
        self.session = session or requests.Session()

    def call(self, method: str, path: str, *, action: str, **kwargs: Any) -> dict[str, Any]:
        url = f"{self.endpoint.base_url}{API}{path}"
        where = self.endpoint.base_url
        headers = dict(self.endpoint.headers)
        if self.endpoint.refresh is not None:
            headers.update(self.endpoint.refresh())
        try:
            response = self.session.request(
                method,
                url,
                headers=headers,
                verify=self.endpoint.verify,
                cert=self.endpoint.cert,
                timeout=(CONNECT_TIMEOUT_S, READ_TIMEOUT_S),
                **kwargs,
            )
        except requests.exceptions.SSLError as exc:
            raise SftpipeError(
                where, f"TLS failed ({_short(exc)})", "pass --ca-cert FILE, or --insecure"
            ) from None
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise SftpipeError(
                where,
                f"cannot reach the KFP API ({_short(exc)})",
                "check --host; for kind run `make kind-up`, else `kubectl port-forward -n "
                "kubeflow svc/ml-pipeline-ui 8080:80` and use --host http://localhost:8080",
            ) from None
        return _decode(response, where, action)

    def experiment_id(self, name: str, namespace: str = "") -> str:
        """The id of the experiment called `name`, created if missing."""
        flt = {
            "predicates": [{"operation": FILTER_EQUALS, "key": "display_name", "stringValue": name}]
        }
        params = {"filter": json.dumps(flt), "page_size": 2}
        if namespace:
            params["namespace"] = namespace
        found = self.call("GET", "/experiments", action="list experiments", params=params)
        for experiment in found.get("experiments") or []:
            if experiment.get("display_name") == name:
                return str(experiment["experiment_id"])
        body = {"display_name": name, **({"namespace": namespace} if namespace else {})}
        created = self.call("POST", "/experiments", action="create the experiment", json=body)
        return str(created["experiment_id"])

    def create_run(
        self,
        package: dict[str, Any],
        parameters: dict[str, Any],
        experiment_id: str,
        run_name: str,
        service_account: str = "",
    ) -> dict[str, Any]:
        body: dict[str, Any] = {
            "display_name": run_name,
            "experiment_id": experiment_id,
            "pipeline_spec": package,
            "runtime_config": {"parameters": parameters},
        }
        if service_account:
            body["service_account"] = service_account
        return self.call("POST", "/runs", action="create the run", json=body)

    def get_run(self, run_id: str) -> dict[str, Any]:
        return self.call("GET", f"/runs/{run_id}", action="get the run")


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 200 else text[:197] + "..."


def _decode(response: requests.Response, where: str, action: str) -> dict[str, Any]:
    status = response.status_code
    try:
        body = response.json()
    except ValueError:
        body = None
    if status < 400 and isinstance(body, dict):
        return body
    message = ""
    if isinstance(body, dict):  # grpc-gateway errors: {"error"|"message": ..., "code": ...}
        message = str(body.get("message") or body.get("error") or "")
    message = _short(message or response.reason or "")
    if status < 400:
        raise SftpipeError(
            where,
            f"answered {action} with something that is not the KFP API (HTTP {status}, "
            f"{response.headers.get('content-type', 'no content type')})",
            "--host must be the KFP UI or API base URL; behind a login page pass --token",
        )
    if status in (401, 403):
        raise SftpipeError(
            where,
            f"the KFP API refused the credentials (HTTP {status}: {message})",
            "pass --token/--token-file or --kube-context",
        )
    if status == 404 and action != "get the run":
        raise SftpipeError(
            where,
            f"no KFP v2beta1 API here (HTTP 404 on {action})",
            "--host must be the KFP UI or API base URL, e.g. http://localhost:8080",
        )
    if status < 500 and action == "create the run":
        raise SftpipeError(
            where,
            f"the KFP API rejected the pipeline package (HTTP {status}: {message})",
            "recompile with `sftpipe compile` and check the KFP server version",
        )
    raise SftpipeError(
        where, f"the KFP API failed to {action} (HTTP {status}: {message})", "retry later"
    )


def read_package(path: Path) -> dict[str, Any]:
    """A compiled pipeline YAML as the run's `pipeline_spec` (with its platform spec, if any)."""
    try:
        documents = [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d]
    except (OSError, yaml.YAMLError) as exc:
        raise SftpipeError(
            str(path), f"cannot read the pipeline package ({_short(exc)})", "run `sftpipe compile`"
        ) from None
    if not documents or "root" not in documents[0] or "pipelineInfo" not in documents[0]:
        raise SftpipeError(
            str(path), "not a compiled KFP pipeline", "write it with `sftpipe compile`"
        )
    if len(documents) == 1:
        return documents[0]
    platform: dict[str, Any] = {}
    for document in documents[1:]:
        platform.update(document)
    return {"pipeline_spec": documents[0], "platform_spec": platform}


def package_parameters(package: dict[str, Any]) -> set[str]:
    spec = package.get("pipeline_spec", package)
    return set(spec["root"].get("inputDefinitions", {}).get("parameters", {}))


def task_states(run: dict[str, Any]) -> dict[str, str]:
    """Display name -> state of the run's pipeline tasks (driver/executor pods folded in)."""
    states: dict[str, str] = {}
    for task in (run.get("run_details") or {}).get("task_details") or []:
        name = task.get("display_name") or ""
        if name and not name.startswith(("root", "executor")) and "driver" not in name:
            states[name] = task.get("state", "")
    return states


def wait(
    api: KfpApi,
    run_id: str,
    *,
    poll_s: float = 10.0,
    timeout_s: float = 0.0,
    out: TextIO | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> dict[str, Any]:
    """Poll the run until it ends, printing every change of its state and its tasks' states.

    Returns the final run. `timeout_s` 0 waits for ever.
    """
    out = out or sys.stdout
    start = time.monotonic()
    last: tuple[str, dict[str, str]] = ("", {})
    failures = 0
    while True:
        try:
            run = api.get_run(run_id)
            failures = 0
        except SftpipeError:
            failures += 1
            if failures > POLL_RETRIES:
                raise
            sleep(min(poll_s * 2**failures, 60.0))
            continue
        state = run.get("state", "") or "PENDING"
        tasks = task_states(run)
        if (state, tasks) != last:
            changed = {k: v for k, v in tasks.items() if last[1].get(k) != v}
            detail = ", ".join(f"{k} {v}" for k, v in sorted(changed.items()))
            print(f"[sftpipe] run {run_id}: {state}" + (f" ({detail})" if detail else ""), file=out)
            out.flush()
            last = (state, tasks)
        if state in EXIT_STATUS:
            return run
        if timeout_s and time.monotonic() - start > timeout_s:
            raise SftpipeError(
                f"run {run_id}",
                f"still {state} after {timeout_s:.0f} s",
                f"follow it at {api.endpoint.run_url(run_id)}",
            )
        sleep(poll_s)


def run_error(run: dict[str, Any]) -> str:
    """The one-line reason a finished run gives for failing, if any."""
    error = run.get("error") or {}
    return _short(str(error.get("message") or "")) if isinstance(error, dict) else ""
