"""Submit a compiled pipeline to Kubeflow Pipelines and follow the run, through `kfp.Client`.

`kfp.Client` (the KFP SDK's client of the v2beta1 API) finds or creates the experiment, creates
the run and reads its state. This module decides how it connects and turns every failure into
one `SftpipeError` line: unreachable endpoint, rejected credentials, something that is not the
KFP API, a package the server refuses, a run that ends badly.

Authentication, in this order: a bearer token (`--token`, `--token-file`, or $KFP_TOKEN), or
the credentials of a kubeconfig context (`--kube-context`: tokens, client certificates, exec
plugins), with which kfp.Client reaches the API through the API server's service proxy to
`ml-pipeline` in the KFP namespace when `--host` is left out. A bearer token is refused over
plain http:// (it would cross the network in clear text) unless `--insecure`.

Where kfp.Client's own behaviour does not fit a command-line tool, and what is done instead:
- Its constructor checks /apis/v2beta1/healthz and retries any HTTP error 5 times, 5 s apart,
  then raises a TimeoutError that names neither the status nor the server (a wrong token: 25 s,
  then "Failed getting healthz endpoint"). Here: one try, and the failure says what it was
  (`_Client.get_kfp_healthz`); an HTML answer (a login page) is recognized as not KFP.
- Its `enable_caching=False` reaches only the tasks of the root DAG; `--no-cache` here turns
  caching off for every task, those inside condition and loop sub-DAGs too (`without_caching`).
- It prints experiment and run links on stdout: kept off the console; `sftpipe submit` prints
  its own lines.
- The kubernetes package reads $KUBECONFIG once, at import; it is read again here.
- With a kubeconfig context, its service-proxy URL ended in "/" before the API paths' own "/"
  (".../proxy//apis/..."); with a bearer-token context the token refresh dropped the proxy path
  altogether (`connect`). Both are fixed here.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import yaml

from sftpipe.errors import SftpipeError

TOKEN_ENV = "KFP_TOKEN"
# Run states (kfp_server_api V2beta1RuntimeState) that end a run, and the exit status each
# gives `sftpipe submit --wait`.
EXIT_STATUS = {"SUCCEEDED": 0, "SKIPPED": 0, "FAILED": 1, "CANCELED": 1}
POLL_RETRIES = 5  # consecutive failed polls tolerated by --wait (API restarts, blips)
CONNECT_TIMEOUT_S, READ_TIMEOUT_S = 10, 60
PORT_FORWARD_HINT = (
    "check --host; for kind run `make kind-up`, else `kubectl port-forward -n kubeflow "
    "svc/ml-pipeline-ui 8080:80` and use --host http://localhost:8080"
)


def _client_class() -> type:
    """kfp.Client with a health check that tries once and says why it failed, and a service-proxy
    URL without a trailing slash (module doc)."""
    import kfp

    class _Client(kfp.Client):  # type: ignore[misc]
        def _load_config(self, *args: Any, **kwargs: Any) -> Any:
            # kfp.Client's service-proxy URL ends in "/" and every API path starts with one:
            # it requested ".../proxy//apis/v2beta1/healthz" (measured against the stub, which
            # answers 404 as a router that does not clean paths would).
            config = super()._load_config(*args, **kwargs)
            config.host = config.host.rstrip("/")
            return config

        def get_kfp_healthz(self, sleep_duration: int = 5) -> Any:
            api = self._healthz_api
            answer = api.healthz_service_get_healthz(
                _request_timeout=(CONNECT_TIMEOUT_S, READ_TIMEOUT_S)
            )
            response = api.api_client.last_response
            content_type = response.getheader("content-type") or "no content type"
            try:
                json.loads(response.data or b"")
            except ValueError:
                raise _NotKfp(response.status, content_type) from None
            return answer

    return _Client


class _NotKfp(Exception):
    def __init__(self, status: int, content_type: str) -> None:
        super().__init__(f"HTTP {status}, {content_type}")


@dataclass
class Kfp:
    """A connected kfp.Client, the endpoint it talks to (for messages) and the UI's URL."""

    client: Any
    where: str
    ui_url: str

    def run_url(self, run_id: str) -> str:
        return f"{self.ui_url.rstrip('/')}/#/runs/details/{run_id}"

    def experiment_id(self, name: str, namespace: str = "") -> str:
        """The id of the experiment called `name`, created if missing."""
        with _errors(self.where, "find or create the experiment"), _quiet():
            experiment = self.client.create_experiment(name=name, namespace=namespace or None)
        if not getattr(experiment, "experiment_id", None):
            raise _not_kfp(self.where, "create the experiment", "no experiment id in the answer")
        return str(experiment.experiment_id)

    def create_run(
        self,
        package: dict[str, Any],
        parameters: dict[str, Any],
        experiment_id: str,
        run_name: str,
        service_account: str = "",
    ) -> str:
        """Start a run of `package` (as `read_package` returns it); its run id."""
        with tempfile.TemporaryDirectory(prefix="sftpipe-submit-") as tmp:
            path = Path(tmp) / "pipeline.yaml"
            path.write_text(_package_yaml(package), encoding="utf-8")
            with _errors(self.where, "create the run"), _quiet():
                run = self.client.run_pipeline(
                    experiment_id=experiment_id,
                    job_name=run_name,
                    pipeline_package_path=str(path),
                    params=parameters,
                    service_account=service_account or None,
                )
        if not getattr(run, "run_id", None):
            raise _not_kfp(self.where, "create the run", "no run id in the answer")
        return str(run.run_id)

    def get_run(self, run_id: str) -> dict[str, Any]:
        with _errors(self.where, "get the run"):
            return self.client.get_run(run_id).to_dict()


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
) -> Kfp:
    """A kfp.Client for `sftpipe submit`'s options (see the module docstring), health-checked."""
    if token_file is not None:
        try:
            token = token_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise SftpipeError(
                str(token_file), f"cannot read the token file ({exc})", "check --token-file"
            ) from None
    token = token or os.environ.get(TOKEN_ENV, "")
    host = _with_scheme(host) if host else ""
    options: dict[str, Any] = {"namespace": kfp_namespace}
    if insecure:
        options["verify_ssl"] = False
        import urllib3

        # Asked for: not one InsecureRequestWarning per poll of --wait.
        urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
    if ca_cert:
        options["ssl_ca_cert"] = ca_cert
    if kube_context is not None:
        configuration = _kubeconfig(kube_context)
        bearer = bool(configuration.get_api_key_with_prefix("authorization"))
        if host or token or bearer:
            # kfp.Client's own kube_context loading cannot be used with a bearer token: the
            # kubernetes package's token refresh hook, which kfp_server_api calls before every
            # request, sets the host back to the API server's root, dropping the proxy path
            # (measured: the health check went to /apis/v2beta1/healthz of the API server).
            if not host:
                host = _proxy_url(configuration.host, kfp_namespace)
                if configuration.ssl_ca_cert and not ca_cert:
                    options["ssl_ca_cert"] = configuration.ssl_ca_cert
                if not configuration.verify_ssl:
                    options["verify_ssl"] = False
            if not token:
                options["credentials"] = _KubeconfigToken(configuration, kube_context)
            where = host
        else:  # client certificates: kfp.Client loads the context and builds the proxy URL
            options["kube_context"] = kube_context or None
            where = _proxy_url(configuration.host, kfp_namespace)
    elif not host:
        raise SftpipeError(
            "sftpipe submit", "no KFP endpoint", "pass --host URL or --kube-context NAME"
        )
    else:
        where = host
    if token and where.startswith("http://") and not insecure:
        raise SftpipeError(
            where,
            "refusing to send a bearer token over plain http:// (anyone on the path can read it)",
            "use an https:// endpoint, or pass --insecure for a trusted link "
            "(e.g. kubectl port-forward to localhost)",
        )
    if host:
        options["host"] = host
    if token:
        options["existing_token"] = token
    ui = _with_scheme(ui_url) if ui_url else where
    with _errors(where, "check the KFP API's health"), _quiet():
        client = _client_class()(ui_host=ui, **options)
    return Kfp(client, where, ui)


