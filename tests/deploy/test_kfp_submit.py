"""`sftpipe submit` (the real `kfp.Client`) against a STUB of the KFP v2beta1 REST API.

The stub below is not Kubeflow Pipelines: it is a small `http.server` on a free loopback port
that answers the five calls kfp.Client makes for `sftpipe submit` (health check, list/create
experiment, create run, get run) the way the KFP API server does (snake_case JSON,
grpc-gateway error bodies), records every request, and can be told to reject the package,
demand a token, fail a few polls or walk a run through its states. The tests check the
requests kfp.Client sends for sftpipe and how sftpipe reports what comes back. A real KFP API
is exercised by `make local-run` on kind.
"""

from __future__ import annotations

import http.server
import io
import json
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import yaml

from sftpipe.apps import cli
from sftpipe.config import FIELDS, PipelineConfig
from sftpipe.kfp_glue import kfp_submit

API = "/apis/v2beta1"
PROXY = "/api/v1/namespaces/kubeflow/services/ml-pipeline:http/proxy"


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: Any


@dataclass
class StubKfp:
    """Behaviour and records of the stub KFP API server."""

    url: str = ""
    token: str = ""  # when set, requests need "Authorization: Bearer <token>"
    experiments: list[dict[str, Any]] = field(default_factory=list)
    reject_run: tuple[int, dict[str, Any]] | None = None
    run_states: list[str] = field(default_factory=lambda: ["PENDING", "RUNNING", "SUCCEEDED"])
    fail_polls: int = 0  # answer this many GET run calls with HTTP 503 first
    html: bool = False  # answer like a login page in front of KFP
    requests: list[Request] = field(default_factory=list)

    def calls(self, method: str, suffix: str) -> list[Request]:
        return [r for r in self.requests if r.method == method and r.path.endswith(suffix)]


def _handler(stub: StubKfp) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:  # quiet
            pass

        def _reply(self, status: int, body: Any, content_type: str = "application/json") -> None:
            data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _handle(self, method: str) -> None:
            parts = urlsplit(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            request = Request(
                method,
                parts.path,
                parse_qs(parts.query),
                {k.lower(): v for k, v in self.headers.items()},
                json.loads(raw) if raw else None,
            )
            stub.requests.append(request)
            if stub.html:
                return self._reply(200, "<html>Sign in</html>", "text/html")
            if stub.token and request.headers.get("authorization") != f"Bearer {stub.token}":
                return self._reply(401, {"error": "Unauthenticated", "code": 16, "message": "no"})
            # Direct, or through the Kubernetes API server's service proxy (--kube-context).
            path = parts.path.removeprefix(PROXY)
            if method == "GET" and path == f"{API}/healthz":
                return self._reply(200, {"multi_user": False, "pipeline_store": "database"})
            if method == "GET" and path == f"{API}/experiments":
                flt = json.loads(request.query["filter"][0])
                wanted = flt["predicates"][0]["stringValue"]
                found = [e for e in stub.experiments if e["display_name"] == wanted]
                return self._reply(200, {"experiments": found} if found else {})
            if method == "POST" and path == f"{API}/experiments":
                experiment = {
                    **request.body,
                    "experiment_id": f"exp-{len(stub.experiments) + 1}",
                    "storage_state": "AVAILABLE",
                }
                stub.experiments.append(experiment)
                return self._reply(200, experiment)
            if method == "POST" and path == f"{API}/runs":
                if stub.reject_run:
                    return self._reply(*stub.reject_run)
                return self._reply(200, {"run_id": "run-123", "state": "PENDING", **request.body})
            if method == "GET" and path == f"{API}/runs/run-123":
                if stub.fail_polls:
                    stub.fail_polls -= 1
                    return self._reply(503, {"error": "unavailable", "message": "restarting"})
                state = stub.run_states.pop(0) if len(stub.run_states) > 1 else stub.run_states[0]
                tasks = [{"display_name": "clean", "state": state}, {"display_name": "root"}]
                run = {"run_id": "run-123", "state": state, "run_details": {"task_details": tasks}}
                if state == "FAILED":
                    run["error"] = {"message": "task finetune failed: OOMKilled"}
                return self._reply(200, run)
            return self._reply(404, {"error": "Not Found", "code": 5, "message": "not found"})

        def do_GET(self) -> None:
            self._handle("GET")

        def do_POST(self) -> None:
            self._handle("POST")

    return Handler


@pytest.fixture
def stub() -> Iterator[StubKfp]:
    """A stub KFP API server (not KFP) on a free loopback port."""
    state = StubKfp()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("package") / "p.yaml"
    assert cli.main(["compile", "--output", str(path), "--no-gpu"]) == 0
    return path


@pytest.fixture(autouse=True)
def _no_ambient_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(kfp_submit.TOKEN_ENV, raising=False)


def submit(stub: StubKfp, package: Path | None, *argv: str) -> int:
    args = ["submit", "--host", stub.url, "--data-uri", "s3://b/chat.jsonl", *argv]
    if package is not None:
        args += ["--package", str(package)]
    return cli.main(args)


def one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("sftpipe: error: ")
    return err


def test_submit_sends_the_package_and_parameters(stub, package, capsys):
    stub.token = "t0ken-value"
    code = submit(
        stub,
        package,
        "--token",
        "t0ken-value",
        "--insecure",  # a token over the stub's plain http://
        "--experiment",
        "nightly",
        "--run-name",
        "r1",
        "--param",
        "learning_rate=5e-5",
        "--param",
        "max_steps=70",
        "--max-steps",
        "7",
        "--param",
        "dedupe=false",
    )
    assert code == 0
    out = capsys.readouterr().out
    assert f"{stub.url}/#/runs/details/run-123" in out
    assert all(r.headers["authorization"] == "Bearer t0ken-value" for r in stub.requests)
    assert [(r.method, r.path.removeprefix(API)) for r in stub.requests] == [
        ("GET", "/healthz"),
        ("GET", "/experiments"),
        ("POST", "/experiments"),
        ("POST", "/runs"),
    ]

    (listed,) = stub.calls("GET", "/experiments")
    predicate = json.loads(listed.query["filter"][0])["predicates"][0]
    assert (predicate["key"], predicate["stringValue"]) == ("display_name", "nightly")
    (created,) = stub.calls("POST", "/experiments")
    assert created.body["display_name"] == "nightly" and not created.body.get("namespace")

    (run,) = stub.calls("POST", "/runs")
    body = run.body
    assert body["display_name"] == "r1" and body["experiment_id"] == "exp-1"
    documents = list(yaml.safe_load_all(package.read_text()))
    assert body["pipeline_spec"] == {"pipeline_spec": documents[0], "platform_spec": documents[1]}
    parameters = body["runtime_config"]["parameters"]
    assert set(parameters) == set(FIELDS)
    expected = PipelineConfig.from_flat(
        {"data_uri": "s3://b/chat.jsonl", "learning_rate": 5e-5, "max_steps": 7, "dedupe": False}
    ).flat()
    assert parameters == expected  # typed by the config; the named flag beats --param
    assert "t0ken-value" not in json.dumps(body)


def test_an_existing_experiment_is_reused(stub, package):
    stub.experiments.append({"experiment_id": "exp-9", "display_name": "sftpipe"})
    assert submit(stub, package) == 0
    assert not stub.calls("POST", "/experiments")
    assert stub.calls("POST", "/runs")[0].body["experiment_id"] == "exp-9"


def test_without_a_package_it_compiles_with_the_cluster_flags(stub):
    assert submit(stub, None, "--no-gpu", "--node-selector", "pool=cpu") == 0
    spec = stub.calls("POST", "/runs")[0].body["pipeline_spec"]
    executors = spec["pipeline_spec"]["deploymentSpec"]["executors"]
    assert "accelerator" not in json.dumps(executors)
    finetune = spec["platform_spec"]["platforms"]["kubernetes"]["deploymentSpec"]["executors"][
        "exec-finetune"
    ]
    assert finetune["nodeSelector"] == {"labels": {"pool": "cpu"}}


@pytest.mark.parametrize(
    ("final", "code"),
    [("SUCCEEDED", 0), ("FAILED", 1), ("CANCELED", 1)],
    ids=["succeeded", "failed", "canceled"],
)
def test_wait_follows_the_run_to_its_exit_status(stub, package, capsys, final, code):
    stub.run_states = ["PENDING", "RUNNING", "RUNNING", final]
    stub.fail_polls = 2  # an API restart while waiting is ridden out
    assert submit(stub, package, "--wait", "--poll-seconds", "0.01") == code
    captured = capsys.readouterr()
    states = [line for line in captured.out.splitlines() if line.startswith("[sftpipe] run run-")]
    assert [s.split(": ", 1)[1].split(" ")[0] for s in states] == ["PENDING", "RUNNING", final]
    assert "clean RUNNING" in captured.out
    if code:
        assert captured.err.strip().splitlines()[-1] == (
            f"sftpipe: error: run run-123 {final}"
            + (": task finetune failed: OOMKilled" if final == "FAILED" else "")
        )
    else:
        assert not captured.err


def test_wait_gives_up_after_the_timeout(stub, package, capsys):
    stub.run_states = ["RUNNING"]
    assert submit(stub, package, "--wait", "--poll-seconds", "0.01", "--wait-timeout", "0.2") == 2
    assert "still RUNNING after 0 s" in one_line_error(capsys)


def test_unreachable_endpoint_is_a_one_line_error(package, capsys):
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    code = cli.main(["submit", "--host", f"http://127.0.0.1:{port}", "--package", str(package)])
    assert code == 2
    err = one_line_error(capsys)
    assert err.startswith(f"sftpipe: error: http://127.0.0.1:{port}: cannot reach the KFP API (")
    assert "kubectl port-forward" in err


def test_a_rejected_package_is_a_one_line_error_with_the_servers_reason(stub, package, capsys):
    message = "Failed to create a new run: InvalidInputError: unknown platform spec"
    stub.reject_run = (400, {"error": message, "code": 3, "message": message, "details": []})
    assert submit(stub, package) == 2
    err = one_line_error(capsys)
    assert f"the KFP API rejected the pipeline package (HTTP 400: {message})" in err


def test_wrong_credentials_say_so(stub, package, capsys):
    stub.token = "right"
    assert submit(stub, package, "--token", "wrong", "--insecure") == 2
    assert "the KFP API refused the credentials (HTTP 401" in one_line_error(capsys)


def test_token_from_file_and_environment(stub, package, tmp_path, monkeypatch):
    stub.token = "from-file"
    token_file = tmp_path / "token"
    token_file.write_text("from-file\n")
    assert submit(stub, package, "--token-file", str(token_file), "--insecure") == 0
    stub.token = "from-env"
    monkeypatch.setenv(kfp_submit.TOKEN_ENV, "from-env")
    assert submit(stub, package, "--insecure") == 0


def test_a_login_page_is_not_mistaken_for_kfp(stub, package, capsys):
    stub.html = True
    assert submit(stub, package) == 2
    assert "not the KFP API (HTTP 200, text/html)" in one_line_error(capsys)


def test_a_wrong_path_is_not_kfp(stub, package, capsys):
    code = cli.main(["submit", "--host", stub.url + "/nothing", "--package", str(package)])
    assert code == 2
    assert "no KFP v2beta1 API here (HTTP 404" in one_line_error(capsys)


def test_kube_context_uses_the_api_server_proxy_and_its_credentials(
    stub, package, tmp_path, monkeypatch
):
    stub.token = "kube-token"
    kubeconfig = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "c", "cluster": {"server": stub.url}}],
        "users": [{"name": "u", "user": {"token": "kube-token"}}],
        "contexts": [{"name": "stub-ctx", "context": {"cluster": "c", "user": "u"}}],
        "current-context": "stub-ctx",
    }
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump(kubeconfig))
    monkeypatch.setenv("KUBECONFIG", str(path))
    args = ["submit", "--kube-context", "stub-ctx", "--package", str(package)]
    assert cli.main(args) == 0
    assert stub.requests and all(r.path.startswith(PROXY + API) for r in stub.requests)