def _with_scheme(url: str) -> str:
    url = url.rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise SftpipeError(url, "not an http(s) URL", "write it as http://host:port or https://...")
    return url


def _proxy_url(api_server: str, namespace: str) -> str:
    """The Kubernetes API server's service proxy to the KFP API (as kfp.Client builds it)."""
    return f"{api_server.rstrip('/')}/api/v1/namespaces/{namespace}/services/ml-pipeline:http/proxy"


def _kubeconfig(context: str) -> Any:
    """The loaded kubeconfig context (checked here, so a bad one is one line: kfp.Client only
    prints "Failed to load kube config." and goes on to http://localhost)."""
    from kubernetes import client, config
    from kubernetes.config import kube_config

    path = os.environ.get("KUBECONFIG") or "~/.kube/config"
    # kfp.Client calls load_kube_config without a file: the kubernetes package then reads the
    # KUBECONFIG it saw at import, possibly not this process's current one.
    kube_config.KUBE_CONFIG_DEFAULT_LOCATION = path
    configuration = client.Configuration()
    try:
        config.load_kube_config(
            config_file=path, client_configuration=configuration, context=context or None
        )
    except Exception as exc:  # kubernetes raises ConfigException, TypeError, OSError, ...
        raise SftpipeError(
            f"kube context {context or '(current)'}",
            f"cannot load the kubeconfig ({' '.join(str(exc).split())})",
            "check `kubectl config get-contexts` and KUBECONFIG",
        ) from None
    return configuration