def test_bad_params_are_one_line_errors(stub, package, capsys):
    assert submit(stub, package, "--param", "learning_rat=1") == 2
    assert "unknown parameter(s) ['learning_rat']" in one_line_error(capsys)
    assert submit(stub, package, "--param", "learning_rate=fast") == 2
    assert "learning_rate='fast'" in one_line_error(capsys)
    assert submit(stub, package, "--param", "oops") == 2
    assert "'oops' is not KEY=VALUE" in one_line_error(capsys)
    assert not stub.requests, "nothing is sent when the parameters are wrong"


def test_a_stale_package_is_refused_before_sending(stub, tmp_path, package, capsys):
    documents = list(yaml.safe_load_all(package.read_text()))
    del documents[0]["root"]["inputDefinitions"]["parameters"]["learning_rate"]
    stale = tmp_path / "stale.yaml"
    stale.write_text(yaml.safe_dump_all(documents))
    assert submit(stub, stale) == 2
    assert "the package has no parameter(s) ['learning_rate']" in one_line_error(capsys)
    assert not stub.calls("POST", "/runs")


def test_wait_prints_task_changes_only():
    class Api:
        def run_url(self, run_id: str) -> str:
            return f"http://x/#/runs/details/{run_id}"

        runs = iter(
            [
                {
                    "state": "RUNNING",
                    "run_details": {
                        "task_details": [{"display_name": "clean", "state": "RUNNING"}]
                    },
                },
                {
                    "state": "RUNNING",
                    "run_details": {
                        "task_details": [{"display_name": "clean", "state": "RUNNING"}]
                    },
                },
                {
                    "state": "SUCCEEDED",
                    "run_details": {
                        "task_details": [
                            {"display_name": "clean", "state": "SUCCEEDED"},
                            {"display_name": "clean-driver", "state": "SUCCEEDED"},
                        ]
                    },
                },
            ]
        )

        def get_run(self, run_id: str) -> dict[str, Any]:
            return next(self.runs)

    out = io.StringIO()
    final = kfp_submit.wait(Api(), "r", poll_s=0, out=out, sleep=lambda s: None)  # type: ignore[arg-type]
    assert final["state"] == "SUCCEEDED"
    assert out.getvalue().splitlines() == [
        "[sftpipe] run r: RUNNING (clean RUNNING)",
        "[sftpipe] run r: SUCCEEDED (clean SUCCEEDED)",
    ]