class _KubeconfigToken:
    """kfp.Client credentials: the bearer token of a kubeconfig context, refreshed by its exec
    plugin before each request (for `--host` together with `--kube-context`)."""

    def __init__(self, configuration: Any, context: str) -> None:
        if not configuration.get_api_key_with_prefix("authorization"):
            raise SftpipeError(
                f"kube context {context or '(current)'}",
                "has no bearer token to send to --host (client certificates only work with "
                "the API server itself)",
                "leave out --host to go through the API server's service proxy",
            )
        self.configuration = configuration

    def refresh_api_key_hook(self, target: Any) -> None:
        if self.configuration.refresh_api_key_hook is not None:
            self.configuration.refresh_api_key_hook(self.configuration)
        value = self.configuration.get_api_key_with_prefix("authorization")
        target.api_key["authorization"] = value.removeprefix("Bearer ")


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Without kfp.Client's printed links and its FutureWarning about old KFP servers."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore", FutureWarning)
        yield


@contextlib.contextmanager
def _errors(where: str, action: str) -> Iterator[None]:
    """kfp.Client's and urllib3's exceptions as one SftpipeError line."""
    import kfp_server_api
    import urllib3

    try:
        yield
    except kfp_server_api.ApiException as exc:
        raise _api_error(where, action, exc) from None
    except _NotKfp as exc:
        raise _not_kfp(where, action, str(exc)) from None
    except urllib3.exceptions.HTTPError as exc:
        reason = getattr(exc, "reason", None) or exc
        if isinstance(reason, urllib3.exceptions.SSLError):
            raise SftpipeError(
                where, f"TLS failed ({_short(reason)})", "pass --ca-cert FILE, or --insecure"
            ) from None
        raise SftpipeError(
            where, f"cannot reach the KFP API ({_short(reason)})", PORT_FORWARD_HINT
        ) from None
    except (TimeoutError, ValueError) as exc:  # kfp.Client: ambiguous names, bad packages
        raise SftpipeError(where, f"failed to {action} ({_short(exc)})", "retry later") from None


def _not_kfp(where: str, action: str, detail: str) -> SftpipeError:
    return SftpipeError(
        where,
        f"answered {action} with something that is not the KFP API ({detail})",
        "--host must be the KFP UI or API base URL; behind a login page pass --token",
    )


def _short(exc: BaseException | str) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 200 else text[:197] + "..."