def test_a_token_is_not_sent_over_plain_http(stub, package, capsys):
    stub.token = "secret-token"
    assert submit(stub, package, "--token", "secret-token") == 2
    err = one_line_error(capsys)
    assert "refusing to send a bearer token over plain http://" in err and "--insecure" in err
    assert "secret-token" not in err
    assert not stub.requests, "nothing is sent"


def _caching(spec):
    """Display name -> cachingOptions of every task, in the root DAG and in sub-DAGs."""
    dags = [spec["root"]["dag"]] + [c["dag"] for c in spec["components"].values() if "dag" in c]
    tasks = [task for dag in dags for task in dag["tasks"].values()]
    return {task["taskInfo"]["name"]: task.get("cachingOptions") for task in tasks}


def test_caching_as_compiled_or_off_with_no_cache(stub):
    """By default the run keeps the compiled caching (clean and tokenize only); --no-cache turns
    it off for every task, also inside the condition and loop sub-DAGs (kfp.Client's own
    enable_caching=False reaches the root DAG's tasks only)."""
    args = ("--clean-shards", "2")  # clean's shards run inside a ParallelFor sub-DAG
    assert submit(stub, None, *args) == 0
    cached = _caching(stub.calls("POST", "/runs")[-1].body["pipeline_spec"]["pipeline_spec"])
    on = {name for name, options in cached.items() if options == {"enableCache": True}}
    assert on == {"clean", "clean: plan shards", "clean: shard", "tokenize"}
    assert submit(stub, None, *args, "--no-cache") == 0
    uncached = _caching(stub.calls("POST", "/runs")[-1].body["pipeline_spec"]["pipeline_spec"])
    assert set(uncached) == set(cached) and len(cached) >= 9
    assert all(not options for options in uncached.values()), uncached