def _api_error(where: str, action: str, exc: Any) -> SftpipeError:
    status = int(exc.status or 0)
    if status == 0:  # kfp_server_api's wrapper of TLS failures
        return SftpipeError(
            where, f"TLS failed ({_short(exc.reason or '')})", "pass --ca-cert FILE, or --insecure"
        )
    message = ""
    try:
        body = json.loads(exc.body or b"")
    except (TypeError, ValueError):
        body = None
    if isinstance(body, dict):  # grpc-gateway errors: {"error"|"message": ..., "code": ...}
        message = str(body.get("message") or body.get("error") or "")
    message = _short(message or exc.reason or "")
    if status in (401, 403):
        return SftpipeError(
            where,
            f"the KFP API refused the credentials (HTTP {status}: {message})",
            "pass --token/--token-file or --kube-context",
        )
    if status == 404 and action != "get the run":
        return SftpipeError(
            where,
            f"no KFP v2beta1 API here (HTTP 404 on {action})",
            "--host must be the KFP UI or API base URL, e.g. http://localhost:8080",
        )
    if status < 500 and action == "create the run":
        return SftpipeError(
            where,
            f"the KFP API rejected the pipeline package (HTTP {status}: {message})",
            "recompile with `sftpipe compile` and check the KFP server version",
        )
    return SftpipeError(
        where, f"the KFP API failed to {action} (HTTP {status}: {message})", "retry later"
    )


def read_package(path: Path) -> dict[str, Any]:
    """A compiled pipeline YAML: {"pipeline_spec": ..., "platform_spec": ...} (the platform
    spec {} when the package has none)."""
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
    platform: dict[str, Any] = {}
    for document in documents[1:]:
        platform.update(document)
    return {"pipeline_spec": documents[0], "platform_spec": platform}


def _package_yaml(package: dict[str, Any]) -> str:
    documents = [package["pipeline_spec"]]
    if package.get("platform_spec"):
        documents.append(package["platform_spec"])
    return yaml.safe_dump_all(documents, sort_keys=False)


def package_parameters(package: dict[str, Any]) -> set[str]:
    spec = package["pipeline_spec"]
    return set(spec["root"].get("inputDefinitions", {}).get("parameters", {}))


def without_caching(package: dict[str, Any]) -> dict[str, Any]:
    """The package with KFP's cache off for every task, in the root DAG and in every sub-DAG
    (conditions, loops), which kfp.Client's `enable_caching=False` does not reach."""
    spec = json.loads(json.dumps(package["pipeline_spec"]))
    dags = [spec["root"].get("dag", {})]
    dags += [c["dag"] for c in spec.get("components", {}).values() if "dag" in c]
    for dag in dags:
        for task in dag.get("tasks", {}).values():
            task["cachingOptions"] = {}  # enableCache false, as the compiler writes it
    return {**package, "pipeline_spec": spec}


def task_states(run: dict[str, Any]) -> dict[str, str]:
    """Display name -> state of the run's pipeline tasks (driver/executor pods folded in)."""
    states: dict[str, str] = {}
    for task in (run.get("run_details") or {}).get("task_details") or []:
        name = task.get("display_name") or ""
        if name and not name.startswith(("root", "executor")) and "driver" not in name:
            states[name] = task.get("state") or ""
    return states


def wait(
    api: Kfp,
    run_id: str,
    *,
    poll_s: float = 10.0,
    timeout_s: float = 0.0,
    out: TextIO | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> dict[str, Any]:
    """Poll the run until it ends, printing every change of its state and its tasks' states.

    Returns the final run. `timeout_s` 0 waits for ever. (kfp.Client.wait_for_run_completion
    prints nothing while it waits, gives up on the first failed poll and matches its end
    states in lower case.)
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
        state = run.get("state") or "PENDING"
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
                f"follow it at {api.run_url(run_id)}",
            )
        sleep(poll_s)


def run_error(run: dict[str, Any]) -> str:
    """The one-line reason a finished run gives for failing, if any."""
    error = run.get("error") or {}
    return _short(str(error.get("message") or "")) if isinstance(error, dict) else ""