def test_a_bad_kubeconfig_is_one_line(package, tmp_path, monkeypatch, capsys):
    """kfp.Client alone would print "Failed to load kube config." and go on to localhost."""
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing-kubeconfig"))
    args = ["submit", "--kube-context", "nowhere", "--package", str(package)]
    assert cli.main(args) == 2
    err = one_line_error(capsys)
    assert err.startswith("sftpipe: error: kube context nowhere: cannot load the kubeconfig (")
    assert "kubectl config get-contexts" in err


def _certificates(folder: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate it signed (as kind's
    kubeconfig holds one), written as PEM files."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)

    def issue(name, key, issuer=None, issuer_key=None, ca=False, server=False):
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer.subject if issuer else subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if server:
            san = x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
            usage = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH])
            builder = builder.add_extension(san, critical=False).add_extension(usage, False)
        elif not ca:
            usage = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH])
            builder = builder.add_extension(usage, critical=False)
        return builder.sign(issuer_key or key, hashes.SHA256())

    paths = {}
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = issue("stub-ca", ca_key, ca=True)
    for name, server in (("server", True), ("client", False)):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = issue(f"stub-{name}", key, ca, ca_key, server=server)
        paths[f"{name}.crt"] = folder / f"{name}.crt"
        paths[f"{name}.crt"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        paths[f"{name}.key"] = folder / f"{name}.key"
        paths[f"{name}.key"].write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    paths["ca.crt"] = folder / "ca.crt"
    paths["ca.crt"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    return paths


def test_kube_context_with_a_client_certificate_goes_through_the_proxy(
    package, tmp_path, monkeypatch
):
    """kind's kubeconfig authenticates with a client certificate: kfp.Client loads the context
    itself and reaches the KFP API through the API server's service proxy, over TLS that the
    stub verifies both ways (it refuses a connection without the client certificate)."""
    import base64
    import ssl

    certs = _certificates(tmp_path)
    state = StubKfp()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certs["server.crt"], certs["server.key"])
    context.load_verify_locations(certs["ca.crt"])
    context.verify_mode = ssl.CERT_REQUIRED
    server.socket = context.wrap_socket(server.socket, server_side=True)
    state.url = f"https://127.0.0.1:{server.server_address[1]}"
    threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True).start()

    def data(name: str) -> str:
        return base64.b64encode(certs[name].read_bytes()).decode()

    kubeconfig = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "kind",
                "cluster": {"server": state.url, "certificate-authority-data": data("ca.crt")},
            }
        ],
        "users": [
            {
                "name": "kind-user",
                "user": {
                    "client-certificate-data": data("client.crt"),
                    "client-key-data": data("client.key"),
                },
            }
        ],
        "contexts": [{"name": "kind-stub", "context": {"cluster": "kind", "user": "kind-user"}}],
        "current-context": "kind-stub",
    }
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump(kubeconfig))
    monkeypatch.setenv("KUBECONFIG", str(path))
    try:
        assert cli.main(["submit", "--kube-context", "kind-stub", "--package", str(package)]) == 0
    finally:
        server.shutdown()
        server.server_close()
    assert [(r.method, r.path.removeprefix(PROXY)) for r in state.requests] == [
        ("GET", f"{API}/healthz"),
        ("GET", f"{API}/experiments"),
        ("POST", f"{API}/experiments"),
        ("POST", f"{API}/runs"),
    ]
    assert all(r.path.startswith(PROXY + API) for r in state.requests)
